"""Lazy, memory-mapped access to the tensors and config of a Hugging Face model folder."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shoal.errors import ShoalError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def resolve_model(ref: str | Path, *, revision: str | None = None) -> Path:
    """Return the local folder of a model given as a folder path or a Hub id (downloaded once into the HF cache)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    text = str(ref)
    if path.exists():
        raise ShoalError(f"model {text!r} is a file; give the folder that holds config.json and *.safetensors")
    if not _HUB_ID.match(text):
        raise ShoalError(f"model {text!r} not found: no such folder, and it is not a Hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShoalError(
            f"model {text!r} not found: no such folder, and the Hub could not provide it ({first})"
        ) from exc


@dataclass
class Checkpoint:
    """A model folder: its config and a lazily opened map from tensor name to safetensors file."""

    path: Path
    config: dict[str, Any]
    files: dict[str, Path]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, name: str) -> Any:
        file = self.files[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag of a tensor, e.g. 'BF16'."""
        return self._handle(name).get_slice(name).get_dtype()

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self.files:
            raise ShoalError(f"tensor {name!r} is missing from {self.path}")
        tensor = self._handle(name).get_tensor(name)
        return tensor if str(device) == "cpu" else tensor.to(device, non_blocking=True)

    @cached_property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return int(self.config[key])
        return None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ShoalError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = {name: path / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise ShoalError(f"{index} names {file.name}, which is missing")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        hint = " (only PyTorch .bin weights found; convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise ShoalError(f"{path}: no *.safetensors weights{hint}")
    files: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    files[name] = shard
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ShoalError(f"{shard}: not a readable safetensors file ({exc})") from exc
    return files


def open_checkpoint(ref: str | Path) -> Checkpoint:
    """Open a model folder or Hub id; reads only config.json and the safetensors headers."""
    path = resolve_model(ref)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ShoalError(f"{path}: no config.json; is this a Hugging Face model folder?")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ShoalError(f"{config_file}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
    return Checkpoint(path=path, config=config, files=_tensor_files(path))

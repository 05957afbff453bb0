"""Lazy, memory-mapped access to the tensors and config of a Hugging Face model folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shoal import layout
from shoal.cache import storage
from shoal.checkpoint.reference import Location, parse_reference
from shoal.errors import ShoalError

_HUB_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def _folder(place: Location, ref: str) -> Path:
    """The local folder of a folder path or a Hub id at a revision (downloaded once into the HF cache: storage()'s
    hub_cache, or huggingface_hub's own)."""
    path = Path(place.path).expanduser()
    if path.is_dir():
        return path
    what = _what(place, ref)
    if path.exists():
        raise ShoalError(f"{what} is a file; give the folder that holds config.json and *.safetensors")
    if not place.is_hub_id:
        raise ShoalError(f"{what} not found: no such folder, and it is not a Hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_cache = storage().hub_cache
    try:
        return Path(snapshot_download(place.path, revision=place.revision, allow_patterns=_HUB_FILES,
                                      cache_dir=hub_cache))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise _not_found(what, exc, hub_cache) from exc


def _what(place: Location, ref: str) -> str:
    return f"model {ref!r}" if str(place) == ref else f"{place} (in {ref!r})"


def _not_found(what: str, exc: Exception, hub_cache: Path | None) -> ShoalError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    into = f" into the cache {hub_cache}" if hub_cache is not None else ""
    return ShoalError(f"{what} not found: no such folder, and the Hub could not provide it{into} ({first})")


def resolve_model(ref: str | Path) -> Path:
    """The local folder of a model string: a folder path or a Hub id (`org/name`, `org/name@revision`), or either
    with `+ADAPTER` (a PEFT LoRA adapter's folder or Hub id): then the model with the adapter applied, made once
    into storage()'s lora folder (shoal.checkpoint.lora)."""
    reference = parse_reference(ref)
    folder = _folder(reference.model, str(ref))
    if reference.lora is None:
        return folder
    from shoal.checkpoint import lora  # imports peft, and this module

    return lora.merged_folder(folder, _folder(reference.lora, str(ref)), str(ref))


def hub_commit(place: Location, ref: str) -> str:
    """The commit a Hub id at a branch or tag (main by default) is at now: the Hub's answer, else (offline) the one
    the HF cache last saw. Nothing is downloaded. ref: the model string it is in, for the error. `org/name@COMMIT`
    reads the same files after the branch moves on."""
    from huggingface_hub import HfApi

    hub_cache = storage().hub_cache
    try:
        return HfApi().resolve_revision(place.path, revision=place.revision, cache_dir=hub_cache).resolved
    except Exception as exc:  # the Hub's errors, and its HTTP client's (httpx or httpx2, by huggingface_hub version)
        raise _not_found(_what(place, ref), exc, hub_cache) from exc


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, from the safetensors header alone."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # the safetensors tag, e.g. 'BF16'


@dataclass
class Checkpoint:
    """A model folder: its config and, per tensor name, its file, shape and dtype; data is read on demand."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> str:
        return self.tensors[name].dtype

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor. The file is memory-mapped only for this read, so pages of tensors already
        merged do not stay mapped (and counted in the process's memory) for the rest of the merge."""
        if name not in self.tensors:
            raise ShoalError(f"tensor {name!r} is missing from {self.path}")
        with safe_open(str(self.tensors[name].file), framework="pt", device=str(device)) as handle:
            return handle.get_tensor(name)

    @property
    def text_config(self) -> dict[str, Any]:
        """The language model's config (a VLM's text_config)."""
        return layout.text_config(self.config)

    @cached_property
    def num_layers(self) -> int | None:
        """The language model's layer count."""
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.text_config.get(key), int):
                return int(self.text_config[key])
        return None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @cached_property
    def lm(self) -> layout.Names:
        """How this checkpoint names its language model's tensors (ShoalError for a VLM family shoal cannot merge)."""
        return layout.language_model(self.config, self.names, str(self.path))

    @property
    def is_vlm(self) -> bool:
        return self.lm.family is not None

    @cached_property
    def lm_names(self) -> list[str]:
        """The canonical names of the language model's tensors, in file order (all tensors of a text-only LLM)."""
        return [c for c in map(self.lm.canonical, self.names) if c is not None]

    def module_names(self, module: str) -> list[str]:
        """The canonical names of one module's tensors (a name in self.lm.modules: e.g. text_decoder, the same as
        lm_names, or vision_tower), in file order."""
        if layout.is_language_model(module):
            return self.lm_names
        names = self.lm.of_module(module)
        return [c for c in map(names.canonical, self.names) if c is not None]

    @cached_property
    def extra_names(self) -> list[str]:
        """This checkpoint's names of the tensors outside the language model (a VLM's vision tower, projector...)."""
        return [n for n in self.names if self.lm.canonical(n) is None]


def _read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    infos[name] = TensorInfo(file, tuple(piece.get_shape()), piece.get_dtype())
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ShoalError(f"{file}: not a readable safetensors file ({exc})") from exc
    return infos


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, an index); anything else is a ShoalError naming it."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else " (not UTF-8)"
        raise ShoalError(f"{path}: invalid JSON{where}") from None
    except RecursionError:
        raise ShoalError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ShoalError(f"{path}: {what} must be a JSON object ({{...}}), found a {type(data).__name__}")
    return data


def _tensor_files(path: Path) -> dict[str, TensorInfo]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ShoalError(f"{index}: not a valid safetensors index (weight_map must map tensor names to file "
                             "names)")
        shards = sorted({path / file for file in weight_map.values()})
        for file in shards:
            if not file.is_file():
                raise ShoalError(f"{index} names {file.name}, which is missing")
        infos = _read_headers(shards)
        missing = [name for name in weight_map if name not in infos]
        if missing:
            raise ShoalError(f"{index} lists {missing[0]}, which is in none of the shards")
        return {name: infos[name] for name in weight_map}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ShoalError(f"{path}: no *.safetensors weights{pickle_hint(path)}")
    return _read_headers(shards)


def pickle_hint(path: Path) -> str:
    """What to say about a folder without safetensors weights that holds PyTorch pickle files (or nothing)."""
    if not any(path.glob("*.bin")) and not any(path.glob("*.pt")) and not any(path.glob("*.pth")):
        return ""
    return ("; it holds only PyTorch pickle weights (*.bin), which shoal does not load, since unpickling can run "
            "code: convert them once with `python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-st')\"` (in a process you trust)")


def check_weights(path: Path) -> None:
    """Check a model folder's safetensors weights from their headers alone (no pickle, no tensor data): a missing,
    truncated or damaged file is a ShoalError naming it."""
    _tensor_files(path)


def open_checkpoint(ref: str | Path) -> Checkpoint:
    """Open a model folder or Hub id; reads only config.json and the safetensors headers."""
    path = resolve_model(ref)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ShoalError(f"{path}: no config.json; is this a Hugging Face model folder?")
    config = read_json_object(config_file, "config.json")
    return Checkpoint(path=path, config=config, tensors=_tensor_files(path))

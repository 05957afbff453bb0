"""A PEFT LoRA adapter applied to its model (W + scale · B A), as a model folder made once and cached by the pair's
content."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shoal import layout
from shoal.cache import storage
from shoal.checkpoint.digest import files_digest
from shoal.checkpoint.files import PROCESSOR_FILES, TOKENIZER_FILES, copy_tokenizer, write_config
from shoal.checkpoint.reader import Checkpoint, open_checkpoint, pickle_hint
from shoal.checkpoint.writer import INDEX_NAME, remove_stale_temporaries
from shoal.errors import ShoalError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""What PEFT puts before the model's own module names in an adapter's tensor names."""
FORMAT = "2"
"""The version of how an adapter is applied, part of every cache key: bump it when the result would change."""
UNSUPPORTED = {
    "use_dora": "DoRA (it rescales every column of the weight by a learnt magnitude)",
    "lora_bias": "lora_bias (its lora_B layers have a bias)",
    "trainable_token_indices": "trainable_token_indices (it trains single rows of the embedding)",
    "target_parameters": "target_parameters (it adapts bare parameters, such as MoE experts)",
    "layer_replication": "layer_replication (it repeats layers of the model)",
    "alora_invocation_tokens": "an activated LoRA (it acts only after its invocation tokens, which a merged "
                               "weight cannot)",
    "use_qalora": "QA-LoRA (it pools the layer's input)",
}
"""LoraConfig settings that make W + scale · B A the wrong weight: an adapter that sets one is refused."""


@dataclass(frozen=True)
class LowRank:
    """One tensor's LoRA: A (r x in; r x rows for an embedding), B (out x r; columns x r), and how B A is applied."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool
    """Add (B A)ᵀ: an embedding's LoRA, or a fan_in_fan_out layer's (GPT-2's Conv1D)."""


@dataclass(frozen=True)
class Adapter:
    """What an adapter does to its model's tensors, by the model's tensor names."""

    low_rank: dict[str, LowRank]
    replaced: dict[str, torch.Tensor]
    """Tensors the adapter holds whole (modules_to_save, an adapted embedding's saved base layer): they replace the
    model's before B A is added, as PEFT loads them."""


def lora_delta(update: LowRank) -> torch.Tensor:
    """scale · B A (transposed if update.transpose), in float32 at least."""
    dtype = torch.promote_types(update.a.dtype, torch.float32)
    delta = update.b.to(dtype) @ update.a.to(dtype)
    return (delta.T if update.transpose else delta) * update.scale


def apply_adapter(name: str, weight: torch.Tensor, adapter: Adapter, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """The model's tensor `name` with the adapter applied, rounded once to dtype (None, or a tensor that is not
    floating point: the weight's own): W (or the adapter's whole replacement of it) + scale · B A, summed in float32
    at least."""
    out = dtype if dtype is not None and weight.is_floating_point() else weight.dtype
    weight = adapter.replaced.get(name, weight)
    update = adapter.low_rank.get(name)
    if update is None:
        return weight.to(out)
    return (weight.to(torch.promote_types(weight.dtype, torch.float32)) + lora_delta(update)).to(out)


def _config(folder: Path):  # type: ignore[no-untyped-def]  (a peft LoraConfig)
    from peft import LoraConfig, PeftConfig

    if not (folder / ADAPTER_CONFIG).is_file():
        raise ShoalError(f"{folder}: no {ADAPTER_CONFIG}; is this a PEFT LoRA adapter folder?")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # peft raises TypeError, ValueError, JSON errors... for a config it cannot read
        raise ShoalError(f"{folder / ADAPTER_CONFIG}: not a readable PEFT adapter config ({exc})") from exc
    if not isinstance(config, LoraConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ShoalError(f"{folder} is a PEFT adapter of type {kind}; shoal applies LoRA adapters only")
    for field, what in UNSUPPORTED.items():
        if getattr(config, field, None):
            raise ShoalError(f"{folder}: the adapter uses {what}, which shoal does not apply; merge it into its "
                             "model with PEFT's merge_and_unload() and name the merged folder instead")
    return config


def _scale(config, module: str) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """A module's rank and B A's scale, alpha / r (alpha / sqrt r with rsLoRA), through rank_ and alpha_pattern."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.lora_alpha
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), alpha)
    return r, alpha / (math.sqrt(r) if config.use_rslora else r)


_PAIRS = {".lora_A.weight": ("a", False), ".lora_B.weight": ("b", False),
          ".lora_embedding_A": ("a", True), ".lora_embedding_B": ("b", True)}
"""The suffixes of a LoRA's tensors in an adapter file: which factor, and whether the module is an embedding."""


def read_adapter(folder: Path) -> Adapter:
    """An adapter folder's config (read by PEFT) and tensors (read with safetensors); what it cannot mean as
    W + scale · B A is a ShoalError."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ShoalError(f"{folder}: no {ADAPTER_WEIGHTS}{pickle_hint(folder)}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ShoalError(f"{weights}: not a readable safetensors file ({exc})") from exc
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ShoalError(f"{weights}: tensor {key} does not start with {PREFIX!r}; not a PEFT adapter's file")
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in _PAIRS if name.endswith(s)), None)
        if suffix is None:
            if "lora_" in name:
                raise ShoalError(f"{weights}: tensor {key} is of a LoRA kind shoal does not apply")
            replaced[name.replace(".base_layer.", ".")] = tensor
            continue
        module = name.removesuffix(suffix)
        factor, embedding[module] = _PAIRS[suffix]
        factors.setdefault(module, {})[factor] = tensor
    low_rank = {}
    for module, pair in factors.items():
        if set(pair) != {"a", "b"}:
            raise ShoalError(f"{weights}: {module} has one of its two LoRA factors (A and B) only")
        if not check_target_module_exists(config, module):
            raise ShoalError(f"{weights}: holds a LoRA of {module}, which its config's target_modules does not name")
        a, b = pair["a"], pair["b"]
        r, scale = _scale(config, module)
        if a.ndim != 2 or b.ndim != 2:
            raise ShoalError(f"{weights}: {module}'s LoRA is not of a linear or embedding layer (its factors have "
                             f"shapes {tuple(a.shape)} and {tuple(b.shape)}); shoal applies those only")
        if a.shape[0] != r or b.shape[1] != r:
            raise ShoalError(f"{weights}: {module}'s LoRA factors have shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                             f"not of the rank r={r} that {ADAPTER_CONFIG} gives")
        transpose = embedding[module] or bool(config.fan_in_fan_out)
        low_rank[f"{module}.weight"] = LowRank(a, b, scale, transpose)
    return Adapter(low_rank, replaced)


def check_fits(adapter: Adapter, model: Checkpoint, where: str) -> None:
    """Every tensor the adapter changes exists in model with the adapter's shape."""
    changes = [(name, tuple(t.shape)) for name, t in adapter.replaced.items()]
    changes += [(name, (u.b.shape[0], u.a.shape[1])[:: -1 if u.transpose else 1]) for name, u in
                adapter.low_rank.items()]
    for name, shape in changes:
        if name not in model.tensors:
            raise ShoalError(f"{where}: the adapter changes {name}, which {model.path} does not have; was it trained "
                             "on another model?")
        if model.shape(name) != shape:
            raise ShoalError(f"{where}: the adapter makes {name} of shape {shape}, but it is {model.shape(name)} in "
                             f"{model.path} (an adapter that resizes the vocabulary is not applied)")


def _model_files(model: Checkpoint) -> list[str]:
    """The files of model that its merged copy is made of: config, weights (and index), tokenizer, processor."""
    small = ("config.json", INDEX_NAME, *TOKENIZER_FILES, *PROCESSOR_FILES)
    return [name for name in small if (model.path / name).is_file()] + sorted(
        {info.file.name for info in model.tensors.values()})


def _write(model: Checkpoint, adapter: Adapter, folder: Path, dtype: torch.dtype | None) -> None:
    """The merged model into folder: each of model's weight files with the adapter applied (its floating-point
    tensors in dtype, and config.json saying so, unless None), its other files copied."""
    for file in sorted({info.file for info in model.tensors.values()}):
        with safe_open(str(file), framework="pt") as handle:
            state = {name: apply_adapter(name, handle.get_tensor(name), adapter, dtype) for name in handle.keys()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / file.name), metadata={"format": "pt"})
    if dtype is None:
        shutil.copy2(model.path / "config.json", folder / "config.json")
    else:  # the model's config, saying the new dtype
        config = copy.deepcopy(model.config)
        layout.set_dtype(config, str(dtype).removeprefix("torch."))
        write_config(folder, config)
    if (model.path / INDEX_NAME).is_file():
        shutil.copy2(model.path / INDEX_NAME, folder / INDEX_NAME)
    copy_tokenizer(model.path, folder, processor=True)


def merged_folder(model: Path, adapter: Path, where: str) -> Path:
    """The model folder of model with adapter applied, in storage()'s lora dtype: LORA/KEY, LORA storage()'s lora
    folder ($XDG_CACHE_HOME/shoal/lora, ~/.cache/shoal/lora, by default) and KEY a digest of both folders' contents
    and the dtype, written once (atomically) and reused after."""
    applied = read_adapter(adapter)
    base = open_checkpoint(model)
    check_fits(applied, base, where)
    places = storage()
    key = hashlib.sha256("\n".join([
        FORMAT, files_digest(base.path, _model_files(base)), files_digest(adapter, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]),
        str(places.lora_dtype),
    ]).encode()).hexdigest()[:32]
    final = places.lora_folder / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(base, applied, tmp, places.lora_dtype)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():  # else another process made the same folder first: it is the one to use
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

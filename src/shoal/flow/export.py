"""Export a data-flow path as a plain model folder of the parents' architecture, seam scales folded into weights.

For a pre-norm residual block, out = x + Attn(norm(x)) then + MLP(norm(.)): every branch reads the residual
stream through an RMSNorm, which ignores a global scale of its input. So if the true stream is C times the
stored one, layer k with input scale s_k and C_k = s_1 ... s_k computes the same function as an unscaled
layer whose output projections (o_proj, down_proj) are divided by C_k, and the final norm removes C_T. The
only difference is RMSNorm's epsilon (sqrt(C^2 ms + eps) against C sqrt(ms + eps)), negligible when the mean
square ms of the stream is far above eps. A scale <= 0 cannot be folded (RMSNorm is odd, not sign-invariant),
nor can architectures whose branches are normalised after the projection (e.g. Gemma 2's sandwich norms):
those are refused, never exported as a different model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from shoal import layout
from shoal.checkpoint import card, files
from shoal.checkpoint.reader import Checkpoint, open_checkpoint
from shoal.checkpoint.writer import ModelFolderWriter, TensorSpec, atomic_output_dir
from shoal.errors import ShoalError
from shoal.flow.path import Step
from shoal.merge.plan import DTYPE_OF_TAG, output_config

FOLDABLE = ("llama", "mistral", "qwen2")
"""model_type of pre-norm RMSNorm blocks whose branches end in o_proj and down_proj, with no norm after them."""
OUTPUT_PROJECTIONS = (".self_attn.o_proj.", ".mlp.down_proj.")
PATH_FILE = "path.yaml"


def _check(parents: Mapping[str, Checkpoint], path: list[Step]) -> None:
    first = next(iter(parents))
    for name, ck in parents.items():
        kind = ck.config.get("model_type")
        if kind not in FOLDABLE:
            raise ShoalError(
                f"parent {name} is a {kind!r} model; seam scales can be folded exactly only into "
                f"{', '.join(FOLDABLE)} models, so this path is not exported"
            )
        for key in ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "attention_bias", "mlp_bias",
                    "hidden_act", "tie_word_embeddings"):
            if ck.config.get(key) != parents[first].config.get(key):
                raise ShoalError(f"parent {name} has {key} {ck.config.get(key)}, parent {first} {parents[first].config.get(key)}")
    for k, step in enumerate(path):
        if step.parent not in parents:
            raise ShoalError(f"path step {k} names parent {step.parent!r}, which is not given")
        count = parents[step.parent].num_layers or 0
        if not 0 <= step.layer < count:
            raise ShoalError(f"path step {k} names layer {step.layer} of {step.parent}, which has {count} layers")
        if not step.scale > 0:
            raise ShoalError(
                f"path step {k} scales its input by {step.scale}; a scale <= 0 cannot be folded into the weights "
                "(RMSNorm is not invariant to a sign flip), so this path is not exported"
            )


def check_exportable(parents: Mapping[str, str | Path]) -> None:
    """Refuse, before any search, parents whose paths could not be exported exactly (see the module's notes)."""
    _check({name: open_checkpoint(p) for name, p in parents.items()}, [])


def export_path(path: list[Step], parents: Mapping[str, str | Path], out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the path as a model folder: A's embeddings, norm and head around the path's layers, renumbered,
    each layer's output projections divided by the product of the scales up to it. Appears atomically."""
    opened = {name: open_checkpoint(p) for name, p in parents.items()}
    _check(opened, path)
    a = opened[next(iter(opened))]
    outer = {part: [n for n in a.names if layout.part(n) == part] for part in ("pre", "post")}
    jobs: list[tuple[TensorSpec, Checkpoint, str, float]] = []
    for name in outer["pre"]:
        jobs.append((TensorSpec(name, a.shape(name), _dtype(a, name)), a, name, 1.0))
    folded = 1.0
    for k, step in enumerate(path):
        folded *= step.scale
        source = opened[step.parent]
        for name in layout.layer_names(source.names, step.layer):
            divide = folded if any(p in f".{name}" for p in OUTPUT_PROJECTIONS) else 1.0
            jobs.append((TensorSpec(layout.with_layer(name, k), source.shape(name), _dtype(source, name)), source, name, divide))
    for name in outer["post"]:
        jobs.append((TensorSpec(name, a.shape(name), _dtype(a, name)), a, name, 1.0))
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ModelFolderWriter(tmp, [spec for spec, *_ in jobs])
        try:
            for spec, source, name, divide in jobs:
                tensor = source.tensor(name)
                if divide != 1.0:
                    tensor = (tensor.to(torch.float64) / divide).to(tensor.dtype)
                writer.write(spec.name, tensor)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        files.write_config(tmp, _config(a, opened, path))
        files.copy_tokenizer(a.path, tmp)
        steps = [{"parent": s.parent, "layer": s.layer, "scale": s.scale} for s in path]
        text = yaml.safe_dump({"parents": {k: str(v) for k, v in parents.items()}, "path": steps}, sort_keys=False)
        (tmp / PATH_FILE).write_text(text)
        card.write_model_card(
            tmp, name=out_dir.name, method="data-flow path", parents=[str(p) for p in parents.values()], base=None,
            recipe_file=PATH_FILE, recipe_text=text, remake=f"The layer path and its scales, also in `{PATH_FILE}`:",
        )
    return out_dir


def _config(a: Checkpoint, parents: Mapping[str, Checkpoint], path: list[Step]) -> dict:
    """A's config for the path's length, each per-layer list (e.g. layer_types) taken from the step's own parent."""
    config = output_config(a, [s.layer for s in path], None)
    for key, value in a.config.items():
        if isinstance(value, list) and len(value) == a.num_layers:
            config[key] = [parents[s.parent].config[key][s.layer] for s in path]
    return config


def _dtype(ck: Checkpoint, name: str) -> torch.dtype:
    return DTYPE_OF_TAG[ck.dtype(name)]

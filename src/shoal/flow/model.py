"""The path model: parent A's model whose decoder layers are, per candidate, the path's layers of the resident
parents (shared, not copied), each fed its input scale; switching paths is rewiring, not loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal.checkpoint.reader import resolve_model
from shoal.errors import ShoalError
from shoal.evaluate.runner import load_model
from shoal.flow.path import Step


class _PathLayer(nn.Module):
    """One position of the path: a parent's decoder layer, told its position (for the KV cache), input scaled."""

    def __init__(self, inner: nn.Module, position: int, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.position = position
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        self.inner.self_attn.layer_idx = self.position  # a layer used twice on the path keeps two cache entries
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.inner(hidden_states, *args, **kwargs)


def _decoder_layers(model: PreTrainedModel, name: str) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ShoalError(
            f"parent {name} ({type(model).__name__}) does not keep its decoder layers in model.layers with self_attn; "
            "data-flow merging supports Llama-family models (Llama, Mistral, Qwen2)"
        )
    return list(layers)


class PathModel:
    """Resident parents (the first is A: tokenizer, embeddings, final norm, head) and one live model to rewire."""

    def __init__(self, parents: Mapping[str, str | Path], device: str = "cpu") -> None:
        if not parents:
            raise ShoalError("data-flow merging needs at least one parent")
        self.names = list(parents)
        self.layers: dict[str, list[nn.Module]] = {}
        self.layer_types: dict[str, list[str]] = {}
        """Per-layer attention kinds (Qwen2, Mistral: config.layer_types), kept before A's config is rewritten."""
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        hidden = None
        for name, path in parents.items():
            model, tokenizer = load_model(resolve_model(str(path)), device)  # a Hub id: from the HF cache
            model.eval()
            size = model.config.hidden_size
            if hidden is not None and size != hidden:
                raise ShoalError(f"parent {name} has hidden size {size}, parent {self.names[0]} {hidden}")
            hidden = size
            self.layers[name] = _decoder_layers(model, name)
            if isinstance(getattr(model.config, "layer_types", None), list):
                self.layer_types[name] = list(model.config.layer_types)
            if self.model is None:
                self.model, self.tokenizer = model, tokenizer

    @property
    def layer_counts(self) -> tuple[int, ...]:
        return tuple(len(self.layers[name]) for name in self.names)

    def set_path(self, path: list[Step]) -> PreTrainedModel:
        """Make the live model run `path`; returns it (A's embeddings and head around the path's layers)."""
        assert self.model is not None
        for step in path:
            if step.parent not in self.layers or not 0 <= step.layer < len(self.layers[step.parent]):
                raise ShoalError(f"the path names layer {step.layer} of {step.parent}, which does not exist")
        wrapped = [_PathLayer(self.layers[s.parent][s.layer], k, s.scale) for k, s in enumerate(path)]
        self.model.model.layers = nn.ModuleList(wrapped)
        self.model.config.num_hidden_layers = len(path)
        if self.layer_types:
            self.model.config.layer_types = [self.layer_types[s.parent][s.layer] for s in path]
        return self.model

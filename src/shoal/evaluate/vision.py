"""Batched greedy generation from an image and a prompt with a transformers vision-language model and its processor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin
from transformers.generation import StoppingCriteria, StoppingCriteriaList

from shoal.errors import ShoalError
from shoal.evaluate import backend
from shoal.evaluate.metrics import cut_at_stop


def model_text(processor: ProcessorMixin, prompt: str) -> tuple[str, bool]:
    """The text the processor gets for an item's prompt, and whether the tokenizer should add its special tokens.

    A prompt that holds the processor's image token is used as written (the task places the image). Otherwise, if
    the processor has a chat template, the prompt becomes one user turn, the image then the text, followed by the
    generation prompt (the template adds the special tokens); else the image token and a newline are put before it.
    """
    token = getattr(processor, "image_token", None)
    if token and token in prompt:
        return prompt, True
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False), False
    if token:
        return f"{token}\n{prompt}", True
    raise ShoalError(f"{type(processor).__name__} has neither an image_token nor a chat template, so shoal cannot "
                     "place the image in the prompt; write the model's image placeholder in each prompt")


def load_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def encode(
    processor: ProcessorMixin, prompts: Sequence[str], images: Sequence[Path], batch_size: int
) -> list[tuple[list[int], BatchFeature]]:
    """(item indices, processor inputs left-padded) per batch; batches group prompts of similar token length that
    take the same special-token rule (see model_text), longest first."""
    texts = [model_text(processor, p) for p in prompts]
    lengths = [len(ids) for ids in processor.tokenizer([t for t, _ in texts], verbose=False)["input_ids"]]
    batches = []
    for special in (True, False):
        group = [i for i, (_, s) in enumerate(texts) if s == special]
        for batch in backend.length_batches([lengths[i] for i in group], batch_size):
            indices = [group[i] for i in batch]
            inputs = processor(
                text=[texts[i][0] for i in indices], images=[load_image(images[i]) for i in indices],
                padding=True, padding_side="left", add_special_tokens=special, return_tensors="pt",
            )
            batches.append((indices, inputs))
    return batches


class _StopStrings(StoppingCriteria):
    """True for the rows whose generated text holds a stop string, checked when they just emitted a trigger token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], triggers: Sequence[int], width: int):
        self.tokenizer, self.stop, self.width = tokenizer, stop, width
        self.triggers = torch.tensor(sorted(triggers), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        hits = torch.isin(input_ids[:, -1], self.triggers.to(input_ids.device)).nonzero().flatten().tolist()
        if hits:
            texts = self.tokenizer.batch_decode(input_ids[hits, self.width:].tolist(), skip_special_tokens=True)
            for row, text in zip(hits, texts):
                done[row] = any(s in text for s in self.stop)
        return done


def _greedy(max_new_tokens: int, eos: Sequence[int], pad: int) -> GenerationConfig:
    """Plain greedy decoding: every setting that generate() would otherwise take from the model's own
    generation_config (sampling, repetition penalties, ...) is set to transformers' neutral default."""
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    settings = {**defaults, "do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens,
                "eos_token_id": list(eos), "pad_token_id": pad, "return_dict_in_generate": False}
    settings.pop("max_length", None)
    return GenerationConfig(**settings)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batches: Sequence[tuple[list[int], BatchFeature]],
    *,
    max_new_tokens: int,
    stop: Sequence[str],
    triggers: Sequence[int],
) -> dict[int, str]:
    """Greedy continuation of each batch (from encode), by item index: decoded without special tokens, cut at the
    first stop string. Rows stop as in backend.generate: at EOS, or once their text holds a stop string."""
    eos = backend.eos_ids(model, tokenizer)
    config = _greedy(max_new_tokens, eos, backend.padding_id(tokenizer))
    outputs = {}
    for indices, inputs in batches:
        inputs = inputs.to(model.device)
        inputs = BatchFeature({k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()})
        width = inputs["input_ids"].shape[1]
        criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, triggers, width)] if stop else [])
        new = model.generate(**inputs, generation_config=config, stopping_criteria=criteria)[:, width:].tolist()
        new = [row[: next((n for n, t in enumerate(row) if t in eos), len(row))] for row in new]
        for i, text in zip(indices, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[i] = cut_at_stop(text, stop)
    return outputs

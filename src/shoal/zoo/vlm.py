"""A tiny LLaVA whose language model is the zoo's base: made from the base, trained to caption pictures, saved."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from shoal.zoo.tokenizer import IMAGE
from shoal.zoo.train import Batch, Schedule, fit


@dataclass(frozen=True)
class VisionShape:
    side: int  # pixels of the (square) picture
    patch: int  # pixels of a patch's side: (side / patch)^2 image tokens
    hidden: int
    layers: int
    heads: int
    intermediate: int


def vlm_config(vision: VisionShape, text_config: dict, image_token_id: int) -> LlavaConfig:
    """A LLaVA of a CLIP vision tower (all of its patch features from the last layer, CLS dropped) and a two-layer
    GELU projector in front of the given Llama."""
    tower = CLIPVisionConfig(
        hidden_size=vision.hidden, intermediate_size=vision.intermediate, num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads, image_size=vision.side, patch_size=vision.patch, projection_dim=vision.hidden,
    )
    return LlavaConfig(
        vision_config=tower, text_config=text_config, image_token_index=image_token_id, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=(vision.side // vision.patch) ** 2,
        tie_word_embeddings=False,
    )


def vlm_processor(base: Path, vision: VisionShape) -> LlavaProcessor:
    """The base's tokenizer with `<image>` as its image token, and a CLIP image processor at the tower's side."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base, extra_special_tokens={"image_token": IMAGE})
    images = CLIPImageProcessorPil(size={"shortest_edge": vision.side}, crop_size={"height": vision.side, "width": vision.side})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision.patch, image_token=IMAGE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def from_base(base: Path, vision: VisionShape, seed: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA whose language model and head hold the base's weights (equal, tensor by tensor) and whose vision tower
    and projector are freshly initialised from seed; with its processor."""
    text = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    processor = vlm_processor(base, vision)
    torch.manual_seed(seed)
    text_config = {k: v for k, v in text.config.to_dict().items() if k != "_name_or_path"}  # keep the folder movable
    model = LlavaForConditionalGeneration(vlm_config(vision, text_config, processor.image_token_id))
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.config.text_config._attn_implementation = "eager"  # as the zoo's training: faster for short sequences
    return model.eval(), processor


def pixels(processor: LlavaProcessor, pictures: Sequence[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images=list(pictures), return_tensors="pt")["pixel_values"]


@dataclass(frozen=True)
class Examples:
    """Training examples: pictures (as pixel values) and the token ids and labels of prompt + caption + EOS."""

    pixel_values: torch.Tensor  # (n, 3, side, side)
    input_ids: torch.Tensor  # (n, length)
    labels: torch.Tensor  # (n, length): -100 except on the caption and EOS


def examples(processor: LlavaProcessor, pictures: Sequence[Image.Image], prompts: Sequence[str], captions: Sequence[str]) -> Examples:
    """Each picture with its prompt (which holds the image token) and caption, tokenised as the processor does at
    evaluation time (`<bos>`, image tokens expanded), then the caption and `<eos>`; loss on the caption and EOS only."""
    tokenizer = processor.tokenizer
    rows, labels = [], []
    known: dict[str, list[int]] = {}
    for prompt, caption in zip(prompts, captions, strict=True):
        if prompt not in known:
            known[prompt] = list(processor(text=[prompt], images=[pictures[0]])["input_ids"][0])
        prompt_ids = known[prompt]
        answer = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer)
        labels.append([-100] * len(prompt_ids) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], y[i, : len(lab)] = torch.tensor(r), torch.tensor(lab)
    return Examples(pixels(processor, pictures), ids, y)


def train_vlm(
    model: LlavaForConditionalGeneration, data: Examples, schedule: Schedule, seed: int, lm_lr_ratio: float = 1.0,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train model in place on batches drawn from data (the zoo's `fit`): the vision tower and projector at the
    schedule's rate, the language model at lm_lr_ratio times it (0: frozen, LLaVA's first, alignment stage).
    Returns each step's loss."""
    language = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    chosen = {id(p) for p in language}
    fresh = [p for p in model.parameters() if id(p) not in chosen]
    groups = [{"params": fresh, "scale": 1.0}]
    if lm_lr_ratio > 0:
        groups.append({"params": language, "scale": lm_lr_ratio})
    n = data.input_ids.shape[0]

    def next_batch(rng: random.Random) -> Batch:
        batch = torch.tensor([rng.randrange(n) for _ in range(schedule.batch_size)])
        return {"input_ids": data.input_ids[batch], "pixel_values": data.pixel_values[batch], "labels": data.labels[batch]}

    for p in language:
        p.requires_grad_(lm_lr_ratio > 0)
    try:
        return fit(model, next_batch, schedule, seed, on_step, groups=groups)
    finally:
        for p in language:
            p.requires_grad_(True)

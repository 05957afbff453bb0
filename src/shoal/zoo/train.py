"""Training the zoo's models (AdamW, linear warm-up, cosine decay, clipping) and writing them as model folders."""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from shoal.checkpoint.files import write_config

from shoal.zoo.language import Sampler


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


def llama_config(shape: ModelShape, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def learning_rate(step: int, s: Schedule) -> float:
    """Linear warm-up to s.lr, then cosine decay to s.lr * s.min_lr_ratio at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_batch(docs: list[str], tokenizer: Tokenizer, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `<bos> doc <eos>` right-padded to the longest doc, and labels with padding masked out (-100)."""
    rows = [enc.ids + [eos_id] for enc in tokenizer.encode_batch(docs)]
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
    y = x.masked_fill(x == pad_id, -100)
    return x, y


Batch = dict[str, torch.Tensor]  # the model's keyword inputs for one step, labels included


def fit(
    model: PreTrainedModel,
    next_batch: Callable[[random.Random], Batch],
    schedule: Schedule,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    until: Callable[[int], bool] | None = None,
    groups: list[dict[str, Any]] | None = None,
) -> list[float]:
    """Train model in place on batches drawn by next_batch(rng); return the loss of every step taken.

    AdamW (β 0.9/0.95, no weight decay), the schedule's warm-up and cosine, clipping. `groups` are AdamW parameter
    groups with a "scale" each, the share of the schedule's rate they train at (default: every parameter at 1).
    until(step), if given, is asked after every step (the model in eval mode) and ends training when it says so;
    the learning rate follows the whole schedule either way."""
    rng = random.Random(seed)
    groups = groups or [{"params": list(model.parameters()), "scale": 1.0}]
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule) * group["scale"]
        loss = model(**next_batch(rng)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1)
        if until:
            model.eval()
            done = until(step + 1)
            model.train()
            if done:
                break
    model.eval()
    return losses


def train(
    model: LlamaForCausalLM,
    sample: Sampler,
    tokenizer: Tokenizer,
    schedule: Schedule,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    until: Callable[[int], bool] | None = None,
) -> list[float]:
    """Train model in place on documents drawn from sample (see fit); return the loss of every step taken."""
    config = model.config

    def next_batch(rng: random.Random) -> Batch:
        docs = [sample(rng) for _ in range(schedule.batch_size)]
        x, y = get_batch(docs, tokenizer, config.eos_token_id, config.pad_token_id)
        return {"input_ids": x, "labels": y}

    return fit(model, next_batch, schedule, seed, on_step, until)


def save_model(model: PreTrainedModel, preprocessor: Any, folder: Path) -> Path:
    """Write an HF model folder atomically: fp32 safetensors, config.json (architectures = the model's class) and
    what preprocessor.save_pretrained writes (a tokenizer, or a VLM's processor with its tokenizer)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_config(tmp, model.config.to_dict() | {"architectures": [type(model).__name__], "dtype": "float32"})
    preprocessor.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder

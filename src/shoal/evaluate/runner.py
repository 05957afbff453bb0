"""Evaluate one model on one split of a task: load or take the model, tokenise (cached), run the backend, score."""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from shoal.errors import ShoalError
from shoal.evaluate import backend, metrics
from shoal.evaluate.task import GENERATION_METRICS, Task


@dataclass
class EvalResult:
    """The mean item score and what went into it; outputs (generated text, or the picked choice) only when asked."""

    task: str
    split: str
    metric: str
    score: float
    n: int
    constraint_failures: dict[str, int]
    seconds: float
    outputs: list[str] | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON-ready fields (everything but outputs)."""
        return {
            "task": self.task, "split": self.split, "metric": self.metric, "score": self.score, "n": self.n,
            "constraint_failures": self.constraint_failures, "seconds": self.seconds,
        }


class Generator(Protocol):
    """Another engine for the generation metrics (e.g. `VllmEngine`), holding the model being evaluated."""

    def generate(self, prompts: Sequence[list[int]], *, max_new_tokens: int, stop: Sequence[str]) -> list[str]: ...


_fingerprints: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_anonymous = count()


def _fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Equal for tokenizers that encode alike (fast tokenizers loaded from equal files); computed once per object."""
    if tokenizer not in _fingerprints:
        core = getattr(tokenizer, "backend_tokenizer", None)
        if core is None:
            _fingerprints[tokenizer] = f"object {next(_anonymous)}"
        else:
            text = core.to_str() + repr(sorted(tokenizer.special_tokens_map.items()))
            _fingerprints[tokenizer] = hashlib.sha256(text.encode()).hexdigest()
    return _fingerprints[tokenizer]


def _encoded(task: Task, split: str, tokenizer: PreTrainedTokenizerBase, limit: int | None) -> Any:
    """The split's items tokenised for the task's metric, cached on the task per (split, tokenizer, limit)."""
    key = (split, _fingerprint(tokenizer), limit)
    if key not in task.cache:
        items = task.items(split)[:limit]
        if task.metric in GENERATION_METRICS:
            triggers = backend.stop_triggers(tokenizer, task.spec.stop) if task.spec.stop else []
            task.cache[key] = (backend.encode_prompts(tokenizer, [it.prompt for it in items]), triggers)
        else:
            multiple = task.metric == "multiple_choice"
            pairs = [(it.prompt, c) for it in items for c in (it.choices if multiple else [it.answer])]
            encoded = backend.encode_continuations(tokenizer, pairs)
            for (prompt, text), (_, ids) in zip(pairs, encoded):
                if not ids:
                    raise ShoalError(f"task {task.name}, {split}: continuation {text!r} of {prompt!r} has no tokens")
            task.cache[key] = encoded
    return task.cache[key]


def load_model(path: str | Path, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from an HF folder, in the dtype the folder stores."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ShoalError(f"{path} is not a model folder (no config.json); pass a folder written by save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device)
    except (OSError, ValueError) as exc:
        raise ShoalError(f"{path}: cannot load the model ({exc})") from exc
    return model, load_tokenizer(path)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError) as exc:
        raise ShoalError(f"{path}: cannot load a tokenizer ({exc})") from exc


def _score(task: Task, split: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int,
           limit: int | None, generator: Generator | None) -> tuple[list[float], dict[str, int], list[str] | None]:
    spec, items = task.spec, task.items(split)[:limit]
    failures = {c.name: 0 for c in spec.constraints}
    if task.metric == "answer_logprob":
        logps = backend.loglikelihoods(model, tokenizer, _encoded(task, split, tokenizer, limit), batch_size=batch_size)
        return [sum(lp) / len(lp) for lp in logps], failures, None
    if task.metric == "multiple_choice":
        logps = backend.loglikelihoods(model, tokenizer, _encoded(task, split, tokenizer, limit), batch_size=batch_size)
        sums, scores, picked, start = [sum(lp) for lp in logps], [], [], 0
        for it in items:
            assert it.choices is not None  # validated at load
            mine = sums[start:start + len(it.choices)]
            start += len(it.choices)
            scores.append(metrics.multiple_choice(mine, it.choices, it.answer))
            picked.append(it.choices[metrics.best_choice(mine)])
        return scores, failures, picked
    prompts, triggers = _encoded(task, split, tokenizer, limit)
    if generator is not None:
        outputs = generator.generate(prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop)
    else:
        outputs = backend.generate(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop,
                                   triggers=triggers, batch_size=batch_size)
    scores = []
    for it, out in zip(items, outputs):
        failed = metrics.failed_constraints(out, spec.constraints)
        for name in failed:
            failures[name] += 1
        if failed:
            scores.append(0.0)
        elif task.metric == "exact_match":
            scores.append(metrics.exact_match(out, it.answer, spec.normalize))
        elif task.metric == "last_number":
            scores.append(metrics.last_number(out, it.answer))
        else:
            scores.append(metrics.regex_match(out, it.answer, spec.pattern or "", spec.normalize))
    return scores, failures, outputs


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    return asked.type == actual.type and asked.index in (None, actual.index)


def evaluate(
    model_or_path: str | Path | PreTrainedModel,
    task: Task,
    split: str = "dev",
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | None = None,
    return_outputs: bool = False,
    generator: Generator | None = None,
) -> EvalResult:
    """Score a model (a folder, or a loaded model used where it is) on the first `limit` items of a task's split.

    seconds counts tokenising, the model's forward passes and scoring, not loading a folder.
    device applies to a folder (default cpu). A loaded model needs tokenizer= (the object or its folder). Nothing
    that depends on the weights is cached, so a model whose weights change between calls is scored afresh.
    generator, if given, produces the outputs of a generation metric instead of the model (which must hold the
    same weights); log-likelihood metrics always use the model.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ShoalError("batch_size and limit must be at least 1")
    task.items(split)
    if isinstance(model_or_path, (str, Path)):
        model, own_tokenizer = load_model(model_or_path, device or "cpu")
        tokenizer = tokenizer or own_tokenizer
    else:
        model = model_or_path
        if device is not None and not _same_device(torch.device(device), model.device):
            raise ShoalError(f"the model is on {model.device}, not {device}; move it or leave device out")
    if tokenizer is None:
        raise ShoalError("a loaded model needs tokenizer= (a tokenizer or the folder to load it from)")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    start = time.perf_counter()
    training = model.training
    model.eval()
    try:
        scores, failures, outputs = _score(task, split, model, tokenizer, batch_size, limit, generator)
    finally:
        model.train(training)
    return EvalResult(
        task=task.name,
        split=split,
        metric=task.metric,
        score=sum(scores) / len(scores),
        n=len(scores),
        constraint_failures=failures,
        seconds=time.perf_counter() - start,
        outputs=outputs if return_outputs else None,
    )

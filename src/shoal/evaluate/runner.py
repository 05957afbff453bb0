"""Evaluate one model on one split of a task: load or take the model, tokenise (cached), run the backend, score."""

from __future__ import annotations

import hashlib
import json
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
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from shoal import layout
from shoal.checkpoint.reader import check_weights, pickle_hint, read_json_object
from shoal.devices import check_device
from shoal.errors import ShoalError
from shoal.evaluate import backend, metrics, vision
from shoal.evaluate.task import GENERATION_METRICS, Item, Task


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
    tokens: int = 0
    """Tokens generated (the outputs as the tokenizer counts them); 0 for log-likelihood metrics."""
    item_scores: list[float] = field(default_factory=list, repr=False)
    """Each item's score, in the split's order (score is their mean)."""

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


def _processor_fingerprint(processor: ProcessorMixin) -> str:
    """Equal for processors that prepare inputs alike (equal tokenizers, image processors and chat templates)."""
    if processor not in _fingerprints:
        text = _fingerprint(processor.tokenizer) + processor.to_json_string() + str(processor.chat_template)
        _fingerprints[processor] = hashlib.sha256(text.encode()).hexdigest()
    return _fingerprints[processor]


def _encoded(task: Task, split: str, tokenizer: PreTrainedTokenizerBase, limit: int | None) -> Any:
    """The split's items without an image tokenised for the task's metric, cached on the task per (split,
    tokenizer, limit)."""
    key = (split, _fingerprint(tokenizer), limit)
    if key not in task.cache:
        items = [it for it in task.items(split)[:limit] if it.image is None]
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


def _encoded_images(task: Task, split: str, processor: ProcessorMixin, limit: int | None, batch_size: int) -> Any:
    """The split's items with an image as processor batches (see vision.encode) and the stop-string triggers,
    cached on the task per (split, processor, limit, batch size)."""
    key = ("images", split, _processor_fingerprint(processor), limit, batch_size)
    if key not in task.cache:
        indexed = [(i, it.prompt, task.folder / it.image) for i, it in enumerate(task.items(split)[:limit])
                   if it.image is not None]
        batches = vision.encode(processor, [p for _, p, _ in indexed], [f for _, _, f in indexed], batch_size)
        batches = [([indexed[i][0] for i in indices], inputs) for indices, inputs in batches]
        triggers = backend.stop_triggers(processor.tokenizer, task.spec.stop) if task.spec.stop else []
        task.cache[key] = (batches, triggers)
    return task.cache[key]


def is_vision_language(path: str | Path) -> bool:
    """Whether the model folder holds a vision-language model (see layout.is_multimodal)."""
    try:
        return layout.is_multimodal(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def load_model(
    path: str | Path, device: str, *, allow_pickle: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | ProcessorMixin]:
    """A model and what prepares its inputs from an HF folder, in the dtype the folder stores: a causal LM and its
    tokenizer, or (see is_vision_language) an image-text-to-text model and its processor (its tokenizer where the
    processor cannot be built, e.g. without torchvision: then only text tasks can be scored).

    Only safetensors weights are read, checked from their headers first, unless allow_pickle: then PyTorch pickle
    files (*.bin), which can run code when loaded, are accepted too."""
    path = Path(path)
    check_device(device)
    if not (path / "config.json").is_file():
        raise ShoalError(f"{path} is not a model folder (no config.json); pass a folder written by save_pretrained")
    read_json_object(path / "config.json", "config.json")
    if not allow_pickle:
        try:
            check_weights(path)
        except ShoalError as exc:
            if not pickle_hint(path):
                raise
            raise ShoalError(f"{exc}; or, if you trust it, pass --allow-pickle (allow_pickle=True)") from None
    vlm = is_vision_language(path)
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype="auto", use_safetensors=None if allow_pickle else True).to(device)
    except (OSError, ValueError) as exc:
        raise ShoalError(f"{path}: cannot load the model ({exc})") from exc
    if vlm:
        try:
            return model, load_processor(path)
        except ShoalError:  # e.g. Qwen2-VL's processor needs torchvision: text tasks still run on the tokenizer
            pass
    return model, load_tokenizer(path)


def load_processor(path: str | Path) -> ProcessorMixin:
    try:
        processor = AutoProcessor.from_pretrained(Path(path))
    except (OSError, ValueError, ImportError) as exc:  # ImportError: e.g. Qwen2-VL's processor needs torchvision
        raise ShoalError(f"{path}: cannot load a processor ({exc})") from exc
    if not isinstance(processor, ProcessorMixin):
        raise ShoalError(f"{path}: found a {type(processor).__name__}, not a processor for images and text; save "
                         "the model's processor (e.g. LlavaProcessor) with save_pretrained")
    return processor


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A folder whose tokenizer fails to load and holds none of these has no tokenizer (transformers blames a backend)."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError) as exc:
        folder = Path(path)
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
            raise ShoalError(f"{path}: no tokenizer in the folder (none of {', '.join(TOKENIZER_MARKERS)}); a merge "
                             "written with --no-copy-tokenizer has none: copy a parent's tokenizer files into it"
                             ) from exc
        raise ShoalError(f"{path}: cannot load a tokenizer ({exc})") from exc


def _outputs(task: Task, split: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             processor: ProcessorMixin | None, batch_size: int, limit: int | None,
             generator: Generator | None) -> list[str]:
    """Generated text of each item: items with an image through the processor and the model, the others as text
    prompts through the generator if given, else the model."""
    spec, items = task.spec, task.items(split)[:limit]
    outputs = [""] * len(items)
    if any(it.image is None for it in items):
        prompts, triggers = _encoded(task, split, tokenizer, limit)
        if generator is not None:
            texts = generator.generate(prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop)
        else:
            texts = backend.generate(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop,
                                     triggers=triggers, batch_size=batch_size)
        for i, text in zip([i for i, it in enumerate(items) if it.image is None], texts):
            outputs[i] = text
    if any(it.image is not None for it in items):
        assert processor is not None  # evaluate() refuses image items without one
        batches, triggers = _encoded_images(task, split, processor, limit, batch_size)
        found = vision.generate(model, processor.tokenizer, batches, max_new_tokens=spec.max_new_tokens,
                                stop=spec.stop, triggers=triggers)
        for i, text in found.items():
            outputs[i] = text
    return outputs


def _item_score(task: Task, item: Item, output: str) -> float:
    spec = task.spec
    if task.metric == "exact_match":
        return metrics.exact_match(output, item.answer, spec.normalize)
    if task.metric == "last_number":
        return metrics.last_number(output, item.answer)
    if task.metric == "rouge_l":
        return metrics.rouge_l(output, item.answer, spec.normalize)
    if task.metric == "token_f1":
        return metrics.token_f1(output, item.answer, spec.normalize)
    return metrics.regex_match(output, item.answer, spec.pattern or "", spec.normalize)


def _score(task: Task, split: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
           processor: ProcessorMixin | None, batch_size: int, limit: int | None,
           generator: Generator | None) -> tuple[list[float], dict[str, int], list[str] | None]:
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
    outputs = _outputs(task, split, model, tokenizer, processor, batch_size, limit, generator)
    scores = []
    for it, out in zip(items, outputs):
        failed = metrics.failed_constraints(out, spec.constraints)
        for name in failed:
            failures[name] += 1
        scores.append(0.0 if failed else _item_score(task, it, out))
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
    processor: ProcessorMixin | str | Path | None = None,
) -> EvalResult:
    """Score a model (a folder, or a loaded model used where it is) on the first `limit` items of a task's split.

    seconds counts tokenising, the model's forward passes and scoring, not loading a folder.
    device applies to a folder (default cpu). A loaded model needs tokenizer= (the object or its folder). Nothing
    that depends on the weights is cached, so a model whose weights change between calls is scored afresh.
    generator, if given, produces the outputs of a generation metric instead of the model (which must hold the
    same weights); log-likelihood metrics and items with an image always use the model.

    Items with an image need a vision-language model: a folder that load_model loads as one, or a loaded model
    and processor= (the object or its folder; tokenizer= then defaults to the processor's tokenizer). A processor
    passed as tokenizer= counts as processor=, so load_model's pair can be passed on as it is for either kind.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ShoalError("batch_size and limit must be at least 1")
    items = task.items(split)[:limit]
    if isinstance(model_or_path, (str, Path)):
        model, own = load_model(model_or_path, device or "cpu")
        tokenizer = tokenizer or own
    else:
        model = model_or_path
        if device is not None and not _same_device(torch.device(device), model.device):
            raise ShoalError(f"the model is on {model.device}, not {device}; move it or leave device out")
    if isinstance(tokenizer, ProcessorMixin):
        processor, tokenizer = processor or tokenizer, None
    if isinstance(processor, (str, Path)):
        processor = load_processor(processor)
    if tokenizer is None and processor is not None:
        tokenizer = processor.tokenizer
    if tokenizer is None:
        raise ShoalError("a loaded model needs tokenizer= (a tokenizer or the folder to load it from)")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    pictured = next((it for it in items if it.image is not None), None)
    if pictured is not None and processor is None:
        raise ShoalError(f"task {task.name} ({split}) has items with an image (e.g. {pictured.image}) and the model "
                         f"{type(model).__name__} is scored as a text model; give a vision-language model folder "
                         "(its config.json has vision_config) or pass processor=")
    start = time.perf_counter()
    training = model.training
    model.eval()
    try:
        scores, failures, outputs = _score(task, split, model, tokenizer, processor, batch_size, limit, generator)
    finally:
        model.train(training)
    seconds = time.perf_counter() - start
    generated = outputs is not None and task.metric in GENERATION_METRICS
    return EvalResult(
        task=task.name,
        split=split,
        metric=task.metric,
        score=sum(scores) / len(scores),
        n=len(scores),
        constraint_failures=failures,
        seconds=seconds,
        outputs=outputs if return_outputs else None,
        tokens=sum(len(tokenizer.encode(out, add_special_tokens=False)) for out in outputs) if generated else 0,
        item_scores=scores,
    )

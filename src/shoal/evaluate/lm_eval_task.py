"""A task of lm-evaluation-harness scored on a live model through lm-eval's own API (no model written to disk).

The task comes from lm-eval's registry or from YAML files under `include` (local data files: no hub is needed).
shoal's splits map onto the task's (dev -> validation, test -> test by default): the chosen split is made the
one lm-eval evaluates. lm-eval is optional: `pip install lm_eval`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal.errors import ShoalError


@dataclass
class LmEvalTask:
    task: str
    include: str | None = None
    metric: str | None = None
    """lm-eval's result key, e.g. "exact_match,none"; default: the task's first metric with the "none" filter."""
    splits: dict[str, str] = field(default_factory=lambda: {"dev": "validation", "test": "test"})
    _tasks: dict[str, Any] = field(default_factory=dict, repr=False)
    _adapter_of: tuple[int, Any] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.task

    def digest(self, portable: bool = False) -> str:
        """One digest of what the task's scores depend on beside what the search file names: lm-eval's version and
        every file under include (the task's YAML, its utils, data kept there; not hidden ones, such as .git, nor
        __pycache__); not a dataset in the datasets cache. portable: alike for a copy on another machine
        (checkpoint.digest.file_digest)."""
        from importlib.metadata import PackageNotFoundError, version

        from shoal.checkpoint.digest import files_digest

        try:
            lm_eval = version("lm_eval")
        except PackageNotFoundError:
            raise ShoalError("lm-eval tasks need lm-evaluation-harness: pip install lm_eval") from None
        root = Path(self.include) if self.include is not None else None
        files = [] if root is None else [str(f.relative_to(root)) for f in root.rglob("*") if f.is_file() and not any(
            part.startswith(".") or part == "__pycache__" for part in f.relative_to(root).parts)]
        return f"lm_eval {lm_eval} " + (files_digest(root, files, portable) if root is not None else "registry")

    def _task_dict(self, split: str) -> Any:
        """lm-eval's task dict with `split` as the split it evaluates (loaded once per split)."""
        if split not in self._tasks:
            try:
                from lm_eval.tasks import TaskManager
            except ImportError as exc:
                raise ShoalError("lm-eval tasks need lm-evaluation-harness: pip install lm_eval") from exc
            if split not in self.splits:
                raise ShoalError(f"lm-eval task {self.task}: no split mapped to shoal's {split!r} (splits: {self.splits})")
            logging.getLogger("lm_eval").setLevel(logging.ERROR)
            manager = TaskManager(include_path=self.include)
            try:
                loaded = manager.load([self.task])
            except (KeyError, ValueError) as exc:
                raise ShoalError(f"lm-eval cannot load task {self.task!r} (include: {self.include}): {exc}") from exc
            task = loaded["tasks"].get(self.task)
            if task is None:
                raise ShoalError(f"lm-eval has no task {self.task!r} (include: {self.include})")
            task.config.test_split = self.splits[split]
            self._tasks[split] = loaded
        return self._tasks[split]

    def _adapter(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> Any:
        """lm-eval's HF wrapper around the live model, kept while the same model object is scored (its weights
        change in place between trials); only the last one is kept, so scored models can be freed."""
        from lm_eval.models.huggingface import HFLM

        if self._adapter_of is None or self._adapter_of[0] != id(model):
            self._adapter_of = (id(model), HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                                device=str(model.device)))
        return self._adapter_of[1]

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: str, batch_size: int) -> float:
        from lm_eval.evaluator import evaluate as lm_evaluate

        task_dict = self._task_dict(split)
        results = lm_evaluate(self._adapter(model, tokenizer, batch_size), task_dict, bootstrap_iters=0,
                              log_samples=False, verbosity="ERROR")["results"][self.task]
        reported = [k for k in results if k.endswith(",none") and not k.endswith("_stderr,none")]
        metric = self.metric or (reported[0] if reported else "")
        if metric not in results:
            raise ShoalError(f"lm-eval task {self.task} reports no {metric!r} (it reports {sorted(results)})")
        return float(results[metric])

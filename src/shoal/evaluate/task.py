"""Evaluation tasks on disk (a folder with task.yaml and one JSONL file per split), validated into a Task."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shoal import yamlfile
from shoal.errors import ShoalError

GENERATION_METRICS = ("exact_match", "last_number", "regex", "rouge_l", "token_f1")
LOGLIKELIHOOD_METRICS = ("multiple_choice", "answer_logprob")
Metric = Literal["exact_match", "last_number", "regex", "rouge_l", "token_f1", "multiple_choice", "answer_logprob"]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r} ({exc})") from exc
    return pattern


class Normalize(BaseModel):
    """How output and answer are normalised before exact_match, regex, rouge_l and token_f1 compare them."""

    model_config = ConfigDict(extra="forbid")
    lowercase: bool = False
    collapse_whitespace: bool = True
    strip: bool = True


class VocabularyConstraint(BaseModel):
    """Every whitespace-separated token of the output is one of words."""

    model_config = ConfigDict(extra="forbid")
    name: str
    type: Literal["vocabulary"]
    words: list[str]


class CharsetConstraint(BaseModel):
    """Every character of the output other than whitespace is one of chars."""

    model_config = ConfigDict(extra="forbid")
    name: str
    type: Literal["charset"]
    chars: str


class RegexConstraint(BaseModel):
    """The output, stripped of surrounding whitespace, fullmatches pattern."""

    model_config = ConfigDict(extra="forbid")
    name: str
    type: Literal["regex"]
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        return _compiles(value)


Constraint = Annotated[VocabularyConstraint | CharsetConstraint | RegexConstraint, Field(discriminator="type")]


class TaskSpec(BaseModel):
    """task.yaml. For metric regex, pattern is searched in the output; its first group (or the whole match) is the
    extracted answer, compared with the gold answer by exact match after normalisation."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    metric: Metric
    pattern: str | None = None
    normalize: Normalize = Normalize()
    max_new_tokens: int = Field(32, ge=1)
    stop: list[str] = []
    constraints: list[Constraint] = []
    splits: dict[str, str]

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return value if value is None else _compiles(value)

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, value: list[str]) -> list[str]:
        if "" in value:
            raise ValueError("a stop string cannot be empty")
        return value


class Item(BaseModel):
    """One JSONL row; other keys are kept out of the way (ignored). image is a file path relative to the task folder."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)
    prompt: str
    answer: str
    choices: list[str] | None = None
    image: str | None = None


@dataclass
class Task:
    """A validated task: its spec, its folder and the items of every split."""

    spec: TaskSpec
    folder: Path
    splits: dict[str, list[Item]]
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # tokenised items, see runner

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.metric

    def items(self, split: str) -> list[Item]:
        if split not in self.splits:
            raise ShoalError(f"task {self.name} has no split {split!r} (it has: {', '.join(self.splits)})")
        return self.splits[split]

    def digest(self, portable: bool = False) -> str:
        """One digest of what the task's scores depend on: its task.yaml, its split files and the pictures its items
        name (portable: alike for a copy on another machine, checkpoint.digest.file_digest)."""
        from shoal.checkpoint.digest import files_digest

        pictures = {item.image for items in self.splits.values() for item in items if item.image is not None}
        return files_digest(self.folder, ["task.yaml", *self.spec.splits.values(), *pictures], portable)


def _problem(model: type[BaseModel], err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return f"missing {loc!r}"
    message = yamlfile.message_of(model, err, tuple(err["loc"]))
    return f"{loc}: {message}" if loc else message


def _inconsistency(spec: TaskSpec) -> tuple[str, str] | None:
    """(key, problem) for the first rule that spans several keys and that spec breaks."""
    if (spec.metric == "regex") != (spec.pattern is not None):
        return "metric", "metric: regex needs a pattern, and only metric: regex uses one"
    if spec.constraints and spec.metric in LOGLIKELIHOOD_METRICS:
        return "constraints", f"constraints check generated output; metric {spec.metric} generates none"
    names = [c.name for c in spec.constraints]
    if len(set(names)) != len(names):
        return "constraints", f"constraint names must be unique, got {names}"
    if not spec.splits:
        return "splits", "splits must name at least one split, e.g. {dev: dev.jsonl}"
    return None


def parse_spec(text: str, source: str) -> TaskSpec:
    """Validate task.yaml's text; every problem is a ShoalError naming the file and line."""
    data, node = yamlfile.parse(text, source)
    if not isinstance(data, dict):
        raise ShoalError(f"{source}: a task is a YAML mapping with at least name, metric and splits")
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if p not in ("vocabulary", "charset", "regex"))  # union tags
        raise ShoalError(f"{source}:{yamlfile.line_of(node, loc)}: {_problem(TaskSpec, {**err, 'loc': loc})}") from None
    broken = _inconsistency(spec)
    if broken:
        raise ShoalError(f"{source}:{yamlfile.line_of(node, (broken[0],))}: {broken[1]}")
    return spec


def _check_image(path: Path) -> str | None:
    """Why the file at path is not a readable image, or None if it is (reads only its header)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return f"image {path} not found"
    try:
        with Image.open(path):
            return None
    except (UnidentifiedImageError, OSError) as exc:
        return f"image {path} cannot be read ({exc})"


def parse_items(text: str, source: str, spec: TaskSpec, folder: Path | None = None) -> list[Item]:
    """Validate a split's JSONL text against the task's metric; errors name the file and line.

    Images are checked (the file exists and is an image) when folder, the task folder they are relative to, is given.
    """
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ShoalError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ShoalError(f"{where}: each line must be a JSON object with prompt and answer")
        try:
            item = Item.model_validate(row)
        except ValidationError as exc:
            raise ShoalError(f"{where}: {_problem(Item, exc.errors()[0])}") from None
        if spec.metric == "multiple_choice" and (not item.choices or item.answer not in item.choices):
            raise ShoalError(f"{where}: metric multiple_choice needs 'choices' that include the answer {item.answer!r}")
        if spec.metric == "last_number" and not NUMBER.search(item.answer):
            raise ShoalError(f"{where}: metric last_number needs a number in the answer, got {item.answer!r}")
        if item.image is not None:
            if spec.metric in LOGLIKELIHOOD_METRICS:
                raise ShoalError(f"{where}: items with an image are scored on generated text; metric {spec.metric} "
                                 f"does not generate (use one of {', '.join(GENERATION_METRICS)})")
            problem = _check_image(folder / item.image) if folder is not None else None
            if problem:
                raise ShoalError(f"{where}: {problem}; image paths are relative to the task folder {folder}")
        items.append(item)
    if not items:
        raise ShoalError(f"{source}: no items; write one JSON object per line")
    return items


def load_task(path: str | Path) -> Task:
    """Load a task from its folder or its task.yaml, reading and validating every split."""
    path = Path(path)
    yaml_path = path / "task.yaml" if path.is_dir() else path
    if not yaml_path.is_file():
        raise ShoalError(f"{yaml_path} not found; a task is a folder with task.yaml and one JSONL file per split")
    spec = parse_spec(yamlfile.read_text(yaml_path), str(yaml_path))
    folder = yaml_path.parent
    splits = {}
    for split, filename in spec.splits.items():
        file = folder / filename
        if not file.is_file():
            raise ShoalError(f"{yaml_path}: split {split!r} names {filename}, which is not in {folder}")
        splits[split] = parse_items(yamlfile.read_text(file), str(file), spec, folder)
    return Task(spec=spec, folder=folder, splits=splits)

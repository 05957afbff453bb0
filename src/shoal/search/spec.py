"""The search file of `shoal evolve`: parents, method, genome shape, bounds, tasks, budget and optimizer settings."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shoal import devices, yamlfile
from shoal.checkpoint.reference import parse_reference
from shoal.errors import ShoalError, ShoalWarning
from shoal.merge.memory import MemoryPlan
from shoal.merge.registry import METHODS
from shoal.recipe import known_dtype
from shoal.search.storage import is_journal

SEARCH_GENES: dict[str, tuple[str, ...]] = {
    "dare_ties": ("weight", "density"),
    "ties": ("weight", "density"),
    "task_arithmetic": ("weight",),
    "dare_linear": ("weight", "density"),
    "linear": ("weight",),
    "breadcrumbs_ties": ("weight", "density", "gamma"),
    "della": ("weight", "density", "epsilon"),
    "della_linear": ("weight", "density", "epsilon"),
    "sce": ("select_topk",),
}
"""The methods a search can drive, and the merge parameters it sets per layer group: a weight per parent, and each
parent's knobs of the method's sparsification (density; breadcrumbs' outlier fraction gamma; DELLA's epsilon), or
for SCE its one shared selection fraction. lambda is never a gene: without normalize it only rescales the weights
(a direction the weight genes already span), and with normalize the methods keep it at 1, as TIES does."""
SEARCHABLE_METHODS = tuple(SEARCH_GENES)
SHARED_GENES = ("select_topk",)
"""Parameters that are one gene per layer group for all parents (a shared, global parameter of the recipe)."""
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.1, 1.0),
    "gamma": (0.0, 0.05),
    "epsilon": (0.0, 0.9),
    "select_topk": (0.1, 1.0),
}
"""A gene's range unless `bounds` sets it. DELLA's epsilon gene is a fraction of the room its density leaves,
epsilon = gene · min(density, 1 - density), so that every point of the genome is a valid recipe."""
BOUND_CHECKS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    "density": (lambda low, high: 0 < low and high <= 1, "(0, 1]"),
    "gamma": (lambda low, high: 0 <= low and high < 1, "[0, 1)"),
    "epsilon": (lambda low, high: 0 <= low and high < 1, "[0, 1) (a fraction of min(density, 1 - density))"),
    "select_topk": (lambda low, high: 0 < low and high <= 1, "(0, 1]"),
}


class Strict(BaseModel):
    """Unknown keys are refused, and so are a NaN or an infinity where a number is expected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GenomeSpec(Strict):
    layers_per_group: int = Field(1, ge=0)
    """Consecutive layers that share one gene per parent and parameter; 0 = one group for all layers."""
    embeddings: Literal["search", "base"] = "search"
    """The tensors outside the layers (embeddings, final norm, head): genes of their own, or the base's values."""
    split_attention_mlp: bool = False
    """Separate genes for attention and MLP tensors (layer norms follow the attention genes)."""
    choose_parents: bool = False
    """One more gene per parent, `<parent>.keep`: the parent is in the merge when its gene is at least 0.5 (and the
    parent with the highest keep gene always is); a parent left out gets weight 0 everywhere. From the start at the
    middle every subset of parents is as likely, so a search over a pool can find the few that matter, where
    per-layer weights alone would have to bring every distractor near 0 at once. (The recipe still lists a left-out
    parent: DARE's and DELLA's random drops are drawn per position in the list, so the same recipe without it
    draws other masks for the parents after it.)"""


class DataFlowSpec(Strict):
    """The data-flow space (Akiba et al. 2024): a path through T = M x repeats slots of the parents' layers."""

    parents: list[str] | None = None
    """Parents in layout order (names from `parents`); the first, A, gives tokenizer, embeddings and head. Default:
    all, in the order given. In a hybrid search the PS result is put first, as A."""
    repeats: int = Field(3, ge=1)
    scaling: Literal["full", "seam", "none"] = "full"
    """Input scales: a full M x M matrix W, one scale per ordered pair of parents at seams, or none."""
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    budget: int | None = Field(None, ge=1)
    """Trials of the data-flow stage of a hybrid search (default: `budget`)."""

    @model_validator(mode="after")
    def _positive_scales(self) -> DataFlowSpec:
        low, high = self.scale_bounds
        if not 0 < low < high:
            raise ValueError(f"scale_bounds must satisfy 0 < low < high (a scale <= 0 cannot be exported), "
                             f"got {[low, high]}")
        return self


class FitnessSpec(Strict):
    """How a candidate is scored: on every dev item (`full`); on `items` dev items per task drawn afresh for each
    CMA-ES generation from the search's seed and the generation's index, the same items for all its candidates
    (`subset`: common random numbers, so the ranking CMA-ES uses compares like with like); or raced (`race`): a
    generation's candidates are scored on `first` items per task, then twice as many each round, and one that
    cannot reach the generation's selected set (by a Hoeffding-Serfling bound holding with probability 1 - `delta`)
    stops early (see search/race.py)."""

    mode: Literal["full", "subset", "race"] = "full"
    items: int | None = Field(None, ge=1)
    """subset: dev items per task and generation (a task with fewer is scored whole)."""
    first: int | None = Field(None, ge=1)
    """race: items per task in the first round (default 16)."""
    delta: float | None = Field(None, gt=0, lt=1)
    """race: the chance, at most, that any bound the race uses is wrong (default 0.05)."""

    @model_validator(mode="after")
    def _sized(self) -> FitnessSpec:
        if (self.mode == "subset") != (self.items is not None):
            raise ValueError("fitness: give items (dev items per generation) with mode subset, and only then")
        if self.mode != "race" and (self.first is not None or self.delta is not None):
            raise ValueError("fitness: first and delta are settings of mode race")
        return self


class PoolSpec(Strict):
    """A tournament over the parents (successive halving): every subset of `subset` parents gets a search of its
    own (RUN_DIR/subsets/<a>+<b>), and in rounds the subsets whose picked trial scores best on the whole dev split
    go on with more trials, until the best subset of the last round wins. Round r spends shares[r] of the budget,
    split evenly over the subsets still in it; after round r the best survivors[r] go on. The keep genes of
    genome.choose_parents search all parents at once instead, and were measured to do worse on the zoo's pool."""

    subset: int = Field(2, ge=1)
    """Parents in each subset (each search merges that many parents)."""
    survivors: list[int] = [3, 1]
    """Subsets that go on after each round but the last (at most as many as there are)."""
    shares: list[float] = [0.5, 0.3, 0.2]
    """The share of the budget each round spends; one more than survivors, summing to 1."""

    @model_validator(mode="after")
    def _schedule(self) -> PoolSpec:
        if len(self.shares) != len(self.survivors) + 1:
            raise ValueError(f"pool: give one share per round, one more than survivors ({len(self.survivors) + 1}), "
                             f"got {len(self.shares)}")
        if any(share <= 0 for share in self.shares) or abs(sum(self.shares) - 1) > 1e-6:
            raise ValueError(f"pool: shares must be positive and sum to 1, got {self.shares}")
        if any(n < 1 for n in self.survivors) or any(b > a for a, b in zip(self.survivors, self.survivors[1:])):
            raise ValueError(f"pool: survivors must be at least 1 and never grow from round to round, got "
                             f"{self.survivors}")
        return self


DRAWS = "every trial under the search's seed, DARE's densities on a grid of 2^-10"
"""How a search's trials draw random drops (search.loop.run_trials, search.genome), part of its fingerprint."""


class SelectSpec(Strict):
    """How the final model is picked: the `top` trials by search fitness are scored again on the whole dev split
    (merged as each trial was) and the best of those scores wins."""

    top: int = Field(5, ge=1)
    on: Literal["dev"] = "dev"

    @model_validator(mode="before")
    @classmethod
    def _on_as_written(cls, data: Any) -> Any:
        """`on: dev` unquoted is `true: dev` to YAML 1.1, which reads on, off, yes and no as booleans: the key `on`
        is what was meant."""
        if isinstance(data, dict) and True in data and "on" not in data:
            return {"on" if key is True else key: value for key, value in data.items()}
        return data


class LmEvalRef(Strict):
    """A task of lm-evaluation-harness: from its registry, or from YAML files under `include`."""

    task: str
    include: str | None = None
    metric: str | None = None
    splits: dict[str, str] = {"dev": "validation", "test": "test"}


class TaskWeight(Strict):
    """A shoal task folder (`path`) or an lm-eval task (`lm_eval`), and its weight in the fitness."""

    path: str | None = None
    lm_eval: LmEvalRef | None = None
    weight: float = Field(1.0, allow_inf_nan=False)
    """The task's share of the fitness (sum of weight x dev score): 0 keeps its scores in the summary without
    searching for them; a negative weight searches away from its skill."""

    @model_validator(mode="after")
    def _one_source(self) -> TaskWeight:
        if (self.path is None) == (self.lm_eval is None):
            raise ValueError("give a task either a path (a shoal task folder) or lm_eval (an lm-eval task)")
        return self

    @property
    def name(self) -> str:
        return self.lm_eval.task if self.lm_eval else Path(str(self.path)).name


class SearchSpec(Strict):
    """A parameter-space search: paths are relative to the search file's folder."""

    base: str
    parents: dict[str, str]
    space: Literal["ps", "dfs", "hybrid"] = "ps"
    """Parameter space (merge weights), data-flow space (layer paths), or PS then DFS over its result."""
    method: str = "dare_ties"
    genome: GenomeSpec = GenomeSpec()
    dfs: DataFlowSpec = DataFlowSpec()
    bounds: dict[str, tuple[float, float]] = {"weight": (0.0, 1.0), "density": (0.1, 1.0)}
    tasks: list[TaskWeight]
    budget: int = Field(1000, ge=1)
    """Trials, at most (each stage of a hybrid search)."""
    budget_items: int | None = Field(None, ge=1)
    """A budget in compute: the search also ends with the first CMA-ES generation by which its trials have scored
    this many dev items (the final selection's re-scoring is not counted; each stage of a hybrid search)."""
    budget_tokens: int | None = Field(None, ge=1)
    """The same in generated tokens."""
    population: int | None = Field(None, ge=2)
    """CMA-ES population; default 4 + floor(3 ln n) for n genes."""
    sigma: float = Field(1 / 6, gt=0)
    """Initial step size as a fraction of each gene's range (the search starts at the middle)."""
    seed: int = 0
    dtype: str | None = None
    """The merge's working dtype (default: the parents'); the resident model runs in it."""
    _known_dtype = field_validator("dtype")(known_dtype)
    storage: str | None = None
    """Optuna storage URL, or the path of an Optuna journal file (relative to the search file); default
    RUN_DIR/study.log."""
    fitness: FitnessSpec = FitnessSpec()
    select: SelectSpec = SelectSpec()
    pool: PoolSpec | None = None
    """A tournament over subsets of the parents instead of one search over all of them (parameter space)."""
    batch_size: int = Field(256, ge=1)
    device: str = "cpu"
    overlap: bool = True
    """Merge the next candidate while this one is scored (keeps a second copy of the model)."""
    tokenizer_source: str | None = None
    """Parameter space: union, base or a parent's name, the merged models' vocabulary (as a recipe's
    tokenizer_source: every parent's embedding and head rows aligned to it). Parents whose vocabularies differ (a
    fine-tune that added chat tokens) need it; the fitness tokenizes with the merged vocabulary."""
    memory: MemoryPlan = MemoryPlan()
    """Parameter space: where the merge's inputs live (inputs: device, host or stream), whether task vectors or
    parents are kept (keep: deltas or parents), whether TIES/DELLA ranks are stored or recomputed (ranks), and the
    device memory the search may take (limit, e.g. 24GB; default on CUDA: the GPU's free memory). The bytes are
    printed at the start; a plan over the limit is refused before anything loads. See merge/memory.py."""
    engine: Literal["hf", "vllm"] = "hf"
    """What generates the outputs of generation tasks during the search: transformers, or a resident vLLM engine
    whose weights are updated in place (parameter space only; `pip install vllm`). Log-likelihood and lm-eval
    tasks, and the final test scores, always use transformers."""
    vllm: dict[str, Any] = {}
    """Further keyword options of vLLM's LLM (e.g. gpu_memory_utilization: the share of the GPU's total memory the
    engine takes, default 0.4; enforce_eager). Model, tokenizer, dtype and seed come from the search."""
    _written: dict[str, str] = PrivateAttr(default_factory=dict)
    """Resolved local path -> how the search names it (as written in the file, or a stage's result)."""
    _results: frozenset[str] = PrivateAttr(default_factory=frozenset)
    """The local paths that are an earlier stage's result (naming): pinned by name in the hash, not by content."""
    _commits: dict[str, str] = PrivateAttr(default_factory=dict)
    """Hub id as the search file gives it (at a branch or tag, main by default) -> the commit it is read at (pinned)."""
    _unpinned: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)
    """"base" or "parents.NAME" -> (its model string pinned, as the search file gives it), where pinned changed it."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in SEARCHABLE_METHODS:
            raise ValueError(f"method {value!r} cannot be searched (searchable: {', '.join(SEARCHABLE_METHODS)})")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not devices.is_device_name(value):
            raise ValueError(f"unknown device {value!r} ({devices.ACCEPTED})")
        return value

    @field_validator("parents")
    @classmethod
    def _named_parents(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one parent")
        for name in value:
            if not name or "." in name:
                raise ValueError(f"parent name {name!r} must be non-empty and contain no '.'")
        return value

    @field_validator("bounds")
    @classmethod
    def _known_bounds(cls, value: dict[str, tuple[float, float]], info: ValidationInfo
                      ) -> dict[str, tuple[float, float]]:
        for name, (low, high) in value.items():
            if name not in DEFAULT_BOUNDS:
                raise ValueError(f"unknown parameter {name!r} (known: {', '.join(DEFAULT_BOUNDS)})")
            if not low < high:
                raise ValueError(f"{name} needs low < high, got [{low:g}, {high:g}]")
            check, text = BOUND_CHECKS.get(name, (lambda low, high: True, ""))
            if not check(low, high):
                raise ValueError(f"{name} must lie in {text}, got [{low:g}, {high:g}]")
        low, high = value.get("weight", DEFAULT_BOUNDS["weight"])
        if info.data.get("method") == "linear" and low + high == 0:
            raise ValueError(f"weight [{low:g}, {high:g}] starts a linear search with every weight at 0, the middle of "
                             "its bounds, and linear divides by the weights' sum; give weight bounds whose middle is "
                             "not 0, e.g. [0, 1]")
        return value

    @field_validator("tasks")
    @classmethod
    def _some_task(cls, value: list[TaskWeight]) -> list[TaskWeight]:
        if not value:
            raise ValueError("name at least one task")
        if all(t.weight <= 0 for t in value):
            raise ValueError("every task's weight is 0 or negative, so the search would only move away from the "
                             "tasks' skills; give the task to improve a positive weight")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        if self.method == "linear" and self.genome.embeddings == "base":
            raise ValueError("genome.embeddings: base needs a method with a base model (linear has none)")
        if "weight" not in self.params and self.genome.embeddings == "base":
            raise ValueError(f"genome.embeddings: base needs a method with weights to set to 0 ({self.method} has none)")
        if self.genome.choose_parents and "weight" not in self.params:
            raise ValueError(f"genome.choose_parents leaves a parent out by setting its weights to 0 ({self.method} has "
                             "no weights)")
        if self.engine == "vllm" and self.space != "ps":
            raise ValueError("engine: vllm scores parameter-space candidates only (a data-flow path changes the "
                             "layers of the model the engine was built with)")
        taken = sorted({"model", "tokenizer", "dtype", "seed"} & set(self.vllm))
        if taken:
            raise ValueError(f"vllm: {', '.join(taken)} come from the search (base, dtype, seed), not vllm options")
        if self.tokenizer_source not in (None, "union", "base", *self.parents):
            raise ValueError(f"tokenizer_source: {self.tokenizer_source!r} is not union, base or one of the parents "
                             f"({', '.join(self.parents)})")
        if self.engine == "vllm" and self.tokenizer_source not in (None, "base"):
            raise ValueError(f"tokenizer_source: {self.tokenizer_source} with engine: vllm: the engine is built once "
                             "from the base's folder and keeps its vocabulary, which this tokenizer_source changes "
                             "(use engine: hf, or tokenizer_source: base)")
        if self.tokenizer_source is not None and self.space == "dfs":
            raise ValueError("tokenizer_source is a parameter-space setting: a data-flow path keeps its first parent's "
                             "vocabulary")
        if self.pool is not None:
            self._check_pool(self.pool)
        if self.space == "hybrid" and "ps" in self.parents:
            raise ValueError("parents: 'ps' names the PS stage's result among the data-flow stage's parents; give this "
                             "parent another name")
        unknown = [name for name in self.dfs.parents or [] if name not in self.parents]
        if unknown:
            raise ValueError(f"dfs.parents: {unknown[0]!r} is not one of the parents ({', '.join(self.parents)})")
        return self

    def _check_pool(self, pool: PoolSpec) -> None:
        if self.space == "dfs":
            raise ValueError("pool: a tournament of parameter-space searches (space ps, or hybrid for its PS stage)")
        if self.space == "hybrid" and self.dfs.parents is None:
            raise ValueError("pool with space hybrid: name dfs.parents, the parents whose layers the data-flow stage "
                             "arranges after the PS result (by default it would take every parent of the pool)")
        if self.genome.choose_parents:
            raise ValueError("pool and genome.choose_parents are two ways to search a pool; choose one")
        if not pool.subset < len(self.parents):
            raise ValueError(f"pool: subset ({pool.subset}) must be smaller than the number of parents "
                             f"({len(self.parents)}); with all of them, leave pool out")
        if self.tokenizer_source in self.parents:
            raise ValueError("pool: tokenizer_source cannot name a parent (a subset may leave it out); use union or "
                             "base")

    @property
    def tokenizer_ref(self) -> str | None:
        """tokenizer_source as a recipe names it: union, base or the parent's path."""
        source = self.tokenizer_source
        return self.parents[source] if source in self.parents else source

    @property
    def models(self) -> dict[str, str]:
        """Each model string it reads, by its key in the search file: base, parents.NAME."""
        return {"base": self.base} | {f"parents.{name}": ref for name, ref in self.parents.items()}

    @property
    def flow_parents(self) -> dict[str, str]:
        """The data-flow layout's parents in order (A first)."""
        return {name: self.parents[name] for name in self.dfs.parents or self.parents}

    @property
    def params(self) -> list[str]:
        """The merge parameters each group of genes sets."""
        return list(SEARCH_GENES[self.method])

    def bound(self, param: str) -> tuple[float, float]:
        return self.bounds.get(param, DEFAULT_BOUNDS[param])

    def naming(self, path: str, name: str) -> SearchSpec:
        """This search, with the local folder `path` fingerprinted as `name` (e.g. the result of an earlier stage)."""
        named = self.model_copy()
        named._written = self._written | {path: name}
        named._results = self._results | {path}
        return named

    def pinned(self, commits: dict[str, str]) -> SearchSpec:
        """This search with its models' Hub ids that are keys of commits (`org/name`, `org/name@branch`) read at
        those commits (`org/name@COMMIT`); its hash stays the one of the ids as the file gives them."""
        pin = lambda ref: str(parse_reference(ref).pinned(commits))
        named = self.model_copy(update={"base": pin(self.base),
                                        "parents": {name: pin(ref) for name, ref in self.parents.items()}})
        pinned = {key: (pin(ref), ref) for key, ref in self.models.items() if pin(ref) != ref}
        named._unpinned = pinned | self._unpinned
        named._commits = self._commits | commits
        return named

    @property
    def hub_commits(self) -> dict[str, str]:
        """The commits its Hub ids are read at (pinned), by the id as the search file gives it."""
        return dict(self._commits)

    def is_stage_result(self, path: str) -> bool:
        """Whether `path` is an earlier stage's result (see naming): what it holds is pinned by its name."""
        return path in self._results

    def search_hash(self) -> str:
        """Fingerprint of what the user set that decides the trajectory: settings left at their defaults are not
        part of it (so a later shoal with new optional settings still opens the run), nor are the budgets, storage,
        batch size, device, overlap, memory plan, engine or final selection, nor the data-flow settings of a parameter-space
        search. Local paths count as the search file wrote them, so machines that keep the same files in other
        folders share a study. A method with random drops (DARE, DELLA) counts how its trials draw them (DRAWS), so
        a run made when each trial drew under its own seed is not continued as one search with the runs since."""
        excluded: dict[str, object] = {"budget": True, "budget_items": True, "budget_tokens": True, "storage": True,
                                       "batch_size": True, "device": True, "overlap": True, "memory": True, "engine": True, "vllm": True,
                                       "select": True,
                                       "dfs": True if self.space == "ps" else {"budget"}}
        kept = self.model_dump(exclude=excluded, exclude_defaults=True)
        for key, (pinned, given) in self._unpinned.items():  # by key: two strings may be pinned to one
            field, _, name = key.partition(".")
            place, at = (kept, field) if not name else (kept[field], name)
            if place.get(at) == pinned:  # not where a stage put another model under the name
                place[at] = given
        kept = _renamed(kept, self._written)
        if METHODS[self.method].random:
            kept["draws"] = DRAWS
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _renamed(value: object, names: dict[str, str]) -> object:
    """value with every string that is a key of names replaced by its name, through nested dicts and lists."""
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, dict):
        return {k: _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value


def parse_search(text: str, source: str, root: Path) -> SearchSpec:
    """Parse and validate a search file; relative paths are made absolute against root."""
    spec, node = yamlfile.validated(
        SearchSpec, text, source, "a search file is a YAML mapping with at least base, parents and tasks"
    )
    written: dict[str, str] = {}

    def here(key: str) -> Callable[[str], str]:
        return lambda path: _located(path, root, written, f"{source}: {key}")

    located = spec.model_copy(
        update={
            "base": here("base")(spec.base),
            "parents": {name: here(f"parents.{name}")(p) for name, p in spec.parents.items()},
            "tasks": [_located_task(t, here(f"tasks[{i}]")) for i, t in enumerate(spec.tasks)],
            "storage": spec.storage and (str((root / spec.storage).resolve()) if is_journal(spec.storage)
                                         else spec.storage),
        }
    )
    located._written = written
    for loc, ref in [(("base",), located.base), *((("parents", n), p) for n, p in located.parents.items())]:
        _check_found(ref, f"{source}:{yamlfile.line_of(node, loc)}: {'.'.join(loc)}", root)
    return located


def _check_found(ref: str, where: str, root: Path) -> None:
    """Refuse, before anything loads, a model string that names a folder found nowhere and cannot be a Hub id
    (`./a`, `../models/x`, `a/b/c`); a Hub id is looked for when the parents load."""
    try:
        reference = parse_reference(ref)
    except ShoalError as error:
        raise ShoalError(f"{where}: {error}") from None
    for place in (reference.model, reference.lora):
        if place is not None and not place.is_hub_id and not Path(place.path).expanduser().exists():
            relative = not Path(place.path).expanduser().is_absolute()
            looked = f" (looked for from {root.resolve()} and from the current folder)" if relative else ""
            raise ShoalError(f"{where}: model {place.path!r} not found: no such folder{looked}, and it is not a Hub "
                             "id of the form 'org/name'")


def _located(path: str, root: Path, written: dict[str, str], what: str) -> str:
    """A path relative to the search file made absolute (and noted in written as the file wrote it, normalised); a
    MODEL+ADAPTER string, each side so (where the file's folder holds no '+'). A relative path found only from the
    current folder is taken from there with a warning (the search then depends on where it is started; its hash
    stays the path as written, so runs made so keep resuming); a name found nowhere is kept (a Hub id, or an error
    later)."""
    candidate = root / Path(path).expanduser()
    if not candidate.exists() and Path(path).expanduser().exists():
        warnings.warn(ShoalWarning(f"{what}: {path} is not in {root.resolve()}, the folder this file's paths are "
                                   "relative to, but in the current folder, and is taken from there; write it "
                                   "relative to the search file, or absolute"), stacklevel=2)
        candidate = Path(path).expanduser()
    if candidate.exists():
        resolved = str(candidate.resolve())
        written[resolved] = os.path.normpath(path)
        return resolved
    model, plus, adapter = path.partition("+")
    if plus and model and adapter and "+" not in str(root.resolve()):
        located = f"{_located(model, root, written, what)}+{_located(adapter, root, written, what)}"
        if located != path:
            written[located] = f"{os.path.normpath(model)}+{os.path.normpath(adapter)}"
        return located
    return path


def _located_task(task: TaskWeight, here: Callable[[str], str]) -> TaskWeight:
    if task.lm_eval is not None:
        include = task.lm_eval.include
        ref = task.lm_eval.model_copy(update={"include": include and here(include)})
        return task.model_copy(update={"lm_eval": ref})
    return task.model_copy(update={"path": here(str(task.path))})


def load_search(path: str | Path) -> SearchSpec:
    path = Path(path)
    if not path.is_file():
        raise ShoalError(f"search file {path} not found")
    return parse_search(yamlfile.read_text(path), str(path), path.parent)

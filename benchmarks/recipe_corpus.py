"""mergekit's own recipes through `shoal merge` and `mergekit-yaml`, on tiny random models: which each tool accepts,
refuses or crashes on, and whether the two outputs agree tensor for tensor (issue #14, parity with mergekit 0.1.5).

    python benchmarks/recipe_corpus.py --mergekit-src PATH [--mergekit-src PATH2 ...] [--ref REV]
        [--work /tmp/shoal-corpus] [--seed 42] [--timeout 900] [--only REGEX] [--no-tests] [--list] [--json FILE]

Each PATH is a mergekit checkout, an unpacked sdist, or a (bare) git directory (read at REV: the tag v0.1.5 if it
exists, else HEAD); each file comes from the first PATH that has it. mergekit's git history has no v0.1.5 tag and
its sdist (`pip download mergekit==0.1.5 --no-deps --no-binary :all:`) has tests/ (without common.py) but no
examples/ or docs/, so the 0.1.5 corpus is the sdist first, then a git snapshot. Nothing of mergekit is copied into
shoal: the recipes are read from the PATHs when this runs.

The corpus: every examples/*.yml; every ```yaml block with merge_method in the Markdown files; and every
MergeConfiguration that mergekit's test suite hands to run_and_check_merge or run_merge. For the last, each test
that calls one of them is called (every parametrize case) with its fixtures' names as model names, tmp_path a fresh
folder, and both functions replaced by one that records config.to_yaml(): no test body runs a merge, and the
recipes are what the tests merge (MergeOptions a test passes are noted, and not used: both tools run with defaults).

Every model reference (base_model, models[].model, slices' sources, the same under modules, tokenizer_source,
tokenizer.source and the models of tokenizer.tokens) becomes a tiny random local model (hidden 64, vocabulary 128,
bfloat16 safetensors, a BPE tokenizer) of the family its name suggests (llava, gpt2, granite, qwen2, mistral, phi;
llama otherwise), at least 4 layers and deep enough for the largest layer_range. Within a recipe every reference
has the same family and depth: that family's random model plus a small per-reference perturbation (a "fine-tune").
As mergekit's tokenizer-test fixtures, names with chatml get <|im_start|> and <|im_end|> (two more embedding rows),
special one special token (one row), padded four added tokens the embedding lacks. References to an earlier
document's name stay. Other shapes a test builds (e.g. vocabularies of 8 and 10) are not reproduced. A recipe that
cannot run offline (model+LoRA) or is no merge recipe (mergekit-evolve's genome) is listed as skipped.

Each tool runs in its own process with default options (`mergekit-multi --out-path OUT -I DIR` for a recipe of
several documents) plus `--random-seed SEED` for both when a method draws random masks (dare_*, della*). When both
write a model, every tensor and the tokenizer vocabularies are compared:
  equal            fp32: max |diff| < 1e-5; bf16/fp16: every element within one unit in the last place
  differ-random    a random method (the two tools' generators differ by design)
  differ-ties      TIES/breadcrumbs/SCE: differs, but equals mergekit rerun with stable sorts (tied magnitudes at the
                   trim threshold, which mergekit orders arbitrarily; as tests/test_mergekit_reference.py)
  differ-rounding  every |diff| within 4 ulps of the tensor's largest value (mergekit computes in the recipe's dtype,
                   shoal in float32 and rounds once)
  differ           anything else: values, dtype, shape, tensor names, tokenizer
Outcomes of a run: ok; refused (shoal: exit 2, one `error:` line, no traceback; mergekit: a non-zero exit without a
traceback); crashed (a traceback, another exit code, a timeout). Prints one row per recipe, the totals of both
tools, and every recipe shoal refuses, crashes on or differs on, with the first error line or what differs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
"""Methods that draw random masks, in mergekit (SparsificationMethod.random, della_magprune) and in shoal
(registry random=True); extended at run time from both registries where they import."""
TOKENIZER_KEYWORDS = {"base", "union"}
DEFAULT_LAYERS = 4
VOCAB = 128
FAMILY_HINTS = (("llava", "llava"), ("vlm", "llava"), ("gpt2", "gpt2"), ("granite", "granite"), ("qwen", "qwen2"),
                ("mistral", "mistral"), ("mixtral", "mistral"), ("/phi", "phi"), ("phi-", "phi"), ("phi_", "phi"))
"""Substrings of a model name (lower case) and the tiny family that stands in for it; llama when none matches."""


# ---------------------------------------------------------------------------------------------------------------
# Reading mergekit's sources


class Source:
    """A mergekit checkout or unpacked sdist (files on disk), or a git directory (files at one revision)."""

    def __init__(self, path: Path, ref: str | None):
        self.path = path
        self.git_dir = path if (path / "objects").is_dir() and (path / "HEAD").is_file() else None
        if self.git_dir is None:
            self.ref = ref or "working tree"
            self.commit = self._describe_checkout()
            return
        if ref is None:
            tags = self._git("tag", "--list").split()
            ref = "v0.1.5" if "v0.1.5" in tags else "HEAD"
        self.ref = ref
        self.commit = self._git("rev-parse", f"{ref}^{{commit}}").strip()

    @property
    def label(self) -> str:
        return f"{self.path.name}@{self.commit[:12]}" if self.git_dir is not None else self.path.name

    def _git(self, *args: str, binary: bool = False) -> Any:
        out = subprocess.run(["git", f"--git-dir={self.git_dir}", *args], capture_output=True, check=True)
        return out.stdout if binary else out.stdout.decode()

    def _describe_checkout(self) -> str:
        try:
            return subprocess.run(["git", "-C", str(self.path), "rev-parse", "HEAD"], capture_output=True,
                                  check=True, text=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return "unknown"

    @functools.cached_property
    def _files(self) -> list[str]:
        if self.git_dir is not None:
            return self._git("ls-tree", "-r", "--name-only", self.commit).splitlines()
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*")
                      if p.is_file() and ".git" not in p.relative_to(self.path).parts)

    def files(self) -> list[str]:
        return self._files

    def read(self, name: str) -> str:
        if self.git_dir is not None:
            return self._git("show", f"{self.commit}:{name}")
        return (self.path / name).read_text()

    def copy_folder(self, name: str, dest: Path) -> None:
        """The folder `name` (with its files) under dest, over what is there."""
        dest.mkdir(parents=True, exist_ok=True)
        if self.git_dir is None:
            shutil.copytree(self.path / name, dest / name, dirs_exist_ok=True)
            return
        archive = self._git("archive", "--format=tar", self.commit, name, binary=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python before 3.10.12: git archive's own members only
                tar.extractall(dest)


@dataclass
class Recipe:
    source: str
    text: str | None = None
    skip: str | None = None
    note: str = ""
    origin: str = ""
    hint: str = ""
    """Where the family is read from when no model name suggests one (a test's name, e.g. test_phi_...)."""
    expect_error: bool = False
    """mergekit's own test expects this recipe to fail (pytest.raises)."""


def markdown_blocks(text: str) -> list[str]:
    """The YAML code blocks (```yaml / ```yml) of a Markdown text that mention merge_method."""
    blocks = re.findall(r"^```[ \t]*(ya?ml)[^\n]*\n(.*?)^```", text, flags=re.S | re.M | re.I)
    return [body for _, body in blocks if "merge_method" in body]


def example_and_doc_recipes(sources: list[Source]) -> list[Recipe]:
    """examples/*.yml and the Markdown YAML blocks, each file from the first source that has it."""
    chosen: dict[str, Source] = {}
    for source in sources:
        for name in source.files():
            chosen.setdefault(name, source)
    recipes = []
    for name, source in sorted(chosen.items(), key=lambda kv: (not kv[0].startswith("examples/"), kv[0])):
        if name.startswith("examples/") and name.endswith((".yml", ".yaml")):
            recipes.append(Recipe(name, source.read(name), origin=source.label))
        elif name.endswith(".md"):
            for i, block in enumerate(markdown_blocks(source.read(name)), 1):
                recipes.append(Recipe(f"{name}#{i}", block, origin=source.label))
    return recipes


def parametrized(func: Callable) -> list[tuple[dict[str, Any], str]]:
    """The argument sets and ids of a test's @pytest.mark.parametrize marks (one empty set if it has none)."""
    cases: list[tuple[dict[str, Any], str]] = [({}, "")]
    for mark in getattr(func, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        expanded = []
        for kwargs, ident in cases:
            for value in values:
                if hasattr(value, "marks") and hasattr(value, "values"):  # pytest.param(...)
                    vals, vid = tuple(value.values), value.id
                else:
                    vals, vid = (tuple(value) if len(names) > 1 else (value,)), None
                vid = vid or "-".join(str(v) for v in vals)
                expanded.append(({**kwargs, **dict(zip(names, vals))}, f"{ident}-{vid}" if ident else vid))
        cases = expanded
    return cases


@contextlib.contextmanager
def _inside(folder: Path):
    """contextlib.chdir (Python 3.11) for 3.10."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


class _LogStub:
    """Enough of pytest's caplog for a test body to run up to its merge."""

    records: list = []
    text = ""

    def set_level(self, *args, **kwargs) -> None:
        pass

    @contextlib.contextmanager
    def at_level(self, *args, **kwargs):
        yield self


def suite_recipes(sources: list[Source], work: Path) -> list[Recipe]:
    """The MergeConfigurations that mergekit's tests pass to run_and_check_merge or run_merge, as YAML: each test
    that calls one of them runs (every parametrize case) with its fixtures' names as the models, tmp_path a fresh
    folder, and those two functions replaced by one that records the configuration. tests/ is assembled from the
    sources, each file from the first that has it (an sdist's tests/ may lack common.py)."""
    holders = [s for s in sources if any(n.startswith("tests/test_") for n in s.files())]
    if not holders:
        return []
    folder = work / "mergekit-tests"
    shutil.rmtree(folder, ignore_errors=True)
    origin: dict[str, str] = {}
    for source in reversed([s for s in sources if any(n.startswith("tests/") for n in s.files())]):
        source.copy_folder("tests", folder)
        origin.update({n: source.label for n in source.files() if n.startswith("tests/")})
    (folder / "tests" / "__init__.py").touch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib
    import tempfile

    import pytest

    sys.path.insert(0, str(folder))
    recipes: list[Recipe] = []
    captured: list[tuple[Any, str]] = []

    def record(config, *args, **kwargs) -> None:
        options = kwargs.get("options", args[1] if len(args) > 1 else None)
        extra = ""
        if options is not None and hasattr(options, "model_dump"):
            changed = {k: v for k, v in options.model_dump(exclude_defaults=True).items() if k != "quiet"}
            extra = f"the test passes MergeOptions {changed} (run here with defaults)" if changed else ""
        captured.append((config, extra))

    try:
        for path in sorted((folder / "tests").glob("test_*.py")):
            text = path.read_text()
            where = origin.get(f"tests/{path.name}", "")
            if "MergeConfiguration" not in text or not re.search(r"\brun_(and_check_)?merge\(", text):
                continue
            try:
                module = importlib.import_module(f"tests.{path.stem}")
            except Exception as exc:  # noqa: BLE001 - a test module this mergekit cannot import
                recipes.append(Recipe(f"tests/{path.name}", skip=f"test module does not import: {exc}",
                                      origin=where))
                continue
            for holder in (module, sys.modules.get("tests.common")):
                for name in ("run_and_check_merge", "run_merge"):
                    if holder is not None and hasattr(holder, name):
                        setattr(holder, name, record)
            tests: list[tuple[str, Callable, type | None]] = []
            for name, obj in inspect.getmembers(module):
                if name.startswith("test_") and inspect.isfunction(obj) and obj.__module__ == module.__name__:
                    tests.append((name, obj, None))
                elif name.startswith("Test") and inspect.isclass(obj) and obj.__module__ == module.__name__:
                    tests += [(f"{name}::{m}", f, obj) for m, f in inspect.getmembers(obj, inspect.isfunction)
                              if m.startswith("test_")]
            for name, func, cls in sorted(tests, key=lambda t: inspect.getsourcelines(t[1])[1]):
                if not re.search(r"\brun_(and_check_)?merge\(", inspect.getsource(func)):
                    continue
                for kwargs, ident in parametrized(func):
                    captured.clear()
                    label = f"tests/{path.name}::{name}" + (f"[{ident}]" if ident else "")
                    monkeypatch = pytest.MonkeyPatch()
                    tmp = Path(tempfile.mkdtemp(dir=work))
                    args = {}
                    for param in inspect.signature(func).parameters:
                        if param == "self" or param in kwargs:
                            continue
                        args[param] = {"tmp_path": lambda: tmp, "monkeypatch": lambda: monkeypatch,
                                       "caplog": _LogStub}.get(param, lambda p=param: p)()
                    call = {**args, **kwargs}
                    expect_error = False
                    try:  # in tmp: a body that goes on past its merge may write files where it stands
                        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                                _inside(tmp):
                            func(cls(), **call) if cls is not None else func(**call)
                    except pytest.fail.Exception as exc:  # pytest.raises around a merge that did not run here
                        expect_error = "DID NOT RAISE" in str(exc)
                    except Exception:  # noqa: BLE001 - checks of a merge that did not run, or a fixture it lacks
                        pass
                    finally:
                        monkeypatch.undo()
                        shutil.rmtree(tmp, ignore_errors=True)
                    for i, (config, extra) in enumerate(captured):
                        suffix = f"#{i + 1}" if len(captured) > 1 else ""
                        text = config.to_yaml().replace(f"{tmp}/", "") + "\n"  # models the test made: by name
                        recipes.append(Recipe(label + suffix, text, note=extra, origin=where, hint=label,
                                              expect_error=expect_error and i == len(captured) - 1))
    finally:
        sys.path.remove(str(folder))
        for mod in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
            del sys.modules[mod]
    return recipes


# ---------------------------------------------------------------------------------------------------------------
# Model references


def _is_ref(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def map_refs(doc: Any, fn: Callable[[str], str]) -> Any:
    """doc with every model reference r replaced by fn(r) (in place; doc returned). The places: base_model,
    models[].model, slices[].sources[].model, the same under modules.<name>, tokenizer_source (not base/union),
    tokenizer.source (not base/union) and tokenizer.tokens.<token>.source (a model, or {kind: model_token, model})."""
    if not isinstance(doc, dict):
        return doc

    def part(block: dict) -> None:
        if _is_ref(block.get("base_model")):
            block["base_model"] = fn(block["base_model"])
        for entry in block.get("models") or []:
            if isinstance(entry, dict) and _is_ref(entry.get("model")):
                entry["model"] = fn(entry["model"])
        for slice_ in block.get("slices") or []:
            for src in (slice_ or {}).get("sources") or []:
                if isinstance(src, dict) and _is_ref(src.get("model")):
                    src["model"] = fn(src["model"])

    part(doc)
    for module in (doc.get("modules") or {}).values():
        if isinstance(module, dict):
            part(module)
    if _is_ref(doc.get("tokenizer_source")) and doc["tokenizer_source"] not in TOKENIZER_KEYWORDS:
        doc["tokenizer_source"] = fn(doc["tokenizer_source"])
    tokenizer = doc.get("tokenizer")
    if isinstance(tokenizer, dict):
        if _is_ref(tokenizer.get("source")) and tokenizer["source"] not in TOKENIZER_KEYWORDS:
            tokenizer["source"] = fn(tokenizer["source"])
        for spec in (tokenizer.get("tokens") or {}).values():
            if not isinstance(spec, dict):
                continue
            src = spec.get("source")
            if _is_ref(src) and src not in TOKENIZER_KEYWORDS:
                spec["source"] = fn(src)
            elif isinstance(src, dict) and _is_ref(src.get("model")):
                src["model"] = fn(src["model"])
    return doc


def model_refs(docs: list[Any]) -> list[str]:
    """The distinct model references of a recipe's documents, in order, without the documents' own names."""
    names = {d.get("name") for d in docs if isinstance(d, dict)}
    seen: list[str] = []
    for doc in docs:
        map_refs(doc, lambda r: seen.append(r) or r)
    return list(dict.fromkeys(r for r in seen if r not in names))


def layers_needed(docs: list[Any]) -> int:
    """The depth a model needs for every layer_range of the recipe (DEFAULT_LAYERS at least)."""
    deepest = DEFAULT_LAYERS
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        blocks = [doc, *[m for m in (doc.get("modules") or {}).values() if isinstance(m, dict)]]
        for block in blocks:
            for slice_ in block.get("slices") or []:
                for src in (slice_ or {}).get("sources") or []:
                    rng = src.get("layer_range") if isinstance(src, dict) else None
                    if isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng):
                        deepest = max(deepest, *rng)
    return deepest


def family_of(refs: list[str]) -> str:
    """The one family that stands in for every reference of a recipe: the commonest hinted, else llama."""
    votes: dict[str, int] = {}
    for ref in refs:
        low = ref.lower()
        for hint, family in FAMILY_HINTS:
            if hint in low:
                votes[family] = votes.get(family, 0) + 1
                break
    return max(votes, key=votes.get) if votes else "llama"


EXTRA_ROWS = {"chatml": 2, "special": 1, "padded": 0}
"""Tokenizer variants (by a substring of the model's name, as mergekit's tokenizer tests name their fixtures) and
the embedding rows they add: chatml adds <|im_start|> and <|im_end|>; special one special token
<|existing_special|>; padded four <UNUSED_i> tokens that the embedding lacks."""


def variant_of(ref: str) -> str:
    """The tokenizer variant a reference gets (EXTRA_ROWS), or plain."""
    low = ref.lower()
    for variant in EXTRA_ROWS:
        if variant in low:
            return variant
    return "plain"


def methods_of(docs: list[Any]) -> list[str]:
    return [str(d.get("merge_method")) for d in docs if isinstance(d, dict) and d.get("merge_method")]


def rewrite(text: str, hint: str = "") -> tuple[list[Any], dict[str, str], str, int] | str:
    """A recipe's documents with references replaced by placeholders 'tiny://<family>/L<depth>/<variant>/<slug>',
    the mapping, family and depth; or the reason it is skipped."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        if re.search(r"^genome:", text, flags=re.M):
            return "a mergekit-evolve configuration (genome:), not a merge recipe"
        return f"not valid YAML: {str(exc).splitlines()[0]}"
    if not docs:
        return "empty"
    if not methods_of(docs):
        keys = sorted({k for d in docs if isinstance(d, dict) for k in d})
        return f"not a merge recipe (no top-level merge_method; keys {', '.join(keys)})"
    refs = model_refs(docs)
    lora = [r for r in refs if "+" in r]
    if lora:
        return f"needs a LoRA adapter from the Hub ({lora[0]})"
    family = family_of(refs) if family_of(refs) != "llama" or not hint else family_of(refs + [hint])
    depth = layers_needed(docs)
    mapping = {}
    for ref in refs:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", ref).strip("_")[:60] or "model"
        mapping[ref] = f"{family}-L{depth}-{variant_of(ref)}-{slug}"
    names = {d.get("name") for d in docs if isinstance(d, dict)}
    for doc in docs:
        map_refs(doc, lambda r: r if r in names else mapping[r])
    return docs, mapping, family, depth


# ---------------------------------------------------------------------------------------------------------------
# Tiny models


def _config(family: str, depth: int, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=depth,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "phi":
        return tf.PhiConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=depth,
                            num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                            bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=depth, n_head=4, n_positions=256,
                             bos_token_id=1, eos_token_id=2)
    if family == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
        return tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**common), image_seq_length=16,
                              image_token_id=vocab - 1)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "granite": tf.GraniteConfig}[family]
    return cls(**common)


def _model(family: str, depth: int, vocab: int, seed: int):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(family, depth, vocab)
    if family == "llava":
        return tf.LlavaForConditionalGeneration(config)
    return tf.AutoModelForCausalLM.from_config(config)


def _tokenizer(variant: str):
    import transformers as tf
    from tokenizers import Tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, VOCAB)]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
            "added_tokens": []}
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                     bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if variant == "chatml":
        tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    elif variant == "special":
        from tokenizers import AddedToken

        special = AddedToken("<|existing_special|>", single_word=True, lstrip=True, rstrip=True, normalized=False,
                             special=True)
        tok.add_special_tokens({"additional_special_tokens": [special]})
    elif variant == "padded":
        tok.add_tokens([f"<UNUSED_{i}>" for i in range(4)])
    return tok


def build_model(folder: Path, placeholder: str) -> None:
    """The tiny model a placeholder 'family-L<depth>-<variant>-<slug>' names: the family's random model for that
    depth (seeded by family and depth, so shared by a recipe's references) plus noise seeded by the placeholder."""
    import torch

    if (folder / "config.json").exists():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    family, depth, variant, _ = placeholder.split("-", 3)
    depth_n = int(depth[1:])
    seed = int(hashlib.sha256(f"{family}/{depth_n}".encode()).hexdigest()[:8], 16)
    root = _model(family, depth_n, VOCAB, seed).state_dict()
    model = _model(family, depth_n, VOCAB + EXTRA_ROWS.get(variant, 0), seed)
    gen = torch.Generator().manual_seed(int(hashlib.sha256(placeholder.encode()).hexdigest()[:8], 16))
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            base = root[name]
            if base.shape != tensor.shape:  # more embedding rows: the root's, then new random ones
                tensor.normal_(0.0, float(base.float().std()), generator=gen)
                tensor[: base.shape[0]].copy_(base)
            else:
                tensor.copy_(base)
            if not tensor.is_floating_point():
                continue
            spread = float(tensor.float().std()) if tensor.numel() > 1 else 0.0
            scale = 0.1 * spread if spread > 0 else 0.01
            tensor.add_(torch.randn(tensor.shape, generator=gen) * scale)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    _tokenizer(variant).save_pretrained(tmp)
    tmp.rename(folder)


# ---------------------------------------------------------------------------------------------------------------
# Running the tools


@dataclass
class Run:
    outcome: str  # ok, refused, crashed
    code: int | None
    error: str = ""
    seconds: float = 0.0


def first_error(output: str) -> str:
    """The line that says what went wrong: an `error:` line, else a traceback's exception line, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:"):
            return ln[:300]
    if "Traceback (most recent call last)" in output:
        exc = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*", ln)]
        if exc:
            return exc[-1][:300]
    return lines[-1][:300] if lines else ""


def run_tool(tool: str, command: list[str], timeout: float) -> Run:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Run("crashed", None, f"timed out after {timeout:.0f} s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    output = proc.stderr + "\n" + proc.stdout
    if proc.returncode == 0:
        return Run("ok", 0, "", seconds)
    traceback = "Traceback (most recent call last)" in output
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    if tool == "shoal":
        clean = proc.returncode == 2 and len(errors) == 1 and not traceback
    else:
        clean = not traceback
    return Run("refused" if clean else "crashed", proc.returncode, first_error(output), seconds)


# ---------------------------------------------------------------------------------------------------------------
# Comparing outputs


def load_tensors(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


MANTISSA = {"bfloat16": (7, -126), "float16": (10, -14), "float32": (23, -126), "float64": (52, -1022)}
ROUNDING_ULPS = 4
"""A tensor differs only by rounding when every |diff| is within this many units in the last place of the tensor's
largest magnitude (the two tools round in different places: mergekit computes in the recipe's dtype, shoal in
float32 and rounds once)."""


def ulp(x, dtype):
    """One unit in the last place of dtype at |x| (elementwise, in float64)."""
    import torch

    bits, lowest = MANTISSA[str(dtype).removeprefix("torch.")]
    x = x.double()
    _, exponent = torch.frexp(x.abs())
    exponent = torch.where(x == 0, torch.full_like(exponent, lowest + 1), exponent)
    return torch.ldexp(torch.ones_like(x), torch.clamp(exponent - 1, min=lowest) - bits)


def tensors_agree(a, b) -> tuple[bool, bool, float, float]:
    """For two tensors of one shape: whether they agree (bf16/fp16, the coarser of their dtypes: within one ulp of
    either value; else |diff| < 1e-5), whether they differ only by rounding (ROUNDING_ULPS), the max |diff|, and
    the fraction of elements that do not agree."""
    import torch

    da, db = a.double(), b.double()
    diff = (da - db).abs()
    if not diff.numel():
        return True, True, 0.0, 0.0
    worst = float(diff.max())
    floats = [d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64) if d in (a.dtype, b.dtype)]
    if not floats:
        return worst == 0, worst == 0, worst, float((diff > 0).double().mean())
    coarse = floats[0]
    if coarse in (torch.bfloat16, torch.float16):
        tol = torch.maximum(ulp(da, coarse), ulp(db, coarse))
    else:
        tol = torch.full_like(diff, 1e-5)
    bad = diff > tol
    scale = torch.maximum(da.abs().max(), db.abs().max())
    rounding = worst <= max(ROUNDING_ULPS * float(ulp(scale.reshape(1), coarse)[0]), 1e-5)
    return not bool(bad.any()), rounding, worst, float(bad.double().mean())


RENAMES = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."))
"""transformers 5's names of a vision-language model's tensors and the checkpoint names they load from."""


def canonical(tensors: dict) -> dict:
    out = {}
    for name, tensor in tensors.items():
        for new, old in RENAMES:
            if name.startswith(new):
                name = old + name[len(new):]
                break
        out[name] = tensor
    return out


def vocabulary(folder: Path) -> dict[str, int] | None:
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def compare(shoal_out: Path, mergekit_out: Path) -> tuple[str, str, float]:
    """equal (the same tensor names, shapes, dtypes, values within tolerance, and tokenizer vocabulary), rounding
    (the same but for values that differ only by rounding) or different; what differs; the largest |diff|."""
    a, b = load_tensors(shoal_out), load_tensors(mergekit_out)
    notes = []
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        notes.append(f"tensor names differ: {len(only_a)} only in shoal {only_a[:2]}, "
                     f"{len(only_b)} only in mergekit {only_b[:2]}")
        a, b = canonical(a), canonical(b)
        if set(a) != set(b):
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            prefixes = sorted({".".join(n.split(".")[:2]) for n in only_a + only_b})
            notes.append(f"with transformers 5 names mapped to the checkpoint's: {len(only_a)} only in shoal, "
                         f"{len(only_b)} only in mergekit (under {', '.join(prefixes[:4])})")
    common = sorted(set(a) & set(b))
    shapes = [n for n in common if a[n].shape != b[n].shape]
    if shapes:
        n = shapes[0]
        notes.append(f"{len(shapes)} tensors differ in shape, e.g. {n}: shoal {tuple(a[n].shape)}, "
                     f"mergekit {tuple(b[n].shape)}")
    dtypes = [n for n in common if a[n].dtype != b[n].dtype]
    if dtypes:
        n = dtypes[0]
        kinds = sorted({f"shoal {str(a[m].dtype)[6:]} / mergekit {str(b[m].dtype)[6:]}" for m in dtypes})
        notes.append(f"{len(dtypes)}/{len(common)} tensors differ in dtype ({'; '.join(kinds)})")
    worst, worst_name, worst_frac, n_bad, beyond_rounding = 0.0, "", 0.0, 0, 0
    for name in common:
        if name in shapes:
            continue
        ok, rounding, diff, frac = tensors_agree(a[name], b[name])
        if not ok:
            n_bad += 1
            beyond_rounding += not rounding
            if diff >= worst:
                worst, worst_name, worst_frac = diff, name, frac
    structural = bool(notes)
    if n_bad:
        notes.append(f"{n_bad}/{len(common)} tensors differ in value ({beyond_rounding} beyond rounding), worst "
                     f"{worst_name} max|diff| {worst:.3g} ({100 * worst_frac:.2g}% of its elements beyond tolerance)")
    elif dtypes:
        notes.append("values agree within the coarser dtype's ulp")
    va, vb = vocabulary(shoal_out), vocabulary(mergekit_out)
    if va != vb:
        if va is None or vb is None:
            notes.append(f"tokenizer.json only in {'mergekit' if va is None else 'shoal'}")
        else:
            extra_a, extra_b = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
            moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
            notes.append(f"tokenizer vocabularies differ: sizes {len(va)} / {len(vb)}, only shoal {extra_a[:3]}, "
                         f"only mergekit {extra_b[:3]}, other ids for {moved[:3]}")
    structural = structural or va != vb
    level = "equal" if not notes else "rounding" if not structural and not beyond_rounding else "different"
    return level, "; ".join(notes), worst


STABLE_SORTS = """
import sys, torch
class StableTorch:
    def __getattr__(self, name):
        return getattr(torch, name)
    @staticmethod
    def argsort(x, dim=-1, descending=False, **kw):
        return torch.sort(x, dim=dim, descending=descending, stable=True).indices
    @staticmethod
    def sort(x, dim=-1, descending=False, **kw):
        return torch.sort(x, dim=dim, descending=descending, stable=True)
    @staticmethod
    def topk(x, k, dim=-1, largest=True, **kw):
        values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
        return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)
import mergekit.sparsify, mergekit.merge_methods.sce
mergekit.sparsify.torch = mergekit.merge_methods.sce.torch = StableTorch()
from mergekit.scripts.SCRIPT import main
sys.argv[0] = "SCRIPT"
main()
"""
"""mergekit's CLI with the sorts of its trimming (TIES, breadcrumbs, SCE) made stable, as tests/test_mergekit_reference.py
does: ties at the threshold then go by index, as in shoal, instead of torch's arbitrary order."""
TRIMMING = {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    source: str
    method: str
    family: str = ""
    layers: int = 0
    shoal: str = "skipped"
    shoal_code: int | None = None
    shoal_error: str = ""
    mergekit: str = "skipped"
    mergekit_code: int | None = None
    mergekit_error: str = ""
    comparison: str = ""
    details: str = ""
    max_diff: float | None = None
    expect_error: bool = False
    note: str = ""
    origin: str = ""
    seconds: dict = field(default_factory=dict)


def random_methods() -> set[str]:
    found = set(RANDOM_METHODS)
    with contextlib.suppress(Exception):
        from shoal.merge.registry import METHODS

        found |= {name for name, m in METHODS.items() if m.random}
    with contextlib.suppress(Exception):
        from mergekit.merge_methods import registry

        for name, m in registry.REGISTERED_MERGE_METHODS.items():
            kind = str(getattr(m, "sparsification_method", None) or "")
            if "random" in kind or "magprune" in kind:
                found.add(name)
    return found


def run_recipe(recipe: Recipe, index: int, work: Path, seed: int, timeout: float, randoms: set[str]) -> Row:
    row = Row(recipe.source, "?", expect_error=recipe.expect_error, note=recipe.note, origin=recipe.origin)
    if recipe.skip:
        row.shoal = row.mergekit = f"skipped: {recipe.skip}"
        return row
    result = rewrite(recipe.text or "", recipe.hint)
    if isinstance(result, str):
        with contextlib.suppress(yaml.YAMLError):
            docs = [d for d in yaml.safe_load_all(recipe.text or "") if isinstance(d, dict)]
            row.method = ">".join(methods_of(docs)) or "-"
        row.shoal = row.mergekit = f"skipped: {result}"
        return row
    docs, mapping, row.family, row.layers = result
    methods = methods_of(docs)
    row.method = ">".join(methods)
    models = work / "models"
    for placeholder in mapping.values():
        build_model(models / placeholder, placeholder)
    for doc in docs:
        map_refs(doc, lambda r: str(models / r) if r in mapping.values() else r)
    folder = work / "runs" / f"{index:03d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    random = any(m in randoms for m in methods)
    seed_args = ["--random-seed", str(seed)] if random else []
    shoal_out, mergekit_out = folder / "shoal", folder / "mergekit"
    shoal_cmd = [sys.executable, "-m", "shoal", "merge", str(path), str(shoal_out), *seed_args]
    if len(docs) > 1:
        mergekit_cmd = [shutil.which("mergekit-multi") or "mergekit-multi", str(path), "--out-path", str(mergekit_out),
                        "-I", str(folder / "mergekit.intermediate"), *seed_args]
    else:
        mergekit_cmd = [shutil.which("mergekit-yaml") or "mergekit-yaml", str(path), str(mergekit_out), *seed_args]
    for tool, command in (("shoal", shoal_cmd), ("mergekit", mergekit_cmd)):
        run = run_tool(tool, command, timeout)
        setattr(row, tool, run.outcome)
        setattr(row, f"{tool}_code", run.code)
        setattr(row, f"{tool}_error", run.error)
        row.seconds[tool] = round(run.seconds, 1)
    if row.shoal == "ok" and row.mergekit == "ok":
        level, row.details, row.max_diff = compare(shoal_out, mergekit_out)
        row.comparison = {"equal": "equal", "rounding": "differ-rounding"}.get(level, "different")
        if random and level != "equal":
            row.comparison = "differ-random"
        if row.comparison == "different" and TRIMMING & set(methods):
            # ties at a trimming threshold: does mergekit with stable sorts write what shoal wrote?
            script = "multimerge" if len(docs) > 1 else "run_yaml"
            stable_out = folder / "mergekit-stable"
            stable_cmd = [sys.executable, "-c", STABLE_SORTS.replace("SCRIPT", script), *mergekit_cmd[1:]]
            stable_cmd[stable_cmd.index(str(mergekit_out))] = str(stable_out)
            if "-I" in stable_cmd:
                stable_cmd[stable_cmd.index("-I") + 1] = str(folder / "mergekit-stable.intermediate")
            stable = run_tool("mergekit", stable_cmd, timeout)
            if stable.outcome == "ok" and compare(shoal_out, stable_out)[0] != "different":
                row.comparison = "differ-ties"
                row.details += "; equal to mergekit's output with stable sorts (ties at the trim threshold)"
            elif stable.outcome == "ok":
                row.details += "; differs from mergekit with stable sorts too"
    elif row.shoal == "ok" or row.mergekit == "ok":
        row.comparison = "only " + ("shoal" if row.shoal == "ok" else "mergekit") + " merged"
    else:
        row.comparison = "neither merged"
    return row


def totals(rows: list[Row]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for tool in ("shoal", "mergekit"):
        outcomes = [getattr(r, tool) for r in rows]
        out[tool] = {
            "recipes": len(rows),
            "accepted": outcomes.count("ok"),
            "equal": sum(r.comparison == "equal" for r in rows),
            "differ-random": sum(r.comparison == "differ-random" for r in rows),
            "differ-ties": sum(r.comparison == "differ-ties" for r in rows),
            "differ-rounding": sum(r.comparison == "differ-rounding" for r in rows),
            "differ": sum(r.comparison == "different" for r in rows),
            "refused": outcomes.count("refused"),
            "crashed": outcomes.count("crashed"),
            "skipped": sum(o.startswith("skipped") for o in outcomes),
        }
    return out


def cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(rows: list[Row]) -> None:
    print(f"{'#':>3}  {'source':<58} {'method':<22} {'shoal':<9} {'mergekit':<9} comparison")
    for i, r in enumerate(rows, 1):
        shoal = "skipped" if r.shoal.startswith("skipped") else r.shoal
        mergekit = "skipped" if r.mergekit.startswith("skipped") else r.mergekit
        comparison = r.comparison or (r.shoal[len("skipped: "):] if r.shoal.startswith("skipped") else "")
        if r.max_diff is not None and r.comparison != "equal":
            comparison += f" (max|diff| {r.max_diff:.3g})"
        if r.expect_error:
            comparison += " [mergekit's test expects an error]"
        if r.note:
            comparison += f" [{r.note}]"
        print(f"{i:>3}  {cell(r.source, 58):<58} {cell(r.method, 22):<22} {shoal:<9} {mergekit:<9} {comparison}")
    print()
    t = totals(rows)
    keys = list(t["shoal"])
    compared = {"equal", "differ-random", "differ-ties", "differ-rounding", "differ"}  # one count for both tools
    print(f"{'':<10}" + "".join(f"{k:>16}" for k in keys))
    for tool in t:
        print(f"{tool:<10}" + "".join(f"{'' if tool == 'mergekit' and k in compared else t[tool][k]:>16}" for k in keys))
    print("(equal ... differ: of the recipes both tools merged. differ-random: a random method, whose masks differ "
          "by design; differ-ties: equal (or rounding) to mergekit run with stable sorts, i.e. only tied magnitudes "
          f"at a trim threshold differ; differ-rounding: every |diff| within {ROUNDING_ULPS} ulps of the tensor's "
          "largest value; differ: anything else, dtype, shape, names and tokenizer included)")
    print()
    print("shoal refuses, crashes on, or differs from mergekit:")
    for i, r in enumerate(rows, 1):
        if r.shoal in ("refused", "crashed"):
            theirs = "mergekit ok" if r.mergekit == "ok" else f"mergekit {r.mergekit}: {r.mergekit_error}"
            expected = " [expected: mergekit's test wants an error]" if r.expect_error else ""
            print(f"  {i:>3} {r.source} ({r.method}): shoal {r.shoal} (exit {r.shoal_code}): {r.shoal_error}"
                  f"{expected}\n        {theirs}")
        elif r.comparison.startswith("differ"):
            print(f"  {i:>3} {r.source} ({r.method}): {r.comparison}: {r.details}")
    print()
    print("mergekit refuses or crashes on:")
    for i, r in enumerate(rows, 1):
        if r.mergekit in ("refused", "crashed"):
            print(f"  {i:>3} {r.source} ({r.method}): mergekit {r.mergekit} (exit {r.mergekit_code}): {r.mergekit_error}")
    skipped = [(i, r) for i, r in enumerate(rows, 1) if r.shoal.startswith("skipped")]
    if skipped:
        print()
        print("skipped:")
        for i, r in skipped:
            print(f"  {i:>3} {r.source}: {r.shoal[len('skipped: '):]}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in ("mergekit", "torch", "transformers", "tokenizers", "safetensors", "pydantic"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    out["shoal"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip() or "unknown"
    return out


def collect(sources: list[Source], work: Path, with_tests: bool) -> list[Recipe]:
    recipes = example_and_doc_recipes(sources)
    return recipes + suite_recipes(sources, work) if with_tests else recipes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-src", type=Path, action="append", required=True,
                    help="a mergekit checkout, unpacked sdist, or (bare) git directory; repeat to combine: each file "
                         "(and the tests/ folder as a whole) comes from the first one that has it")
    ap.add_argument("--ref", help="revision to read from git directories (default: v0.1.5 if tagged, else HEAD)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/shoal-corpus"))
    ap.add_argument("--seed", type=int, default=42, help="--random-seed for both tools on random methods")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per tool per recipe")
    ap.add_argument("--only", help="run only the recipes whose source matches this regular expression")
    ap.add_argument("--no-tests", action="store_true", help="leave out the recipes of mergekit's test suite")
    ap.add_argument("--list", action="store_true", help="list the corpus and exit")
    ap.add_argument("--json", type=Path, help="write rows, totals and versions here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sources = [Source(path.resolve(), args.ref) for path in args.mergekit_src]
    args.work.mkdir(parents=True, exist_ok=True)
    recipes = collect(sources, args.work, not args.no_tests)
    if args.only:
        recipes = [r for r in recipes if re.search(args.only, r.source)]
    for source in sources:
        print(f"mergekit sources: {source.path} at {source.ref} ({source.commit[:12]})")
    print(f"{len(recipes)} recipes", flush=True)
    if args.list:
        for r in recipes:
            print(f"  {r.source}  [{r.origin}]" + (f"  (skip: {r.skip})" if r.skip else ""))
        return
    randoms = random_methods()
    rows = []
    for i, recipe in enumerate(recipes, 1):
        row = run_recipe(recipe, i, args.work, args.seed, args.timeout, randoms)
        rows.append(row)
        print(f"[{i}/{len(recipes)}] {row.source}: shoal {row.shoal}, mergekit {row.mergekit}"
              f"{', ' + row.comparison if row.comparison else ''}", flush=True)
    print()
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"sources": [{"path": str(s.path), "ref": s.ref, "commit": s.commit} for s in sources],
                  "seed": args.seed, "versions": versions(), "totals": totals(rows),
                  "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

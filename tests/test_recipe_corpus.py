"""benchmarks/recipe_corpus.py's recipe handling: rewriting a recipe's model references keeps everything else, and
the Markdown blocks it takes are the YAML ones that name a merge method (hand-written recipes; no mergekit files)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_corpus.py"
spec = importlib.util.spec_from_file_location("recipe_corpus", SCRIPT)
corpus = importlib.util.module_from_spec(spec)
sys.modules["recipe_corpus"] = corpus  # its dataclasses look their module up
spec.loader.exec_module(corpus)

RECIPE = """\
name: first
merge_method: slerp
base_model: org/Mistral-7B-v0.1
slices:
  - sources:
      - model: org/Mistral-7B-v0.1
        layer_range: [0, 12]
      - model: other/BioMistral-7B@main
        layer_range: [0, 12]
parameters:
  t: [0, 0.5, 1]
dtype: bfloat16
---
merge_method: ties
base_model: first
models:
  - model: first
    parameters: {weight: 0.5, density: 0.5}
  - model: team/Hermes-Mistral-chatml
    parameters: {weight: 0.5, density: [1, 0.7]}
tokenizer:
  source: union
  tokens:
    <|im_start|>: {source: team/Hermes-Mistral-chatml, force: true}
    <s>: {source: {kind: model_token, model: org/Mistral-7B-v0.1, token_id: 1}}
    <pad>: {source: {kind: zero}}
chat_template: chatml
"""


def test_rewrite_replaces_only_model_references() -> None:
    docs, mapping, family, depth = corpus.rewrite(RECIPE)
    original = list(yaml.safe_load_all(RECIPE))
    assert (family, depth) == ("mistral", 12)
    assert list(mapping) == ["org/Mistral-7B-v0.1", "other/BioMistral-7B@main", "team/Hermes-Mistral-chatml"]
    assert len(set(mapping.values())) == 3
    assert mapping["team/Hermes-Mistral-chatml"].startswith("mistral-L12-chatml-")
    # putting the original names back gives the original recipe: nothing else moved
    back = {v: k for k, v in mapping.items()}
    assert [corpus.map_refs(copy.deepcopy(d), lambda r: back.get(r, r)) for d in docs] == original
    first, final = docs
    assert first["base_model"] == first["slices"][0]["sources"][0]["model"] == mapping["org/Mistral-7B-v0.1"]
    assert final["base_model"] == final["models"][0]["model"] == "first"  # a document's name is not a model
    assert final["tokenizer"]["source"] == "union"
    assert final["tokenizer"]["tokens"]["<s>"]["source"]["model"] == mapping["org/Mistral-7B-v0.1"]
    assert final["tokenizer"]["tokens"]["<pad>"]["source"] == {"kind": "zero"}


def test_skips_and_families() -> None:
    assert "LoRA" in corpus.rewrite("merge_method: linear\nmodels:\n  - model: base+some/adapter\n")
    assert corpus.rewrite("genome:\n  merge_method: ties\n").startswith("not a merge recipe")
    assert corpus.family_of(["a/Qwen2-0.5B", "b/qwen-chat"]) == "qwen2"
    assert corpus.family_of(["model_a", "model_b"]) == "llama"
    assert corpus.layers_needed([{"merge_method": "linear", "models": [{"model": "a"}]}]) == corpus.DEFAULT_LAYERS


def test_markdown_blocks() -> None:
    text = ("Intro\n```yaml\nmerge_method: linear\nmodels: []\n```\n"
            "```python\nmerge_method = 'linear'\n```\n```yml\ntokenizer_source: union\n```\n")
    assert corpus.markdown_blocks(text) == ["merge_method: linear\nmodels: []\n"]


def test_one_ulp_is_equal_and_two_are_not() -> None:
    import torch

    a = torch.tensor([1.0, 0.5, 0.0], dtype=torch.bfloat16)
    step = torch.tensor([2**-7, 2**-8, 0.0], dtype=torch.bfloat16)
    assert corpus.tensors_agree(a, a + step)[0]
    equal, rounding, worst, _ = corpus.tensors_agree(a, a + 2 * step)
    assert not equal and rounding and worst == 2**-6

"""The model card (README.md) of a merged model folder, in the Hugging Face Hub's convention for merges."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from shoal.checkpoint.reference import parse_reference

METHOD_PAPERS: dict[str, tuple[str, str | None]] = {
    "linear": ("Linear (model soups)", "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("Linear DARE", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("Linear DELLA", "https://arxiv.org/abs/2406.11617"),
    "sce": ("SCE", "https://arxiv.org/abs/2408.07990"),
    "ram": ("Reinforced Agent Merging", "https://arxiv.org/abs/2601.13572"),
    "ramplus_tl": ("Reinforced Agent Merging Plus (tensor-local)", "https://arxiv.org/abs/2601.13572"),
    "karcher": ("Karcher Mean", "https://arxiv.org/abs/2603.04972"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "slerp": ("SLERP", "https://doi.org/10.1145/325165.325242"),
    "multislerp": ("Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "nearswap": ("NearSwap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    "nuslerp": ("NuSLERP", None),
    "arcee_fusion": ("Arcee Fusion", None),
    "passthrough": ("Passthrough", None),
}
"""Each merge method's name and where it was introduced (a paper, else the post or model that did; None where
neither exists), the links mergekit's cards give save slerp's: Shoemake's paper rather than Wikipedia."""

TAGS = ["merge", "mergekit-compatible", "shoal"]


def _method_md(method: str) -> str:
    name, url = METHOD_PAPERS.get(method, (method, None))
    return f"[{name}]({url})" if url else name


def _code_block(text: str) -> str:
    """text as a fenced YAML block, its fence longer than any run of backticks inside it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}yaml\n{text.rstrip(chr(10))}\n{fence}"


def write_model_card(
    folder: Path,
    *,
    name: str,
    method: str,
    parents: Sequence[str],
    base: str | None,
    recipe_file: str,
    recipe_text: str,
    remake: str | None = None,
    vision: str | None = None,
    vision_merged: bool = False,
) -> None:
    """README.md: front matter whose base_model lists the parents named by Hub id and their LoRA adapters, without
    revisions (the Hub takes nothing else there; local folders are named in the body), then the method with its
    paper, the parents and the recipe.

    A merge method's card is tagged mergekit-compatible (its recipe is in mergekit's format); another (a data-flow
    path) is not.
    """
    meta = {
        "base_model": list(dict.fromkeys(i for p in parents for i in parse_reference(p).hub_ids())),
        "library_name": "transformers",
        "tags": TAGS if method in METHOD_PAPERS else [t for t in TAGS if t != "mergekit-compatible"],
    }
    using = f", with `{base}` as the base" if base else ""
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {name}", "",
             f"A merge of pre-trained language models made by shoal with the {_method_md(method)} merge method{using}.",
             "", "## Models merged", ""]
    lines += [f"- `{p}`" for p in parents if p != base]
    if vision and vision_merged:
        lines += ["", f"A vision-language model: every module (language model, vision tower, projector) is merged "
                  f"by the recipe; the processor is `{vision}`'s."]
    elif vision:
        lines += ["", f"A vision-language model: its language model is the merge; the vision tower, projector and "
                  f"processor are `{vision}`'s, unchanged."]
    lines += ["", "## Recipe", "",
              remake or f"Also in `{recipe_file}`; `shoal merge {recipe_file} OUT` remakes this model.", "",
              _code_block(recipe_text), ""]
    (folder / "README.md").write_text("\n".join(lines))

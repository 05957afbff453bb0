"""`shoal merge RECIPE OUT_DIR`."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TaskID

from shoal import yamlfile
from shoal.cache import Storage, stored_in
from shoal.cli.app import app
from shoal.cli.progress import bar, console
from shoal.devices import ACCEPTED, is_device_name
from shoal.errors import Interrupted, ShoalError
from shoal.threads import cpu_sample, spare_threads, torch_threads

_MERGEKIT_SIZE = re.compile(r"^(\d+)([KkMmBb]?)$")
_MERGEKIT_UNITS = {"": 1, "k": 1000, "m": 1000**2, "b": 1000**3}


def _shard_bytes(shard_size: float | None, out_shard_size: str | None) -> int:
    """The largest shard in bytes, from --shard-size (GB, 2 if neither is given) or mergekit's --out-shard-size: a
    whole number with an optional K, M or B suffix (thousands, millions, billions), counted in bytes by mergekit's
    writer as by shoal's."""
    if shard_size is not None and out_shard_size is not None:
        raise ShoalError("--shard-size and --out-shard-size both set the shard size; give one of them")
    if out_shard_size is not None:
        match = _MERGEKIT_SIZE.match(out_shard_size)
        if not match or int(match[1]) == 0:
            raise ShoalError(f"--out-shard-size {out_shard_size}: give a whole number of bytes above 0, "
                             "optionally with K, M or B for thousands, millions or billions (e.g. 5B, 500M)")
        return int(match[1]) * _MERGEKIT_UNITS[match[2].lower()]
    shard_size = 2.0 if shard_size is None else shard_size
    if not (math.isfinite(shard_size) and shard_size * 1024**3 >= 1):
        raise ShoalError(f"--shard-size {shard_size:g}: give the largest shard's size in GB, a number above 0")
    return int(shard_size * 1024**3)


def _merge_device(device: str | None, cuda: bool) -> str:
    """--device, or cuda for mergekit's --cuda (a --device naming a CUDA GPU picks which); --device auto is cuda
    where a CUDA GPU is available (or --cuda asks for one), else cpu."""
    if device not in (None, "auto") and not is_device_name(device):
        raise ShoalError(f"--device {device}: unknown device ({ACCEPTED}, auto)")
    if device == "auto":
        import torch

        device = "cuda" if cuda or torch.cuda.is_available() else "cpu"
    if cuda and device is not None and not device.startswith("cuda"):
        raise ShoalError(f"--cuda and --device {device} disagree; give one of them")
    return device or ("cuda" if cuda else "cpu")


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe in mergekit's YAML format.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (written atomically).")],
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda, cuda:N, mps, or auto (cuda if a CUDA GPU is available, else cpu).",
        show_default="cpu")] = None,
    cuda: Annotated[bool, typer.Option("--cuda", help="mergekit's name for --device cuda.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists (a model folder only: one with a "
                                            "config.json, or empty).")] = False,
    seed: Annotated[int | None, typer.Option(
        "--seed", "--random-seed",
        help="Seed of the random drops of DARE and DELLA (overrides the recipe's seed); --random-seed is mergekit's "
             "name.")] = None,
    shard_size: Annotated[float | None, typer.Option(
        help="Largest shard, in GB (more than 0).", show_default="2")] = None,
    out_shard_size: Annotated[str | None, typer.Option(
        metavar="SIZE", help="Largest shard in mergekit's form: bytes, with K, M or B for thousands, millions or "
                             "billions (5B, 500M); instead of --shard-size.")] = None,
    copy_tokenizer: Annotated[bool, typer.Option(
        "--copy-tokenizer/--no-copy-tokenizer",
        help="Copy the base's (or first model's) tokenizer and processor files; as in mergekit, a recipe's "
             "tokenizer_source is written either way.")] = True,
    allow_crimes: Annotated[bool, typer.Option(
        "--allow-crimes",
        help="Accepted for mergekit's command lines, and changes nothing: mergekit needs it to mix architectures; "
             "shoal mixes only where that is safe (a vision-language model with LLMs of its language model's "
             "architecture) and refuses other mixes either way.")] = False,
    intermediate_dir: Annotated[Path | None, typer.Option(
        "--intermediate-dir", "-I",
        help="Where a recipe of several documents writes the merges of its named documents (NAME/ in it), which "
             "a rerun reuses while intact.", show_default="OUT_DIR.intermediate beside OUT_DIR")] = None,
    transformers_cache: Annotated[Path | None, typer.Option(
        metavar="DIR", help="The Hugging Face Hub cache that parents given by Hub id are found in and downloaded "
                            "into.", show_default="huggingface_hub's, HF_HUB_CACHE")] = None,
    lora_merge_cache: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Where MODEL+ADAPTER parents are applied (a folder per model, adapter and dtype) and "
                            "reused from.", show_default="$XDG_CACHE_HOME/shoal/lora")] = None,
    lora_merge_dtype: Annotated[str | None, typer.Option(
        metavar="DTYPE", help="The dtype MODEL+ADAPTER parents are applied in, named as a recipe's dtype (float32, "
                              "bfloat16, fp16, ...): W + B A summed in float32 at least, rounded once.",
        show_default="the model's own")] = None,
    num_threads: Annotated[int | None, typer.Option(
        "--num-threads", "-j", min=1, help="CPU threads for torch during the merge.",
        show_default="one per core not busy with other work, at most torch's")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", help="No progress bar or notices; warnings and errors are still printed.")] = False,
) -> None:
    """Merge the parents named in RECIPE into a new model folder OUT_DIR (a recipe file of several `---`-separated
    documents, as mergekit-multi takes, merges each in turn; its output is the document without `name:`)."""
    started = cpu_sample()  # what other processes use from here to the merge sets its threads (the imports take ~1 s)
    import torch

    from shoal.merge.multi import merge_documents
    from shoal.merge.plan import parse_dtype
    from shoal.recipe_documents import as_text, load_documents, with_seed

    del allow_crimes  # a no-op, documented in its help
    max_shard_bytes = _shard_bytes(shard_size, out_shard_size)
    device = _merge_device(device, cuda)
    places = Storage(hub_cache=transformers_cache, lora_cache=lora_merge_cache,
                     lora_dtype=parse_dtype(lora_merge_dtype, "--lora-merge-dtype"))
    documents = load_documents(recipe)
    if seed is not None:
        documents = with_seed(documents, seed)
    intermediate_dir = intermediate_dir or out_dir.parent / f"{out_dir.name}.intermediate"
    progress = bar(disable=quiet)
    tasks: dict[str, TaskID] = {}

    fewer: str | None = None

    def show(label: str, done: int, total: int) -> None:
        if label not in tasks:
            if fewer is not None and not tasks:
                notice(fewer)  # here, so that an error found first comes alone
            progress.start()  # only once the recipe and parents have been checked
            tasks[label] = progress.add_task(f"merging {label}" if len(documents) > 1 else "merging tensors")
        progress.update(tasks[label], completed=done, total=total)

    def notice(message: str) -> None:
        if not quiet:
            progress.console.print(escape(message), highlight=False, soft_wrap=True)

    cpu = torch.device(device).type == "cpu"
    spare = spare_threads(started, torch.get_num_threads()) if num_threads is None and cpu else None
    if spare is not None and spare.threads < torch.get_num_threads():
        num_threads = spare.threads
        fewer = (f"merging on {spare.threads} torch thread{'s' if spare.threads > 1 else ''}: {spare.load} (-j N "
                 "sets the count)")
    try:
        with stored_in(places), torch_threads(num_threads):
            merge_documents(
                documents,
                out_dir,
                intermediate_dir,
                recipe_text=yamlfile.read_text(recipe) if seed is None else as_text(documents),
                notice=notice,
                on_tensor=show,
                device=device,
                overwrite=overwrite,
                max_shard_bytes=max_shard_bytes,
                copy_tokenizer=copy_tokenizer,
            )
    except KeyboardInterrupt:
        kept = "the earlier OUT_DIR is unchanged" if overwrite and out_dir.exists() else "nothing was written"
        if len(documents) > 1:
            kept += f"; the intermediate merges finished are kept in {intermediate_dir} and reused"
        raise Interrupted(f"{out_dir}: {kept} (no half-written model is left); run the command again to merge") from None
    finally:
        progress.stop()
    if not quiet:
        console(stderr=True).print(f"wrote [bold]{escape(str(out_dir))}[/]")

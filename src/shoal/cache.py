"""Where shoal keeps what it makes once and reuses (the demo zoo, parents with a LoRA applied), and where a command
finds and makes the folders that model strings name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cache_dir(name: str) -> Path:
    """$XDG_CACHE_HOME/shoal/NAME, or ~/.cache/shoal/NAME."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shoal" / name


@dataclass(frozen=True)
class Storage:
    """What decides the folder a model string names besides the string itself: the Hugging Face Hub cache a Hub id
    is found in (or downloaded into), and where and in which dtype a `model+lora` is applied (mergekit-yaml's
    --transformers-cache, --lora-merge-cache and --lora-merge-dtype)."""

    hub_cache: Path | None = None
    """None: huggingface_hub's own cache (HF_HUB_CACHE, ~/.cache/huggingface/hub)."""
    lora_cache: Path | None = None
    """None: $XDG_CACHE_HOME/shoal/lora (~/.cache/shoal/lora)."""
    lora_dtype: torch.dtype | None = None
    """None: each tensor of the applied model in the dtype the model stores it in."""

    @property
    def lora_folder(self) -> Path:
        """The folder applied adapters are made in and reused from."""
        return self.lora_cache or cache_dir("lora")


_STORAGE: ContextVar[Storage] = ContextVar("shoal.cache.storage", default=Storage())


def storage() -> Storage:
    """The Storage set by the innermost `stored_in` around this call (the defaults outside any). A context variable:
    a thread started inside sees the defaults, so model strings are resolved in the command's own thread."""
    return _STORAGE.get()


@contextmanager
def stored_in(places: Storage) -> Iterator[Storage]:
    """Resolve model strings with places for the duration of the block (restored after it, even on error)."""
    token = _STORAGE.set(places)
    try:
        yield places
    finally:
        _STORAGE.reset(token)

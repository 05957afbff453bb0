"""Where shoal keeps what it makes once and reuses (the demo zoo, parents with a LoRA applied)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """$XDG_CACHE_HOME/shoal/NAME, or ~/.cache/shoal/NAME."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shoal" / name

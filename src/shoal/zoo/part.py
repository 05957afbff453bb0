"""The record of a part added to a built zoo (vlm.json, pool.json): read, checked against the files it lists, reused
when built with the same settings, written atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from shoal.errors import ShoalError
from shoal.zoo.build import _damaged

T = TypeVar("T")


@dataclass(frozen=True)
class PartRecord(Generic[T]):
    """A part's JSON record beside a zoo: its file name, what users call it, the command that builds it, and how
    a record's data becomes the part's description."""

    name: str
    what: str
    flag: str
    parse: Callable[[dict], T]

    def path(self, root: Path) -> Path:
        return root / self.name

    def rebuild(self, root: Path) -> str:
        return f"`shoal zoo build {self.flag} --out {root}`"

    def read(self, root: Path) -> tuple[dict, T]:
        """The record's data and the part it describes; a damaged record is an error naming how to rebuild it."""
        path = self.path(root)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data, self.parse(data)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ShoalError(f"{path} is damaged ({e}); run {self.rebuild(root)} to rebuild it") from e

    def load(self, root: Path) -> T:
        """The part, after checking every file against the sizes and hashes its record holds."""
        if not self.path(root).is_file():
            raise ShoalError(f"{self.path(root)} not found; build the {self.what} with {self.rebuild(root)}")
        data, part = self.read(root)
        damaged = _damaged(root, data.get("files", {}))
        if damaged:
            raise ShoalError(f"{self.what} of the zoo at {root}: {damaged}; run {self.rebuild(root)} to rebuild it")
        return part

    def cached(self, root: Path, digest: str) -> tuple[T | None, str | None]:
        """The part already built with these settings (digest) and intact, or None and why it cannot be reused
        (None when it was simply never built, or built with other settings)."""
        if not self.path(root).is_file():
            return None, None
        try:
            data, part = self.read(root)
        except ShoalError as e:
            return None, str(e)
        if data.get("settings_hash") != digest:
            return None, None
        damaged = _damaged(root, data.get("files", {}))
        return (None, damaged) if damaged else (part, None)

    def reuse(self, root: Path, digest: str, notice: Callable[[str], None] | None) -> T | None:
        """The part already built with these settings and intact; else None, with the stale record removed and
        notice told why a damaged part is rebuilt."""
        cached, damaged = self.cached(root, digest)
        if cached is not None:
            return cached
        if damaged and notice:
            notice(f"the {self.what} of the zoo at {root} cannot be reused ({damaged}); rebuilding it")
        self.path(root).unlink(missing_ok=True)
        return None

    def write(self, root: Path, data: dict) -> T:
        """Write the record atomically; return the part it describes."""
        tmp = root / f".{self.name}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path(root))
        return self.parse(data)

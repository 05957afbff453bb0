"""What a recipe's model string names, as mergekit reads it: `MODEL[@REVISION][+ADAPTER[@REVISION]]`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import ShoalError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Location:
    """A local folder, or a Hub id at a revision (a branch, tag or commit; None: the main branch)."""

    path: str
    revision: str | None = None

    @property
    def is_hub_id(self) -> bool:
        return not Path(self.path).expanduser().exists() and bool(HUB_ID.match(self.path))

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


@dataclass(frozen=True)
class ModelReference:
    """A model, and the PEFT LoRA adapter to apply to it before merging (None: the model as it is)."""

    model: Location
    lora: Location | None = None

    def hub_ids(self) -> list[str]:
        """The Hub ids it names (model, then adapter), without revisions: what a model card's base_model lists."""
        return [place.path for place in (self.model, self.lora) if place is not None and place.is_hub_id]


def _location(text: str, ref: str) -> Location:
    if Path(text).expanduser().exists():  # a folder whose name holds '@' is that folder
        return Location(text)
    path, at, revision = text.partition("@")
    if not path or (at and not revision) or "@" in revision:
        raise ShoalError(f"model {ref!r}: {text!r} is not of the form PATH or ORG/NAME[@REVISION]")
    if at and Path(path).expanduser().exists():
        raise ShoalError(f"model {ref!r}: {path} is a local folder, and @{revision} picks a revision of a Hub "
                         f"repository only; drop @{revision}")
    return Location(path, revision or None)


def parse_reference(ref: str | Path) -> ModelReference:
    """Split a model string into model and adapter (at '+') and each into path and revision (at '@'), as mergekit
    does; a string that is an existing path is that path whatever it holds. A malformed string is a ShoalError."""
    text = str(ref)
    if Path(text).expanduser().exists():
        return ModelReference(Location(text))
    parts = text.split("+")
    if len(parts) > 2:
        raise ShoalError(f"model {text!r}: more than one '+'; give MODEL or MODEL+LORA_ADAPTER")
    if any(not part for part in parts):
        raise ShoalError(f"model {text!r}: an empty model or adapter around '+'; give MODEL+LORA_ADAPTER")
    return ModelReference(_location(parts[0], text), _location(parts[1], text) if len(parts) == 2 else None)

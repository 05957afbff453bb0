"""What a recipe's model string names, as mergekit reads it: `MODEL[@REVISION][+ADAPTER[@REVISION]]`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import ShoalError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
"""A Hub revision that is a commit (its full hash): the one revision whose files cannot change."""


@dataclass(frozen=True)
class Location:
    """A local folder, or a Hub id at a revision (a branch, tag or commit; None: the main branch)."""

    path: str
    revision: str | None = None

    @property
    def is_hub_id(self) -> bool:
        return not Path(self.path).expanduser().exists() and bool(HUB_ID.match(self.path))

    @property
    def movable(self) -> bool:
        """Whether it is a Hub id at a branch or tag (None: main), whose commit can move on."""
        return self.is_hub_id and not (self.revision is not None and COMMIT.match(self.revision))

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


@dataclass(frozen=True)
class ModelReference:
    """A model, and the PEFT LoRA adapter to apply to it before merging (None: the model as it is)."""

    model: Location
    lora: Location | None = None

    def hub_ids(self) -> list[str]:
        """The Hub ids it names (model, then adapter), without revisions: what a model card's base_model lists."""
        return [place.path for place in self.places if place.is_hub_id]

    @property
    def places(self) -> list[Location]:
        """The model's location, then the adapter's."""
        return [self.model] if self.lora is None else [self.model, self.lora]

    def pinned(self, commits: dict[str, str]) -> ModelReference:
        """This reference with each location that is a key of commits (as str gives it) at that commit."""
        at = lambda place: Location(place.path, commits[str(place)]) if str(place) in commits else place
        return ModelReference(at(self.model), self.lora and at(self.lora))

    def __str__(self) -> str:
        return str(self.model) if self.lora is None else f"{self.model}+{self.lora}"


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

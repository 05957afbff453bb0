"""Damage to an Optuna journal file (one JSON record a line), mended where no stored trial is put at risk, else
named by its line.

A crash or a full disk can leave the last line torn (no newline): it is cut once a writer holds the journal's
lock (`MendingLock`). A damaged complete line (not JSON, or a record cut short and followed by the next one) makes
Optuna refuse the whole file; `recover` drops such lines from a run folder's own journal, keeping a copy of the
damaged file, when the records after them cannot depend on what they held; `check` names the first one.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import NoReturn

from optuna.storages.journal import JournalFileSymlinkLock
from optuna.trial import TrialState

from shoal.errors import ShoalError

CREATE_STUDY, CREATE_TRIAL = 0, 4
"""Op codes of the journal's records (Optuna's JournalOperation, fixed by the file format)."""


class MendingLock(JournalFileSymlinkLock):
    """Optuna's default journal lock, which also drops a torn last line (see `drop_torn_line`) once it is held, so
    every process appends after complete lines only, whoever left the torn one."""

    def __init__(self, journal: str) -> None:
        super().__init__(journal)
        self.journal = Path(journal)

    def acquire(self) -> bool:
        held = super().acquire()
        if held:
            drop_torn_line(self.journal)
        return held


def drop_torn_line(path: Path) -> bool:
    """Cut the unfinished last line that a write interrupted by a crash or a full disk leaves in an Optuna journal
    (Optuna would join the next record to it and lose that trial); every complete line, so every stored trial, is
    kept. Only a file whose first line is a journal record is touched. Call it holding the journal's lock."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return False
        handle.seek(0)
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end == 0 or _record(data[:data.index(b"\n")]) is None:
            return False
        handle.truncate(end)
    return True


def _record(line: bytes) -> dict | None:
    """The journal record a line holds, or None if it is damaged."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("op_code"), int) else None


def _lines(path: Path) -> list[tuple[bytes, dict | None]]:
    """The complete lines of a journal with their records (None: damaged); a torn last line is left out."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    return [(line, _record(line)) for line in lines]


def intact(path: Path) -> tuple[bytes, list[int]]:
    """A journal's complete, undamaged lines (what a reader can load; a torn last line is left out) and the numbers
    of its damaged ones; refused, as `recover` refuses, where records after a damaged line may depend on it."""
    lines = _lines(path)
    damaged = _damaged(lines)
    if damaged and not _droppable(lines, damaged[0]):
        _refuse(path, damaged[0])
    return _kept(lines), damaged


def _damaged(lines: list[tuple[bytes, dict | None]]) -> list[int]:
    """The numbers (from 1) of the damaged lines."""
    return [n for n, (_, record) in enumerate(lines, start=1) if record is None]


def _kept(lines: list[tuple[bytes, dict | None]]) -> bytes:
    """The intact lines, as the file holds them."""
    return b"".join(line + b"\n" for line, record in lines if record is not None)


def named_lines(numbers: list[int]) -> str:
    """Line numbers as a message gives them: the first five, then '...'."""
    return ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")


def _droppable(lines: list[tuple[bytes, dict | None]], first: int) -> bool:
    """Whether the damaged lines from line `first` on can be left out: the study was created before it and every
    intact record after it is a whole stored trial (trial ids are then referred to by nothing)."""
    before = [record for _, record in lines[: first - 1]]
    studies = sum(r is not None and r["op_code"] == CREATE_STUDY for r in before)
    after = [record for _, record in lines[first:] if record is not None]
    return bool(studies) and all(_whole_trial(record, studies) for record in after)


def check(path: Path) -> None:
    """Refuse a journal with a damaged line, naming the first."""
    damaged = _damaged(_lines(path))
    if damaged:
        _refuse(path, damaged[0])


def _refuse(path: Path, line: int) -> NoReturn:
    raise ShoalError(f"{path}: line {line} is not an Optuna journal record (damaged); stop every process using the "
                     "file, then delete that line or restore the file from a backup")


def recover(path: Path) -> str | None:
    """Drop a run folder's own journal's damaged lines (call it holding the folder's lock: nobody else reads or
    writes the file); return what was done, in one line, or None if nothing was damaged.

    Safe only when the study was created before the first damaged line and every record after it is a whole
    stored trial (how `shoal evolve` stores trials in its own journal): trial ids are then referred to by nothing,
    so a dropped line costs at most the trial it held, which the search scores again. Otherwise refused."""
    lines = _lines(path)
    damaged = _damaged(lines)
    if not damaged:
        return None
    if not _droppable(lines, damaged[0]):
        raise ShoalError(f"{path}: line {damaged[0]} is not an Optuna journal record (damaged), and the records "
                         "after it may depend on it; restore the file from a backup, or move its run folder away "
                         "to start the search again")
    backup = next(p for k in itertools.count(1)
                  if not (p := path.with_name(f"{path.name}.damaged" + (f"-{k}" if k > 1 else ""))).exists())
    shutil.copy2(path, backup)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(_kept(lines))
    tmp.replace(path)
    several = len(damaged) > 1
    return (f"{path}: dropped {len(damaged)} damaged line{'s' if several else ''} (line {named_lines(damaged)}) and "
            f"kept every intact record; the damaged file is saved as {backup.name}; a trial lost with "
            f"{'them' if several else 'it'} is scored again")


def _whole_trial(record: dict, studies: int) -> bool:
    """A trial stored whole (created finished) in one of the first `studies` studies."""
    finished = (TrialState.COMPLETE.value, TrialState.FAIL.value, TrialState.PRUNED.value)
    return (record["op_code"] == CREATE_TRIAL and record.get("state") in finished
            and isinstance(record.get("study_id"), int) and 0 <= record["study_id"] < studies)

"""Where a study lives: an Optuna storage URL (SQLite, PostgreSQL, ...), or an Optuna journal file.

A run folder's own study is a journal file (RUN_DIR/study.log): storing a trial appends one line (under 1 ms)
where SQLite through Optuna's ORM spends about 27 ms of Python for 20 genes (benchmarks/storage.py). A storage
the user names may be either. optuna-dashboard opens both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

JOURNAL = "study.log"


def is_journal(storage: str) -> bool:
    """A file path rather than a URL."""
    return "://" not in storage


def default_storage(run_dir: Path) -> str:
    """The study of a run folder: its journal file."""
    return str(run_dir.resolve() / JOURNAL)


def open_storage(storage: str) -> BaseStorage:
    """The Optuna storage behind a URL or a journal file's path (created if missing)."""
    if not is_journal(storage):
        return optuna.storages.get_storage(storage)
    return JournalStorage(JournalFileBackend(storage, lock_obj=MendingLock(storage)))


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
        if end == 0 or not _is_record(data[:data.index(b"\n")]):
            return False
        handle.truncate(end)
    return True


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(record := json.loads(line), dict) and "op_code" in record
    except ValueError:
        return False

"""Where a study lives: an Optuna storage URL (SQLite, PostgreSQL, ...), or an Optuna journal file.

A run folder's own study is a journal file (RUN_DIR/study.log): storing a trial appends one line (under 1 ms)
where SQLite through Optuna's ORM spends about 20 ms of Python for 20 genes (BENCHMARKS.md). Folders made
before keep their SQLite file (RUN_DIR/study.db). optuna-dashboard opens either.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

JOURNAL = "study.log"
SQLITE = "study.db"


def is_journal(storage: str) -> bool:
    """A file path rather than a URL."""
    return "://" not in storage


def default_storage(run_dir: Path) -> str:
    """The study of a run folder: its SQLite file if an earlier shoal made one, else a journal file."""
    run_dir = run_dir.resolve()
    return f"sqlite:///{run_dir / SQLITE}" if (run_dir / SQLITE).exists() else str(run_dir / JOURNAL)


def open_storage(storage: str, *, repair: bool = False) -> BaseStorage:
    """The Optuna storage behind a URL or a journal file's path (created if missing). repair: first drop the
    torn last line a crash may have left in a journal (see `drop_torn_line`)."""
    if not is_journal(storage):
        return optuna.storages.get_storage(storage)
    if repair:
        drop_torn_line(Path(storage))
    return JournalStorage(JournalFileBackend(storage))


def drop_torn_line(path: Path) -> bool:
    """Cut the unfinished last line that a write interrupted by a crash or a full disk leaves in an Optuna journal
    (Optuna would join the next record to it, losing that trial, and refuse the file once more follow); every
    complete line, so every stored trial, is kept. Only a file whose first line is a journal record is touched. True if a line was cut."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's appends take: no write is cut off by this one
    lock.acquire()
    try:
        with open(path, "rb+") as handle:
            data = handle.read()
            end = data.rfind(b"\n") + 1
            if data.endswith(b"\n") or end == 0 or not _is_record(data[:data.index(b"\n")]):
                return False
            handle.truncate(end)
        return True
    finally:
        lock.release()


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(record := json.loads(line), dict) and "op_code" in record
    except ValueError:
        return False

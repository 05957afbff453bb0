"""Where a study lives: an Optuna storage URL (SQLite, PostgreSQL, ...), or an Optuna journal file.

A run folder's own study is a journal file (RUN_DIR/study.log): storing a trial appends one line (under 1 ms)
where SQLite through Optuna's ORM spends about 27 ms of Python for 20 genes (benchmarks/storage.py). A storage
the user names may be either. optuna-dashboard opens both.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from shoal.errors import ShoalError
from shoal.search import journal

JOURNAL = "study.log"


def is_journal(storage: str) -> bool:
    """A file path rather than a URL."""
    return "://" not in storage


def default_storage(run_dir: Path) -> str:
    """The study of a run folder: its journal file."""
    return str(run_dir.resolve() / JOURNAL)


def open_storage(storage: str) -> BaseStorage:
    """The Optuna storage behind a URL or a journal file's path (created if missing); a journal with a damaged
    line is refused, naming it."""
    if not is_journal(storage):
        return optuna.storages.get_storage(storage)
    journal.check(Path(storage))
    return JournalStorage(JournalFileBackend(storage, lock_obj=journal.MendingLock(storage)))


def shared_backend(url: str) -> str:
    """The database behind a storage URL a study is shared through: sqlite or postgresql, the two whose processes
    shoal can lock (shared.StorageLock); another is refused."""
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ShoalError(f"sharing a study needs PostgreSQL, SQLite or a journal file, not {backend}")
    return backend


def existing_storage(storage: str) -> BaseStorage | None:
    """The storage behind a URL or journal file, opened to read without creating anything; None where it holds no
    study yet: a file not made yet, a database without Optuna's tables."""
    if is_journal(storage):
        return open_storage(storage) if Path(storage).is_file() else None
    url = make_url(storage)
    backend = shared_backend(storage)
    if backend == "sqlite" and not (url.database and Path(url.database).is_file()):
        return None
    engine = create_engine(url)
    try:
        if not inspect(engine).has_table("studies"):
            return None
    finally:
        engine.dispose()
    return RDBStorage(storage, skip_table_creation=True)

"""One study shared by several processes (on one machine or many): each trial is claimed before it is scored.

A claim is a RUNNING trial created under a storage-wide lock (PostgreSQL advisory lock, or a lock file next to a
SQLite database or a journal file) after checking that no other process holds or has finished that trial. The
claimant keeps a heartbeat on it. A claim whose owner process is gone (same host: its pid is dead, or it is a previous process
with the same pid) or whose heartbeat has not moved for the grace period (timed on the watcher's own clock, so
clocks need not agree across machines) is marked abandoned (FAIL, `abandoned: true`, ignored by the search) so
that another process takes the trial. Finishing and abandoning both happen under the lock; an owner that finds
its claim abandoned stores its result as a new trial (the numbers are the same whoever computes them). Every
process replays the same CMA-ES, so they agree on every generation's candidates.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shoal.errors import ShoalError
from shoal.search.genome import GeneSpace
from shoal.search.trials import ABANDONED, Job, Outcome, Trial, counted, finished_trial, finished_trials, job_trial
from shoal.search.storage import is_journal, open_storage, shared_backend


class StorageLock:
    """A lock every process using the same storage URL and study sees."""

    def __init__(self, storage: str, study: str) -> None:
        self.key = zlib.crc32(f"shoal/{study}".encode())
        self._file: str | None = None
        """A lock file beside the storage's file (SQLite, journal), else None: a PostgreSQL advisory lock."""
        if is_journal(storage):
            self._file = f"{storage}.shoal-lock"
            return
        url = make_url(storage)
        if shared_backend(storage) == "postgresql":
            self._engine = create_engine(url, pool_size=1, max_overflow=0)
            return
        if not url.database:
            raise ShoalError("a shared study needs a SQLite file, not an in-memory database")
        self._file = f"{url.database}.shoal-lock"

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._file is not None:
            with open(self._file, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        with self._engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})


@dataclass
class Claim:
    trial_id: int
    number: int


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedTrials:
    """Claims, finishes and watches the trials of a study that other processes share."""

    def __init__(
        self, storage: str, study: str, genome: GeneSpace, *, heartbeat_seconds: float = 10.0,
        grace_seconds: float = 120.0,
    ) -> None:
        self.storage = open_storage(storage)
        self.study_id = self.storage.get_study_id_from_name(study)
        self.lock = StorageLock(storage, study)
        self.distributions = genome.distributions()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.heartbeat_seconds = heartbeat_seconds
        self.grace_seconds = grace_seconds
        self._active: set[int] = set()
        self._seen: dict[int, tuple[object, float]] = {}
        """Other processes' claims: trial number -> (last heartbeat value seen, when it was first seen, my clock)."""
        self._beating = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _trials(self) -> list[FrozenTrial]:
        trials = self.storage.get_all_trials(self.study_id, deepcopy=False)
        return [t for t in trials if counted(t)]

    def finished(self) -> dict[int, Trial]:
        return finished_trials(self.storage.get_all_trials(self.study_id, deepcopy=False))

    def claim(self, job: Job) -> Claim | None:
        """Take the job's trial, unless another process holds or has finished it."""
        with self.lock.held():
            if any(t.user_attrs.get("index") == job.index for t in self._trials()):
                return None
            template = job_trial(job, self.distributions, TrialState.RUNNING, attrs={"owner": self.owner, "heartbeat": 0})
            trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        self._active.add(trial_id)
        return Claim(trial_id, self.storage.get_trial_number_from_id(trial_id))

    def finish(self, claim: Claim, job: Job, outcome: Outcome) -> Trial:
        """Store the outcome on the claim; if the claim was abandoned meanwhile, as a new finished trial."""
        self._active.discard(claim.trial_id)
        trial = Trial.of(job, outcome)
        with self.lock.held():
            if self.storage.get_trial(claim.trial_id).state == TrialState.RUNNING:
                for key, item in trial.attrs().items():
                    self.storage.set_trial_user_attr(claim.trial_id, key, item)
                value = None if trial.value is None else [trial.value]
                self.storage.set_trial_state_values(claim.trial_id, trial.state, value)
            else:
                template = finished_trial(job, outcome, self.distributions, {"owner": self.owner})
                self.storage.create_new_trial(self.study_id, template_trial=template)
        return trial

    def _gone(self, trial: FrozenTrial) -> bool:
        """Whether the process holding this claim is known dead, or its heartbeat stopped for the grace period."""
        host, pid = (str(trial.user_attrs.get("owner", "")).rsplit(":", 2) + [""])[:2]
        my_host, my_pid, _ = self.owner.rsplit(":", 2)
        if host == my_host and pid.isdigit() and (not _alive(int(pid)) or pid == my_pid):
            return True  # a dead process, or this process's predecessor with the same pid (e.g. a restarted container)
        beat = trial.user_attrs.get("heartbeat")
        seen = self._seen.get(trial.number)
        if seen is None or seen[0] != beat:
            self._seen[trial.number] = (beat, time.monotonic())
            return False
        return time.monotonic() - seen[1] > self.grace_seconds

    def release_abandoned(self) -> int:
        """Mark claims of dead owners (or with stalled heartbeats) abandoned; returns how many."""
        released = 0
        with self.lock.held():
            for t in self._trials():
                if t.state != TrialState.RUNNING or t.user_attrs.get("owner") == self.owner or not self._gone(t):
                    continue
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
                self.storage.set_trial_user_attr(trial_id, ABANDONED, True)  # under the lock: the owner cannot
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)  # finish in between
                released += 1
        return released

    def _beat(self) -> None:
        beats = 0
        while not self._beating.wait(self.heartbeat_seconds):
            beats += 1
            for trial_id in list(self._active):
                try:
                    self.storage.set_trial_user_attr(trial_id, "heartbeat", beats)
                except optuna.exceptions.UpdateFinishedTrialError:
                    self._active.discard(trial_id)
                except Exception:  # noqa: BLE001  (a busy database: the next beat tries again; the thread must live)
                    continue

    def close(self) -> None:
        self._beating.set()

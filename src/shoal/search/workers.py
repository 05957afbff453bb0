"""Parallel evaluation on Ray actors: each worker holds the parents resident and scores the candidates it is given.

A generation's candidates are handed to free workers as they become free; a worker that dies (a killed
process, a lost node) is replaced and its candidate given again, so no trial is lost. Scores do not depend on
which worker computed them, so a parallel search stores the trials a serial one would (in finishing order;
the search orders them by index).
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shoal.errors import ShoalError
from shoal.search.loop import Job, Outcome
from shoal.search.spec import SearchSpec


def _init(ray: Any, address: str | None) -> None:
    """ray.init, keeping this process's SIGTERM handler (ray.init puts in one that exits at once, where the CLI's
    stops the search as Ctrl-C does)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


@contextmanager
def ray_session(workers: int, address: str | None) -> Iterator[None]:
    """Ray started once for several searches that use workers (a pool's subsets) and shut down after them, so that
    each search's RayEvaluator joins it instead of starting and stopping Ray of its own; nothing where one worker
    is asked for, Ray is not installed (the evaluator says so) or Ray already runs."""
    try:
        import ray
    except ImportError:
        ray = None
    if workers <= 1 or ray is None or ray.is_initialized():
        yield
        return
    _init(ray, address)
    try:
        yield
    finally:
        ray.shutdown()


class _Worker:
    """Lives in a Ray actor: one search space (resident parents) and the tasks, built once."""

    def __init__(self, spec_json: str, threads: int) -> None:
        import torch
        from transformers.utils import logging as transformers_logging

        from shoal.search.fitness import load_tasks, search_fitness
        from shoal.search.spaces import make_space

        torch.set_num_threads(threads)
        transformers_logging.disable_progress_bar()
        spec = SearchSpec.model_validate_json(spec_json).model_copy(update={"overlap": False})
        self.fitness = search_fitness(spec, make_space(spec), load_tasks(spec))

    def evaluate(self, values: dict[str, float], seed: int, generation: int) -> Outcome:
        from shoal.search.loop import attempt

        return attempt(self.fitness, values, seed, generation=generation)

    def pid(self) -> int:
        return os.getpid()


class RayEvaluator:
    """N Ray actors (one GPU each where there are GPUs, one CPU each otherwise) scoring jobs in parallel."""

    whole_generation = False

    def __init__(self, spec: SearchSpec, workers: int, *, address: str | None = None, threads: int = 1) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ShoalError("--workers needs Ray: pip install 'shoal[ray]'") from exc
        self._ray = ray
        self._own = not ray.is_initialized()
        if self._own:
            _init(ray, address)
        gpus = 1 if spec.device.startswith("cuda") else 0
        kind = "GPU" if gpus else "CPU"
        have = ray.cluster_resources().get(kind, 0)
        if have < workers:
            self.close()
            raise ShoalError(f"--workers {workers} needs {workers} {kind}s, the Ray cluster has {have:g}")
        # one CPU (or one GPU) per worker in Ray's accounting; `threads` torch threads inside each
        self._actor_class = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus)(_Worker)
        self._spec_json = spec.model_dump_json()
        self._threads = threads
        self.actors = [self._start() for _ in range(workers)]
        self.replaced = 0

    MAX_TRIES = 3
    """A job whose worker dies this many times stops the search (a worker that cannot start, a job that kills it)."""

    @property
    def width(self) -> int:
        return len(self.actors)

    def _start(self) -> Any:
        return self._actor_class.remote(self._spec_json, self._threads)

    def pids(self) -> list[int]:
        return self._ray.get([actor.pid.remote() for actor in self.actors])

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        ray = self._ray
        queue = deque(jobs)
        idle = list(self.actors)
        running: dict[Any, tuple[Any, Job]] = {}
        tries = {job.index: 0 for job in jobs}
        while queue or running:
            while queue and idle:
                actor, job = idle.pop(), queue.popleft()
                running[actor.evaluate.remote(job.values, job.seed, job.generation)] = (actor, job)
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker died (or cannot start): replace it, retry the job
                tries[job.index] += 1
                if tries[job.index] >= self.MAX_TRIES:
                    raise ShoalError(f"trial {job.index}: its Ray worker died {self.MAX_TRIES} times; last: {exc}") from exc
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001  (already gone)
                    pass
                self.actors[self.actors.index(actor)] = fresh = self._start()
                self.replaced += 1
                idle.append(fresh)
                queue.appendleft(job)
                continue
            idle.append(actor)
            yield job, outcome

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001  (already gone)
                pass
        if self._own:
            self._ray.shutdown()

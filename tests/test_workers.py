"""Ray workers: a parallel search stores the trials of a serial one; a killed worker is replaced, its trial re-run."""

from __future__ import annotations

import os
import signal

import optuna
import pytest

from conftest import zoo_search

from shoal.search.evolve import evolve
from shoal.search.loop import SerialEvaluator
from shoal.search.spaces import ParameterSpace
from shoal.search.spec import load_search
from shoal.search.storage import open_storage
from shoal.search.trials import Job

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def search(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    return load_search(zoo_search(zoo, folder, budget=16, seed=3))



def test_starting_ray_keeps_the_commands_sigterm_handler() -> None:
    """ray.init replaces the process's SIGTERM handler with one that exits at once; the CLI's (SIGTERM stops a search
    as Ctrl-C does, saying what is stored) is put back."""
    from shoal.search.workers import _init

    def mine(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        _init(ray, None)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)


def _by_index(run_dir):
    study = optuna.load_study(study_name="shoal", storage=open_storage(str(run_dir / 'study.log')))
    return {t.user_attrs["index"]: (t.params, t.value, t.state.name, t.user_attrs["seed"]) for t in study.trials}


def test_two_ray_workers_store_the_trials_of_a_serial_run(cluster, search, tmp_path) -> None:
    parallel = evolve(search, tmp_path / "parallel", workers=2)
    serial = evolve(search, tmp_path / "serial")
    assert _by_index(tmp_path / "parallel") == _by_index(tmp_path / "serial")
    assert len(_by_index(tmp_path / "serial")) == 16
    assert parallel.best == serial.best


def test_a_killed_worker_is_replaced_and_its_trial_scored_again(cluster, search) -> None:
    from shoal.search.workers import RayEvaluator

    space = ParameterSpace(search.model_copy(update={"overlap": False}))
    genome = space.genome
    jobs = [Job(i, 0, genome.values([0.2 + 0.1 * i] * len(genome)), 3) for i in range(6)]
    evaluator = RayEvaluator(search, 2)
    try:
        pids = evaluator.pids()
        results = {}
        for job, outcome in evaluator.run(jobs):
            if not results:  # one worker is busy with the next job, the other idle: kill both
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
            results[job.index] = outcome
    finally:
        evaluator.close()
    assert evaluator.replaced == 2
    assert sorted(results) == list(range(6))  # every job exactly once, none lost
    from shoal.evaluate import load_task
    from shoal.search.fitness import DevFitness, WeightedTask

    serial = SerialEvaluator(DevFitness(space, [WeightedTask(load_task(search.tasks[0].path), 1.0)], search.batch_size))
    for job, outcome in serial.run(jobs):
        assert results[job.index].fitness == outcome.fitness

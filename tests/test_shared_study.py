"""Several processes on one study (SQLite file or a real PostgreSQL server): every trial once, none lost."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml

from shoal.errors import ShoalError
from shoal.search.evolve import evolve
from shoal.search.spec import load_search
from shoal.search.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _search(zoo, to: Callable[[Path], str], budget: int = 30) -> dict:
    return {"base": to(zoo.base), "parents": {k: to(v) for k, v in zoo.parents.items()},
            "genome": {"layers_per_group": 0}, "tasks": [{"path": to(zoo.tasks["xx-math"])}], "budget": budget,
            "seed": 4}


@pytest.fixture(scope="module")
def search_file(zoo, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("search")
    (folder / "search.yaml").write_text(yaml.safe_dump(_search(zoo, str)))
    return folder / "search.yaml"



def _postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres() -> str:
    """A throwaway PostgreSQL server (Debian's packages), run as the postgres user when we are root."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="shoal-pg-"))  # outside pytest's folder, which the postgres user cannot enter
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(as_user + [initdb, "-D", str(root / "data"), "-A", "trust", "-U", "shoal"], check=True,
                   capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=''"
    subprocess.run(as_user + [pg_ctl, "-D", str(root / "data"), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    subprocess.run(["psql", "-h", str(root), "-p", str(port), "-U", "shoal", "-d", "postgres", "-c", "create database shoal"],
                   check=True, capture_output=True)
    yield f"postgresql://shoal@/shoal?host={root}&port={port}"
    subprocess.run(as_user + [pg_ctl, "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="shoal", storage=open_storage(storage)).trials


def _by_index(trials) -> dict[int, tuple]:
    kept = [t for t in trials if not t.user_attrs.get("abandoned")]
    assert len({t.user_attrs["index"] for t in kept}) == len(kept), "a trial was scored twice"
    return {t.user_attrs["index"]: (t.params, t.value, t.state.name) for t in kept}


SHARED_BUDGET = 120
"""Enough trials that two processes started together overlap: 30 took half a second on a journal file, less than
the start-up skew of two processes, so one of them sometimes found the search done."""


def _two_processes(search_file: Path, storage: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "shoal", "evolve", str(search_file), "--storage", storage, "--threads", "1",
               "--budget", str(SHARED_BUDGET)]
    procs = [subprocess.Popen(command + [str(tmp_path / f"machine{i}")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)  # a hang, not a slow machine (it took 300 s under a load of 4)
        assert proc.returncode == 0, err


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "journal"])
def test_two_processes_share_one_study_and_split_its_trials(search_file, tmp_path, request, backend) -> None:
    storage = {"sqlite": f"sqlite:///{tmp_path / 'shared.db'}", "journal": str(tmp_path / "shared.log")}.get(
        backend) or request.getfixturevalue("postgres")
    _two_processes(search_file, storage, tmp_path)
    shared = _trials(storage)
    owners = {t.user_attrs["owner"] for t in shared}
    assert len(owners) == 2, "both processes scored trials"
    evolve(load_search(search_file).model_copy(update={"budget": SHARED_BUDGET}), tmp_path / "alone")
    alone = optuna.load_study(study_name="shoal", storage=open_storage(str(tmp_path / 'alone' / 'study.log'))).trials
    assert _by_index(shared) == _by_index(alone) and len(_by_index(alone)) == SHARED_BUDGET


@pytest.fixture(params=["sqlite", "journal"])
def file_storage(request, tmp_path) -> str:
    """A study storage in a file, of either kind a shared disk can hold."""
    return f"sqlite:///{tmp_path / 'shared.db'}" if request.param == "sqlite" else str(tmp_path / "shared.log")


def test_a_claim_left_by_a_dead_process_is_scored_again(search_file, tmp_path, file_storage) -> None:
    storage = file_storage
    spec = load_search(search_file).model_copy(update={"budget": 12})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from shoal.search.trials import Job, open_study
    from shoal.search.optimizer import CmaEs
    from shoal.search.shared import SharedTrials
    from shoal.search.spaces import genome_of

    genome = genome_of(spec)
    open_study(storage, spec.search_hash())
    shared = SharedTrials(storage, "shoal", genome)
    first = CmaEs(len(genome), seed=spec.seed).ask()
    claim = shared.claim(Job(0, 0, genome.values(first), spec.seed))
    assert claim is not None and shared.claim(Job(0, 0, genome.values(first), 0)) is None  # held: not twice
    shared.owner = f"{socket.gethostname()}:{dead.stdout.strip()}"  # as if the claimant had died
    shared.storage.set_trial_user_attr(claim.trial_id, "owner", shared.owner)
    shared.close()
    time.sleep(0.1)
    evolve(spec, tmp_path / "run", storage=storage)
    trials = _trials(storage)
    abandoned = [t for t in trials if t.user_attrs.get("abandoned")]
    assert len(abandoned) == 1 and abandoned[0].state.name == "FAIL" and abandoned[0].user_attrs["index"] == 0
    assert sorted(_by_index(trials)) == list(range(12))


def _claimed(search_file, storage, **options):
    from shoal.search.trials import Job, open_study
    from shoal.search.optimizer import CmaEs
    from shoal.search.shared import SharedTrials
    from shoal.search.spaces import genome_of

    spec = load_search(search_file)
    genome = genome_of(spec)
    open_study(storage, spec.search_hash())
    job = Job(0, 0, genome.values(CmaEs(len(genome), seed=spec.seed).ask()), spec.seed)
    first = SharedTrials(storage, "shoal", genome, **options)
    return storage, genome, job, first, first.claim(job)


def test_a_claim_of_this_process_s_predecessor_with_the_same_pid_is_released(search_file, file_storage) -> None:
    from shoal.search.shared import SharedTrials

    storage, genome, job, first, claim = _claimed(search_file, file_storage)
    first.close()
    again = SharedTrials(storage, "shoal", genome)  # same host and pid, new process identity
    assert again.claim(job) is None and again.release_abandoned() == 1
    assert again.claim(job) is not None
    again.close()


def test_a_stalled_claim_is_released_and_its_late_owner_still_stores_its_result(search_file, file_storage) -> None:
    from shoal.search.trials import Evaluation
    from shoal.search.shared import SharedTrials

    storage, genome, job, owner, claim = _claimed(search_file, file_storage, heartbeat_seconds=3600)
    watcher = SharedTrials(storage, "shoal", genome, grace_seconds=0.2)
    watcher.owner = "elsewhere:1:x"  # another machine: its pid says nothing here
    assert watcher.release_abandoned() == 0  # first sight of the heartbeat starts the clock
    time.sleep(0.3)
    assert watcher.release_abandoned() == 1  # the heartbeat has not moved for longer than the grace period
    late = owner.finish(claim, job, Evaluation(0.25, {"own": 0.25}, 0.0, 0.0))
    assert late.value == 0.25 and late.index == 0
    [stored] = [t for t in _trials(storage) if t.state.name == "COMPLETE"]
    assert stored.number != claim.number and stored.user_attrs["index"] == 0  # a new trial: the claim was let go
    assert watcher.finished()[0].value == 0.25
    owner.close()
    watcher.close()


def test_machines_that_keep_the_project_in_other_folders_share_one_study(zoo, tmp_path) -> None:
    """The search file names its parents relative to itself; each machine resolves them in its own folder."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    projects = [tmp_path / "alice" / "project", tmp_path / "bob" / "work" / "project"]
    for project in projects:
        shutil.copytree(zoo.root, project / "zoo")
        relative = lambda path: str(Path("zoo") / path.relative_to(zoo.root))
        (project / "search.yaml").write_text(yaml.safe_dump(_search(zoo, relative, budget=8)))
    first, second = (load_search(project / "search.yaml") for project in projects)
    assert first.base != second.base and first.search_hash() == second.search_hash()
    evolve(first, projects[0] / "run", storage=storage)
    summary = evolve(second.model_copy(update={"budget": 16}), projects[1] / "run", storage=storage)
    trials = _trials(storage)
    assert sorted(_by_index(trials)) == list(range(16)) and summary.trials == 16
    assert len({t.user_attrs["owner"] for t in trials if t.user_attrs["index"] >= 8}) == 1
    other = yaml.safe_load((projects[1] / "search.yaml").read_text())
    names = list(other["parents"])
    other["parents"] = dict(zip(names, reversed(other["parents"].values())))  # the same files, named the other way
    (projects[1] / "swapped.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ShoalError, match="different search"):
        evolve(load_search(projects[1] / "swapped.yaml"), projects[1] / "swapped", storage=storage)

"""A run folder's record, run.json: which search made the folder, where its study lives, and its sessions.

The folder also holds summary.json (search.summary) and best/ once the run has finished; a hybrid run holds one
such folder per stage (RUN_DIR/ps, RUN_DIR/dfs) and a run.json that names them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.search.spec import SearchSpec
from shoal.search.storage import default_storage
from shoal.search.summary import Summary

RUN_FILE, SUMMARY_FILE, BEST_DIR = "run.json", "summary.json", "best"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def write_summary(run_dir: Path, summary: Summary) -> None:
    """summary.json; fields the search leaves unset (the other space's, `stages`) are left out."""
    write_json(run_dir / SUMMARY_FILE, summary.model_dump(mode="json", exclude_unset=True))


def read_record(spec: SearchSpec, run_dir: Path) -> dict[str, Any]:
    """run_dir's run.json (empty if new), refused if another search made it."""
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("search_hash") not in (None, spec.search_hash()):
        raise ShoalError(f"{run_dir} holds a run of a different search; use a new RUN_DIR (or that run's search)")
    return record


def open_run(spec: SearchSpec, run_dir: Path, storage: str | None, study: str) -> dict[str, Any]:
    """run.json of a one-space run, made or taken over: the storage named here, else the one named before, else
    the search file's, else the folder's own journal."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = read_record(spec, run_dir)
    named = storage or (None if record.get("default_storage", True) else record.get("storage")) or spec.storage
    record |= {
        "storage": named or default_storage(run_dir),  # the default follows the folder if it is moved
        "default_storage": named is None,
        "study": record.get("study", study),
        "search_hash": spec.search_hash(),
        "target": target(spec),
        "method": method(spec),
        "space": spec.space,
        "search": spec.model_dump(),
    }
    record.setdefault("sessions", [])
    write_json(run_dir / RUN_FILE, record)
    return record


def open_hybrid(spec: SearchSpec, run_dir: Path, stages: list[str]) -> None:
    """run.json of a hybrid run: the stage folders it runs in turn."""
    run_dir.mkdir(parents=True, exist_ok=True)
    read_record(spec, run_dir)
    write_json(run_dir / RUN_FILE, {"space": "hybrid", "stages": stages, "target": target(spec),
                                    "method": spec.method, "search_hash": spec.search_hash()})


def pin_stage_parent(stage_dir: Path, trial: int) -> None:
    """Note in a hybrid's DFS stage folder which PS trial its parent A is; refuse a folder whose trials were scored
    over another (its search is not this one, though the search file is the same)."""
    path = stage_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    made_from = record.get("ps_best_trial")
    if made_from is not None and made_from != trial:
        raise ShoalError(
            f"the PS stage's best trial is now #{trial}, but the stored DFS trials were scored over "
            f"#{made_from} (was the budget raised?); move {stage_dir} away to search DFS over the new one"
        )
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, record | {"ps_best_trial": trial})


def end_session(run_dir: Path, record: dict[str, Any], seconds: float, *, finished: bool, new: bool) -> float:
    """Note this session's time in run.json (a new entry, or the last one updated); return the run's wall time."""
    session = {"seconds": seconds, "finished": finished}
    if new:
        record["sessions"].append(session)
    else:
        record["sessions"][-1] = session
    write_json(run_dir / RUN_FILE, record)
    return sum(s["seconds"] for s in record["sessions"])


def method(spec: SearchSpec) -> str:
    """What builds a candidate: the merge method (PS), or the layer path (DFS: no merge method is used)."""
    return spec.method if spec.space != "dfs" else f"layer path ({spec.dfs.scaling} scaling)"


def target(spec: SearchSpec) -> str:
    return spec.tasks[0].name

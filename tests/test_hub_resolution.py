"""Parents named by Hub id resolve through the Hugging Face cache (a local mirror here: no hub is reachable)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import hub_mirror, offline_hub, one_error_line, write_recipe
from safetensors import safe_open

from shoal.cache import Storage, stored_in
from shoal.checkpoint.reader import resolve_model
from shoal.errors import ShoalError
from shoal.merge.engine import run_merge
from shoal.recipe import parse_recipe


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, parents):
    """An HF cache holding `shoal-test/a` (a copy of parent a) as the snapshot of its main branch, and parent b as
    the snapshot of its branch v2."""
    return offline_hub(monkeypatch, tmp_path / "hub", {"shoal-test/a": {"main": parents["a"], "v2": parents["b"]}})[
        "shoal-test/a"]["main"]


NAME = "model.layers.0.self_attn.q_proj.weight"


def test_a_hub_id_resolves_to_its_cached_snapshot(offline_cache):
    assert resolve_model("shoal-test/a") == offline_cache


def test_a_merge_reads_a_parent_given_by_hub_id(offline_cache, parents, tmp_path):
    recipe = {"merge_method": "linear", "models": [
        {"model": "shoal-test/a", "parameters": {"weight": 1.0}},
        {"model": str(parents["b"]), "parameters": {"weight": 1.0}}]}
    run_merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "m")
    assert torch.allclose(read(tmp_path / "m"), (read(parents["a"]) + read(parents["b"])) / 2)


def test_at_revision_picks_the_snapshot_of_that_branch_or_commit(offline_cache):
    v2 = offline_cache.parent / ("1" * 40)
    assert resolve_model("shoal-test/a@v2") == v2
    assert resolve_model("shoal-test/a@main") == offline_cache
    assert resolve_model(f"shoal-test/a@{'1' * 40}") == v2
    assert resolve_model("shoal-test/a") == offline_cache


def read(folder: Path) -> torch.Tensor:
    return safe_open(str(next(folder.glob("*.safetensors"))), "pt").get_tensor(NAME)


def test_a_recipe_merges_the_revision_it_names(offline_cache, parents, tmp_path):
    def merge(first: str, out: str) -> torch.Tensor:
        recipe = {"merge_method": "linear", "models": [{"model": first, "parameters": {"weight": 1.0}},
                                                       {"model": str(parents["c"]), "parameters": {"weight": 3.0}}]}
        run_merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / out)
        return read(tmp_path / out)

    c = read(parents["c"])
    assert torch.allclose(merge("shoal-test/a@v2", "v2"), (read(parents["b"]) + 3 * c) / 4, atol=1e-7)
    assert torch.allclose(merge("shoal-test/a", "main"), (read(parents["a"]) + 3 * c) / 4, atol=1e-7)


def test_an_unknown_revision_is_one_clear_error(offline_cache):
    with pytest.raises(ShoalError, match="'shoal-test/a@v9' not found: no such folder, and the Hub could not"):
        resolve_model("shoal-test/a@v9")


def test_an_unreachable_hub_id_is_one_clear_error(offline_cache):
    with pytest.raises(ShoalError, match="'nobody/nothing' not found: no such folder, and the Hub could not provide it"):
        resolve_model("nobody/nothing")


def test_a_path_that_is_not_a_hub_id_is_not_looked_up(tmp_path):
    with pytest.raises(ShoalError, match="not a Hub id"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "model"))


def test_both_search_spaces_take_a_parent_given_by_hub_id(offline_cache, parents, tmp_path):
    from transformers import AutoModelForCausalLM

    from shoal.search.spaces import FlowSpace, ParameterSpace
    from shoal.search.spec import SearchSpec

    spec = SearchSpec.model_validate({
        "base": str(parents["base"]), "parents": {"a": "shoal-test/a", "b": str(parents["b"])},
        "tasks": [{"path": "unused"}], "space": "dfs", "dfs": {"repeats": 1, "scaling": "seam"},
    })
    flow = FlowSpace(spec)
    values = flow.genome.values(flow.genome.start())
    assert flow.build(values, 0).config.num_hidden_layers == 4  # A's layers: the start of a DFS search
    flow.export(values, 0, tmp_path / "path")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "path").config.num_hidden_layers == 4
    ps = ParameterSpace(spec.model_copy(update={"space": "ps", "overlap": False}))
    merged = ps.build(ps.genome.values(ps.genome.start()), 0)
    name = "model.layers.1.mlp.up_proj.weight"
    with safe_open(str(next(offline_cache.glob("*.safetensors"))), "pt") as f:
        assert not torch.equal(dict(merged.named_parameters())[name].detach(), f.get_tensor(name))


@pytest.fixture
def mirror(tmp_path, monkeypatch, parents) -> Path:
    """A Hub cache folder holding `shoal-test/a` (parent a), offline, while huggingface_hub's own cache is an empty
    folder elsewhere."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_mirror(tmp_path / "mirror", {"shoal-test/a": {"main": parents["a"]}})
    return tmp_path / "mirror"


def test_a_hub_id_resolves_from_the_storages_hub_cache(mirror):
    with stored_in(Storage(hub_cache=mirror)):
        assert resolve_model("shoal-test/a") == mirror / "models--shoal-test--a" / "snapshots" / ("0" * 40)
    with pytest.raises(ShoalError, match="'shoal-test/a' not found: no such folder, and the Hub could not provide it "
                                         r"\("):
        resolve_model("shoal-test/a")  # outside the block: huggingface_hub's own (empty) cache again


def test_transformers_cache_is_where_shoal_merge_finds_hub_ids(mirror, run_cli, parents, tmp_path):
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": "shoal-test/a", "parameters": {"weight": 1.0}},
        {"model": str(parents["b"]), "parameters": {"weight": 1.0}}]})
    code, _, err = run_cli("merge", recipe, tmp_path / "m", "--transformers-cache", mirror)
    assert code == 0, err
    assert torch.allclose(read(tmp_path / "m"), (read(parents["a"]) + read(parents["b"])) / 2)
    code, _, err = run_cli("merge", recipe, tmp_path / "elsewhere", "--transformers-cache", tmp_path / "empty")
    one_error_line(code, err, "'shoal-test/a' not found", f"could not provide it into the cache {tmp_path / 'empty'}")


def test_a_search_is_pinned_to_its_hub_ids_commits_with_its_hash_as_written(parents, tmp_path):
    from shoal.search.spec import SearchSpec

    spec = SearchSpec.model_validate({
        "base": str(parents["base"]), "parents": {"a": "shoal-test/a", "b": f"shoal-test/b@v2+{parents['c']}"},
        "tasks": [{"path": "unused"}]})
    pinned = spec.pinned({"shoal-test/a": "0" * 40, "shoal-test/b@v2": "1" * 40})
    assert pinned.parents == {"a": f"shoal-test/a@{'0' * 40}", "b": f"shoal-test/b@{'1' * 40}+{parents['c']}"}
    assert pinned.base == str(parents["base"])
    assert pinned.search_hash() == spec.search_hash()
    assert pinned.hub_commits == {"shoal-test/a": "0" * 40, "shoal-test/b@v2": "1" * 40}
    assert spec.pinned({"shoal-test/a": "1" * 40}).search_hash() == spec.search_hash()
    assert spec.model_copy(update={"parents": pinned.parents}).search_hash() != spec.search_hash()
    both = SearchSpec.model_validate({"base": "shoal-test/a", "parents": {"a": "shoal-test/a@v2", "b": "org/b"},
                                      "tasks": [{"path": "unused"}]})  # v2 at main's commit: one string pinned
    one = both.pinned({"shoal-test/a": "0" * 40, "shoal-test/a@v2": "0" * 40, "org/b": "1" * 40})
    assert one.base == one.parents["a"] and one.search_hash() == both.search_hash()


def test_a_hub_ids_commit_is_found_without_downloading_it(offline_cache):
    import shutil

    from shoal.checkpoint.reader import hub_commit
    from shoal.checkpoint.reference import Location, parse_reference

    shutil.rmtree(offline_cache.parent)  # the snapshots gone; refs/ remember where main and v2 were
    both = "shoal-test/a+shoal-test/a@v2"
    assert [hub_commit(place, both) for place in parse_reference(both).places] == ["0" * 40, "1" * 40]
    with pytest.raises(ShoalError, match="'nobody/nothing' not found: no such folder, and the Hub could not"):
        hub_commit(Location("nobody/nothing"), "nobody/nothing")
    with pytest.raises(ShoalError, match=r"shoal-test/a@v3 \(in 'shoal-test/a\+shoal-test/a@v3'\) not found"):
        hub_commit(Location("shoal-test/a", "v3"), "shoal-test/a+shoal-test/a@v3")


def test_a_study_records_its_pins_and_refuses_a_process_that_read_another_commit(tmp_path):
    import sqlite3

    from shoal.search.trials import HUB_COMMITS, MODEL_DIGESTS, TASK_DIGESTS, open_study, study_records

    study_commits = lambda url, searches: study_records(url, searches, [HUB_COMMITS])[HUB_COMMITS]

    storage = str(tmp_path / "shared.log")
    assert study_commits(storage, {"shoal": "h"}) == {} and not Path(storage).exists()  # a peek creates nothing
    sqlite = f"sqlite:///{tmp_path / 'missing.db'}"
    assert study_commits(sqlite, {"shoal": "h"}) == {} and not (tmp_path / "missing.db").exists()
    sqlite3.connect(tmp_path / "empty.db").close()  # a database file without Optuna's tables
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert study_commits(empty, {"shoal": "h"}) == {}
    assert sqlite3.connect(tmp_path / "empty.db").execute("select name from sqlite_master").fetchall() == []
    for url in (storage, f"sqlite:///{tmp_path / 'shared.db'}"):
        open_study(url, "h", "shoal", {HUB_COMMITS: {"org/a": "0" * 40}})
        assert study_commits(url, {"shoal": "h"}) == {"org/a": "0" * 40}
        assert study_commits(url, {"other": "h"}) == study_commits(url, {"shoal": "another search"}) == {}
        open_study(url, "h", "shoal", {HUB_COMMITS: {"org/a": "0" * 40, "org/b": "1" * 40}})  # a pin it lacked is added
        assert study_commits(url, {"other": "h", "shoal": "h"}) == {"org/a": "0" * 40, "org/b": "1" * 40}
        open_study(url, "h", "shoal")  # a reader that pins nothing (a report) opens it
        with pytest.raises(ShoalError, match=f"reads org/a at commit {'0' * 12}, and this process at {'2' * 12}: "
                                             "the branch moved on between their first starts"):
            open_study(url, "h", "shoal", {HUB_COMMITS: {"org/a": "2" * 40}})
        open_study(url, "h", "shoal", {TASK_DIGESTS: {"t": "x"}, MODEL_DIGESTS: {"parents.m": "d hub"}})
        with pytest.raises(ShoalError, match="task t here is not the one the study at .* was scored on"):
            open_study(url, "h", "shoal", {HUB_COMMITS: {"org/c": "3" * 40}, TASK_DIGESTS: {"t": "z", "u": "z"}})
        with pytest.raises(ShoalError, match=r"parents.m here is not the model the study at .* was scored with \(its "
                                             r"config.json or weights, or an adapter's\): give every process"):
            open_study(url, "h", "shoal", {TASK_DIGESTS: {"t": "x", "u": "z"}, MODEL_DIGESTS: {"parents.m": "e hub"}})
        assert study_commits(url, {"shoal": "h"}) == {"org/a": "0" * 40, "org/b": "1" * 40}  # the refused: nothing
        assert study_records(url, {"shoal": "h"}, [TASK_DIGESTS, MODEL_DIGESTS]) == {
            TASK_DIGESTS: {"t": "x"}, MODEL_DIGESTS: {"parents.m": "d hub"}}
        open_study(url, "h", "shoal", {TASK_DIGESTS: {"lm": "lm_eval 0.4.9 abc"}})
        with pytest.raises(ShoalError, match="task lm: this process has lm-eval 0.4.10, and the study at .* was "
                                             "scored with lm-eval 0.4.9: install lm_eval==0.4.9 here"):
            open_study(url, "h", "shoal", {TASK_DIGESTS: {"lm": "lm_eval 0.4.10 abc"}})
        with pytest.raises(ShoalError, match="task lm here is not the one"):  # the same lm-eval, other files
            open_study(url, "h", "shoal", {TASK_DIGESTS: {"lm": "lm_eval 0.4.9 abd"}})
    with pytest.raises(ShoalError, match="cannot open the study at ://x"):
        study_commits("://x", {"shoal": "h"})


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("space", ["ps", "hybrid"])
def test_a_run_goes_on_at_the_commits_it_started_with_after_the_branch_moved_on(zoo, run_cli, tmp_path, monkeypatch,
                                                                               space):
    import json

    from conftest import zoo_search

    from shoal.search.spec import load_search

    hub = tmp_path / "hub"
    offline_hub(monkeypatch, hub, {"shoal-test/math": {"main": zoo.parents["math"], "next": zoo.joint}})
    hybrid = {"space": "hybrid", "dfs": {"parents": ["math"], "budget": 2, "scaling": "seam"}} if space == "hybrid" \
        else {}
    search = zoo_search(zoo, tmp_path, budget=2, parents={"math": "shoal-test/math",
                                                          "language": str(zoo.parents["language"])}, **hybrid)
    run = tmp_path / "run"
    code, _, err = run_cli("evolve", search, run, "--threads", 1)
    assert code == 0, err
    record = json.loads((run / "run.json").read_text())
    assert record["hub_commits"] == {"shoal-test/math": "0" * 40}
    assert record["search_hash"] == load_search(search).search_hash()
    one_space = run / "ps" if space == "hybrid" else run
    assert json.loads((one_space / "run.json").read_text())["search"]["parents"]["math"] == \
        f"shoal-test/math@{'0' * 40}"
    (hub / "models--shoal-test--math" / "refs" / "main").write_text("1" * 40)  # main moved on: other weights
    code, _, err = run_cli("evolve", search, run, "--threads", 1, "--budget", 3)
    assert code == 0, err  # read at the commit it started with, which its digests match
    assert (f"shoal-test/math is at commit {'1' * 12} now; this run reads {'0' * 12}, the commit it started "
            "with (a new RUN_DIR reads the new one)") in " ".join(err.split())
    assert len(json.loads((one_space / "run.json").read_text())["sessions"]) == 2
    assert json.loads((run / "summary.json").read_text())["trials"] == (3 + 2 if space == "hybrid" else 3)
    if space == "hybrid":
        assert json.loads((run / "dfs" / "run.json").read_text())["hub_commits"] == {"shoal-test/math": "0" * 40}
    code, _, err = run_cli("evolve", search, tmp_path / "new", "--threads", 1, "--budget", 1)
    assert code == 0, err  # a new run reads main where it is now
    assert json.loads((tmp_path / "new" / "run.json").read_text())["hub_commits"] == {"shoal-test/math": "1" * 40}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("space", ["ps", "hybrid pool"])
def test_a_process_joining_a_shared_study_reads_the_commits_the_study_started_with(zoo, run_cli, tmp_path,
                                                                                  monkeypatch, space):
    import json

    from conftest import zoo_search

    hub = tmp_path / "hub"
    offline_hub(monkeypatch, hub, {"shoal-test/math": {"main": zoo.parents["math"], "next": zoo.joint}})
    parents = {"math": "shoal-test/math", "language": str(zoo.parents["language"])}
    extra = {"space": "hybrid", "pool": {"subset": 2, "survivors": [], "shares": [1.0]}, "budget": 3,
             "dfs": {"parents": ["math"], "budget": 1, "scaling": "seam"}, "parents": parents | {"plain": str(zoo.base)}
             } if space == "hybrid pool" else {"budget": 2, "parents": parents}
    search = zoo_search(zoo, tmp_path, **extra)
    shared = tmp_path / "shared.log"
    code, _, err = run_cli("evolve", search, tmp_path / "first", "--threads", 1, "--storage", shared)
    assert code == 0, err
    (hub / "models--shoal-test--math" / "refs" / "main").write_text("1" * 40)  # a push, before the second machine
    code, _, err = run_cli("evolve", search, tmp_path / "second", "--threads", 1, "--storage", shared)
    assert code == 0, err  # without the study's pin it would score the study's trials on other weights
    assert (f"shoal-test/math is at commit {'1' * 12} now; this run reads {'0' * 12}, the commit its study at "
            f"{shared} reads (another --storage reads the new one)") in " ".join(err.split())
    second = json.loads((tmp_path / "second" / "run.json").read_text())
    assert second["hub_commits"] == {"shoal-test/math": "0" * 40}
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["trials"] == json.loads((tmp_path / "first" / "summary.json").read_text())["trials"]
    assert summary["trials"] == (3 + 1 if space == "hybrid pool" else 2)  # the first's, none scored again


def test_a_task_linked_into_a_hub_cache_and_its_plain_copy_have_one_portable_digest(tmp_path, zoo):
    import shutil

    from shoal.evaluate import load_task

    linked = tmp_path / "linked"
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copytree(zoo.tasks["xx-math"], tmp_path / "copy")
    linked.mkdir()
    for i, file in enumerate(sorted((tmp_path / "copy").iterdir())):  # each file a link into the cache's blobs
        blob = blobs / f"{i:040x}"
        shutil.copy(file, blob)
        (linked / file.name).symlink_to(blob)
    on_hub, copied = load_task(linked), load_task(tmp_path / "copy")
    assert on_hub.digest() != copied.digest()  # by blob name there, by bytes here: for one folder's resumes
    assert on_hub.digest(portable=True) == copied.digest(portable=True)


def test_a_model_linked_into_a_hub_cache_and_its_plain_copy_have_one_portable_digest(tmp_path, zoo):
    """A shared study compares local models by their bytes (a LoRA adapter's config too), a run folder by blob name."""
    import shutil

    from shoal.checkpoint.digest import first_changed, model_digest

    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copytree(zoo.parents["math"], tmp_path / "copy")
    (tmp_path / "linked").mkdir()
    for i, file in enumerate(sorted((tmp_path / "copy").iterdir())):
        shutil.copy(file, blobs / f"{i:064x}")
        (tmp_path / "linked" / file.name).symlink_to(blobs / f"{i:064x}")
    linked, copied = tmp_path / "linked", tmp_path / "copy"
    assert model_digest(linked) != model_digest(copied)
    assert model_digest(linked, portable=True) == model_digest(copied, portable=True)
    plain = model_digest(copied, portable=True)
    (copied / "adapter_config.json").write_text('{"r": 8}')
    assert model_digest(copied, portable=True) != plain
    assert first_changed({"a": "1", "b": "2"}, {"a": "1"}, missing_counts=True) == "b"
    assert first_changed({"a": "1", "b": "2"}, {"a": "1"}, missing_counts=False) is None
    assert first_changed({"b": "2", "a": "1"}, {"a": "0", "b": "3", "c": "4"}, missing_counts=False) == "a"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("changed, space", [("task", "ps"), ("parent", "ps"), ("parent", "hybrid pool")])
def test_a_process_whose_copy_of_a_task_or_parent_differs_is_refused_by_a_shared_study(zoo, run_cli, tmp_path,
                                                                                       changed, space):
    import json
    import shutil

    from conftest import zoo_search

    extra = {"space": "hybrid", "pool": {"subset": 2, "survivors": [], "shares": [1.0]}, "budget": 3,
             "dfs": {"parents": ["math"], "budget": 1, "scaling": "seam"}} if space == "hybrid pool" else {"budget": 2}
    parents = {"math": "math", "language": str(zoo.parents["language"])} | (
        {"plain": str(zoo.base)} if space == "hybrid pool" else {})
    searches = []
    for machine in ("a", "b"):  # each machine's copy of the project; paths count as the search file writes them
        shutil.copytree(zoo.tasks["xx-math"], tmp_path / machine / "task")
        shutil.copytree(zoo.parents["math"], tmp_path / machine / "math")
        searches.append(zoo_search(zoo, tmp_path / machine, tasks=[{"path": "task"}], parents=parents, **extra))
    if changed == "task":
        edited = tmp_path / "b" / "task" / "dev.jsonl"
        edited.write_text("".join(edited.read_text().splitlines(keepends=True)[:-1]))  # b's dev split lost an item
        refusal = "task xx-math here is not the one the study at {} was scored on"
    else:
        edited = tmp_path / "b" / "math" / "config.json"
        edited.write_text(json.dumps(json.loads(edited.read_text()) | {"rope_theta": 20000.0}))  # b's copy differs
        refusal = "parents.math here is not the model the study at {} was scored with (its config.json or weights"
    shared = tmp_path / "shared.log"
    code, _, err = run_cli("evolve", searches[0], tmp_path / "a" / "run", "--threads", 1, "--storage", shared)
    assert code == 0, err
    code, _, err = run_cli("evolve", searches[1], tmp_path / "b" / "run", "--threads", 1, "--storage", shared)
    one_error_line(code, err, refusal.format(shared), "give every process that shares the study the same files")
    assert "loading parents" not in err  # refused before the parents load, and a one-space start leaves no folder
    assert space != "ps" or not (tmp_path / "b" / "run").exists()
    shutil.copy(tmp_path / "a" / edited.relative_to(tmp_path / "b"), edited)
    code, _, err = run_cli("evolve", searches[1], tmp_path / "b" / "run", "--threads", 1, "--storage", shared)
    assert code == 0, err

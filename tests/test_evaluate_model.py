"""evaluate() on a tiny random Llama: batched greedy generation equals unpadded model.generate, log-likelihoods equal
a per-item computation, constraints score 0 and are counted, a folder equals its loaded model, and `shoal eval`."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shoal.errors import ShoalError
from shoal.evaluate import evaluate, load_task
from shoal.evaluate.task import Task

N = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(parents) -> Path:
    return parents["base"]


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


def prompts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(4, 256)}" for _ in range(rng.randint(1, 9))) for _ in range(N)]


def write_task(folder: Path, spec: dict, rows: list[dict]) -> Task:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.yaml").write_text(json.dumps({"name": folder.name, **spec, "splits": {"dev": "dev.jsonl"}}))
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_task(folder)


def reference_outputs(model, tokenizer, texts: list[str], max_new_tokens: int, stop: list[str], eos: list[int]):
    """model.generate one prompt at a time (no padding), decoded and cut at the first stop string."""
    outputs = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
        new = new[0, ids.shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        out = tokenizer.decode(new, skip_special_tokens=True)
        outputs.append(min((out[: out.find(s)] for s in stop if s in out), key=len, default=out))
    return outputs


def test_batched_greedy_equals_generate_one_prompt_at_a_time_with_eos_and_stop_strings(model, tokenizer, tmp_path):
    texts = prompts()
    free = reference_outputs(model, tokenizer, texts, 12, [], [2])
    counts = Counter(w for out in free for w in set(out.split()))
    (eos_word, _), (stop_word, _) = counts.most_common(2)  # the tokens in the most outputs
    eos = [2, tokenizer.convert_tokens_to_ids(eos_word)]
    stop = [f"{stop_word} "]  # a stop string spanning a token and the space after it
    expected = reference_outputs(model, tokenizer, texts, 12, stop, eos)
    assert sum(a != b for a, b in zip(expected, free)) >= N // 4  # EOS and the stop string cut many outputs short
    task = write_task(tmp_path / "gen", {"metric": "exact_match", "max_new_tokens": 12, "stop": stop},
                      [{"prompt": p, "answer": "x"} for p in texts])
    model.generation_config.eos_token_id = eos
    try:
        result = evaluate(model, task, tokenizer=tokenizer, batch_size=5, return_outputs=True)
    finally:
        model.generation_config.eos_token_id = 2
    assert result.outputs == expected


def test_exact_match_and_constraints_score_the_model_own_outputs(model, tokenizer, tmp_path):
    texts = prompts(1)
    outputs = reference_outputs(model, tokenizer, texts, 6, [], [2])
    answers = [out if i % 4 else "wrong" for i, out in enumerate(outputs)]  # items 0, 4, 8, ... are wrong
    banned = Counter(w for out in outputs[1::2] for w in set(out.split())).most_common(1)[0][0]
    allowed = sorted({w for out in outputs for w in out.split()} - {banned})
    failing = {i for i, out in enumerate(outputs) if banned in out.split()}
    spec = {"metric": "exact_match", "max_new_tokens": 6,
            "constraints": [{"name": "no-banned", "type": "vocabulary", "words": allowed},
                            {"name": "words", "type": "regex", "pattern": r"w\d+( w\d+)*"}]}
    task = write_task(tmp_path / "em", spec, [{"prompt": p, "answer": a} for p, a in zip(texts, answers)])
    result = evaluate(model, task, tokenizer=tokenizer, batch_size=7)
    right = {i for i in range(N) if i % 4} - failing
    assert 0 < len(failing) < N
    assert result.constraint_failures == {"no-banned": len(failing), "words": 0}
    assert result.score == pytest.approx(len(right) / N)
    assert result.n == N and result.outputs is None and result.seconds > 0


def per_item_logprobs(model, tokenizer, prompt: str, continuation: str) -> list[float]:
    context = tokenizer(prompt).input_ids
    whole = tokenizer(f"{prompt} {continuation}").input_ids
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return [logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))]


def test_multiple_choice_and_answer_logprob_equal_a_per_item_computation(model, tokenizer, tmp_path):
    rng = random.Random(2)
    texts = prompts(2)
    rows = []
    for p in texts:
        choices = [" ".join(f"w{rng.randrange(4, 256)}" for _ in range(rng.randint(1, 4))) for _ in range(3)]
        rows.append({"prompt": p, "answer": choices[rng.randrange(3)], "choices": choices})
    mc = write_task(tmp_path / "mc", {"metric": "multiple_choice"}, rows)
    result = evaluate(model, mc, tokenizer=tokenizer, batch_size=8, return_outputs=True)
    picks = []
    for row in rows:
        sums = [sum(per_item_logprobs(model, tokenizer, row["prompt"], c)) for c in row["choices"]]
        picks.append(row["choices"][sums.index(max(sums))])
    assert result.outputs == picks
    assert result.score == pytest.approx(sum(p == r["answer"] for p, r in zip(picks, rows)) / N)
    assert 0 < result.score < 1

    lp = write_task(tmp_path / "lp", {"metric": "answer_logprob"}, rows)
    result = evaluate(model, lp, tokenizer=tokenizer, batch_size=8)
    means = [sum(v) / len(v) for v in (per_item_logprobs(model, tokenizer, r["prompt"], r["answer"]) for r in rows)]
    assert result.score == pytest.approx(sum(means) / N, abs=1e-5)
    assert result.score < -4  # a random model over 256 words: about log(1/256) = -5.5 per token


def test_a_folder_scores_like_its_loaded_model_and_weights_are_never_cached(folder, parents, tmp_path):
    texts = prompts(3)
    task = write_task(tmp_path / "t", {"metric": "answer_logprob"}, [{"prompt": p, "answer": "w5 w6"} for p in texts])
    from_folder = evaluate(folder, task)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    loaded = evaluate(model, task, tokenizer=folder, limit=N)
    assert loaded.score == pytest.approx(from_folder.score, abs=1e-6) and loaded.n == from_folder.n
    assert model.training  # the caller's mode is restored
    other = AutoModelForCausalLM.from_pretrained(parents["a"])
    model.load_state_dict(other.state_dict())  # same object, new weights: the score must follow them
    assert evaluate(model, task, tokenizer=folder).score == pytest.approx(evaluate(parents["a"], task).score, abs=1e-6)


def test_tokenised_items_are_reused_across_tokenizers_loaded_from_the_same_files(folder, parents, tmp_path):
    task = write_task(tmp_path / "t", {"metric": "exact_match"}, [{"prompt": p, "answer": "w5"} for p in prompts(6)])
    model = AutoModelForCausalLM.from_pretrained(folder)
    first = evaluate(model, task, tokenizer=folder, return_outputs=True)
    second = evaluate(model, task, tokenizer=parents["a"], return_outputs=True)  # another object, equal files
    assert len(task.cache) == 1 and first.outputs == second.outputs
    evaluate(model, task, tokenizer=folder, limit=5)
    assert len(task.cache) == 2


def test_the_batch_stops_as_soon_as_every_row_has_ended(model, tokenizer, tmp_path):
    task = write_task(tmp_path / "t", {"metric": "exact_match", "max_new_tokens": 30},
                      [{"prompt": p, "answer": ""} for p in prompts(4)])
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    model.generation_config.eos_token_id = list(range(256))  # every token ends a row
    try:
        result = evaluate(model, task, tokenizer=tokenizer, batch_size=10)
    finally:
        model.generation_config.eos_token_id = 2
        hook.remove()
    assert len(calls) == 3  # the prompt pass of each of the 3 batches, no decoding step
    assert result.score == 1.0


def test_usage_errors_are_shoal_errors(model, tokenizer, folder, tmp_path):
    task = write_task(tmp_path / "t", {"metric": "exact_match"}, [{"prompt": "w4", "answer": "w5"}])
    with pytest.raises(ShoalError, match="a loaded model needs tokenizer="):
        evaluate(model, task)
    with pytest.raises(ShoalError, match="the model is on cpu, not cuda"):
        evaluate(model, task, tokenizer=tokenizer, device="cuda")
    with pytest.raises(ShoalError, match="no split 'test'"):
        evaluate(model, task, split="test", tokenizer=tokenizer)
    with pytest.raises(ShoalError, match="is not a model folder"):
        evaluate(tmp_path, task)


def test_a_folder_without_tokenizer_files_is_named_in_one_line(run_cli, folder, tmp_path):
    import shutil

    from shoal.evaluate.runner import TOKENIZER_MARKERS

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    for name in TOKENIZER_MARKERS:
        (bare / name).unlink(missing_ok=True)
    write_task(tmp_path / "t", {"metric": "exact_match"}, [{"prompt": "w4", "answer": "w5"}])
    code, _, err = run_cli("eval", bare, "--task", tmp_path / "t")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"{bare}: no tokenizer in the folder" in err and "--no-copy-tokenizer" in err
    code, _, err = run_cli("eval", folder, "--task", tmp_path / "t")  # the folder it was copied from has one
    assert code == 0, err


def test_shoal_eval_json_reports_each_task(run_cli, folder, tmp_path):
    rows = [{"prompt": p, "answer": "w5"} for p in prompts(5)]
    only_w = [{"name": "c", "type": "charset", "chars": "w"}]
    write_task(tmp_path / "gen", {"metric": "last_number", "constraints": only_w},
               [{"prompt": r["prompt"], "answer": "5"} for r in rows])
    write_task(tmp_path / "lp", {"metric": "answer_logprob"}, rows)
    code, out, err = run_cli("eval", folder, "--task", tmp_path / "gen", "--task", tmp_path / "lp" / "task.yaml",
                             "--json", "--limit", "10", "--batch-size", "4")
    assert code == 0, err
    results = json.loads(out)
    keys = {"task", "split", "metric", "score", "n", "constraint_failures", "seconds"}
    assert [set(r) for r in results] == [keys, keys]
    assert [(r["task"], r["metric"], r["split"], r["n"]) for r in results] == [
        ("gen", "last_number", "dev", 10), ("lp", "answer_logprob", "dev", 10)]
    assert results[0]["constraint_failures"] == {"c": 10} and results[0]["score"] == 0.0  # digits are not in "w"
    assert results[1]["score"] == pytest.approx(evaluate(folder, load_task(tmp_path / "lp"), limit=10).score, abs=1e-6)
    code, out, err = run_cli("eval", folder, "--task", tmp_path / "gen")
    assert code == 0 and "last_number" in out and "c: " in out
    code, out, err = run_cli("eval", folder, "--task", tmp_path / "nope")
    assert code == 2 and "nope not found" in err

"""Loading task folders: the documented format loads; every malformed file is a ShoalError naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.errors import ShoalError
from shoal.evaluate import load_task

XX_TASK = """\
name: xx-math
description: two-digit addition in XX
metric: exact_match
normalize: {lowercase: true, collapse_whitespace: true, strip: true}
max_new_tokens: 16
stop: ["\\n"]
constraints:
  - {name: in-xx, type: vocabulary, words: [ra, lo, ne, ".", "46"]}
  - {name: ascii, type: charset, chars: "abcdefghijklmnopqrstuvwxyz0123456789."}
  - {name: form, type: regex, pattern: "ra \\\\d+ lo ne \\\\."}
splits: {dev: dev.jsonl, test: test.jsonl}
"""
ROWS = [{"prompt": "ka 12 to 34 pela ?", "answer": "ra 46 lo ne ."}, {"prompt": "pela ka 1 sen 2 ?", "answer": 3}]


def write(folder: Path, spec: str, files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.yaml").write_text(spec)
    rows = "".join(json.dumps(r) + "\n" for r in ROWS)
    for name, text in (files if files is not None else {"dev.jsonl": rows, "test.jsonl": rows}).items():
        (folder / name).write_text(text)
    return folder


def test_the_documented_format_loads_from_the_folder_or_the_yaml(tmp_path):
    folder = write(tmp_path / "xx", XX_TASK)
    task = load_task(folder)
    assert load_task(folder / "task.yaml").spec == task.spec
    assert (task.name, task.metric, task.spec.max_new_tokens, task.spec.stop) == ("xx-math", "exact_match", 16, ["\n"])
    assert [c.name for c in task.spec.constraints] == ["in-xx", "ascii", "form"]
    assert task.spec.constraints[2].pattern == r"ra \d+ lo ne \."
    assert [it.answer for it in task.items("test")] == ["ra 46 lo ne .", "3"]  # numbers read as text


@pytest.mark.parametrize(
    ("spec_edit", "files", "message"),
    [
        (("exact_match", "bleu"), None, "task.yaml:3: metric: Input should be"),
        (("metric: exact_match", "metric: regex"), None, "task.yaml:3: metric: regex needs a pattern"),
        (("stop: [", "pattern: '(x'\nstop: ["), None, "task.yaml:6: pattern: invalid regular expression '(x'"),
        (("type: charset", "type: alphabet"), None, "task.yaml:9: constraints.1: Input tag 'alphabet'"),
        (("name: xx-math\n", ""), None, "task.yaml:1: missing 'name'"),
        (("max_new_tokens: 16", "max_new_tokens: 0"), None, "task.yaml:5: max_new_tokens: Input should be greater"),
        (("max_new_tokens: 16", "max_new_tokns: 16"), None, "task.yaml:5: max_new_tokns: not a known key (known: name, "),
        (("stop: [", "stop: [[["), None, "task.yaml:7: malformed YAML (expected ',' or ']'"),
        (None, {"dev.jsonl": '{"prompt": "a", "answer": "b"}\n'}, "split 'test' names test.jsonl, which is not in"),
        (None, {"dev.jsonl": '{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"}\n', "test.jsonl": ""},
         "dev.jsonl:3: missing 'answer'"),
        (None, {"dev.jsonl": '{"prompt": "a", "answer": "b"}\n{"prompt": "a", answer: 1}\n', "test.jsonl": ""},
         "dev.jsonl:2: malformed JSON (Expecting property name enclosed in double quotes at column 17)"),
        (None, {"dev.jsonl": '["a", "b"]\n', "test.jsonl": ""}, "dev.jsonl:1: each line must be a JSON object"),
        (None, {"dev.jsonl": '{"prompt": "a", "answer": "b"}\n', "test.jsonl": "\n"}, "test.jsonl: no items"),
    ],
)
def test_malformed_tasks_name_the_file_and_line(tmp_path, spec_edit, files, message):
    spec = XX_TASK.replace(*spec_edit) if spec_edit else XX_TASK
    folder = write(tmp_path / "bad", spec, files)
    with pytest.raises(ShoalError) as err:
        load_task(folder)
    assert message in str(err.value)
    assert str(folder) in str(err.value)


def test_metric_specific_rules_are_checked_per_row(tmp_path):
    mc = "name: mc\nmetric: multiple_choice\nsplits: {dev: dev.jsonl}\n"
    bad = '{"prompt": "a", "answer": "b", "choices": ["b", "c"]}\n{"prompt": "a", "answer": "d", "choices": ["b"]}\n'
    with pytest.raises(ShoalError, match=r"dev.jsonl:2: metric multiple_choice needs .choices. that include"):
        load_task(write(tmp_path / "mc", mc, {"dev.jsonl": bad}))
    num = "name: n\nmetric: last_number\nsplits: {dev: dev.jsonl}\n"
    with pytest.raises(ShoalError, match=r"dev.jsonl:1: metric last_number needs a number in the answer, got 'six'"):
        load_task(write(tmp_path / "num", num, {"dev.jsonl": '{"prompt": "a", "answer": "six"}\n'}))
    logprob = "name: lp\nmetric: answer_logprob\nconstraints: [{name: c, type: charset, chars: a}]\nsplits: {d: d}\n"
    with pytest.raises(ShoalError, match=r"task.yaml:3: constraints check generated output; metric answer_logprob"):
        load_task(write(tmp_path / "lp", logprob, {"d": '{"prompt": "a", "answer": "b"}\n'}))


def test_a_missing_task_or_split_says_what_exists(tmp_path):
    with pytest.raises(ShoalError, match="nothing not found; a task is a folder with task.yaml"):
        load_task(tmp_path / "nothing")
    task = load_task(write(tmp_path / "xx", XX_TASK))
    with pytest.raises(ShoalError, match=r"task xx-math has no split 'train' \(it has: dev, test\)"):
        task.items("train")

"""Recipes with tokenizer settings (tokenizer_source, mergekit's tokenizer section, chat_template) on parents whose
vocabularies differ: a base of 64 tokens, a chat fine-tune that added <|im_start|> and <|im_end|> (ids 64, 65),
one that added <|im_end|> and hello (ids 64, 65: the same ids for other tokens), and `same`, of the base's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from conftest import one_error_line, write_recipe, read_tensors as rows
from shoal.checkpoint.files import write_config
from shoal.errors import ShoalError
from shoal.merge.chat_template import built_in
from shoal.merge.engine import run_merge
from shoal.merge.vocab import RowAlignment, TokenSource, Vocabulary, align_rows
from shoal.recipe import parse_recipe
from shoal.synthetic import make_parents, tiny_config

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _add_tokens(folder: Path, added: list[tuple[str, bool]], seed: int) -> None:
    """Add tokens (text, special) to a model folder's tokenizer, with new random rows in its embeddings and head."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text, special in added:
        tokenizer.add_tokens([text], special_tokens=special)
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in (EMBED, HEAD):
        extra = torch.randn((len(added), state[name].shape[1]), generator=generator) * 0.02
        state[name] = torch.cat([state[name], extra])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    write_config(folder, config | {"vocab_size": len(tokenizer)})
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    config = tiny_config(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    found = make_parents(tmp_path_factory.mktemp("vocab"), ("base", "same", "chat", "extra"), config=config, seed=3)
    _add_tokens(found["chat"], [("<|im_start|>", True), ("<|im_end|>", True)], seed=4)
    _add_tokens(found["extra"], [("<|im_end|>", True), ("hello", False)], seed=5)
    for name in ("chat", "extra"):
        tok = AutoTokenizer.from_pretrained(found[name])
        tok.chat_template = CHATML
        tok.save_pretrained(found[name])
    return found


def merge(recipe: dict, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    run_merge(parse_recipe(yaml.safe_dump(recipe, sort_keys=False)), out)
    return rows(out), AutoTokenizer.from_pretrained(out).get_vocab()


def ta_recipe(family: dict[str, Path], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "dtype": "float32",
            "models": [{"model": str(family["chat"]), "parameters": {"weight": 0.6}},
                       {"model": str(family["extra"]), "parameters": {"weight": 0.3}}]} | extra


def test_union_vocabulary_is_every_parents_tokens_with_their_rows(family, tmp_path) -> None:
    merged, vocab = merge(ta_recipe(family, tokenizer_source="union"), tmp_path / "out")
    parents = {n: rows(family[n]) for n in ("base", "chat", "extra")}
    vocabs = {n: AutoTokenizer.from_pretrained(family[n]).get_vocab() for n in ("base", "chat", "extra")}
    assert set(vocab) == set(vocabs["base"]) | set(vocabs["chat"]) | set(vocabs["extra"])
    assert len(vocab) == 67 == merged[EMBED].shape[0] == merged[HEAD].shape[0]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 67
    row = lambda n, name, tok: parents[n][name][vocabs[n][tok]]
    for name in (EMBED, HEAD):
        # a token all three have: the task-arithmetic formula on their own rows
        b, c, e = (row(n, name, "w10") for n in ("base", "chat", "extra"))
        assert torch.allclose(merged[name][vocab["w10"]], b + 0.6 * (c - b) + 0.3 * (e - b), atol=1e-6)
        # only chat has <|im_start|>: every parent takes chat's row, so the merge gives it back
        assert torch.allclose(merged[name][vocab["<|im_start|>"]], row("chat", name, "<|im_start|>"), atol=1e-6)
        # chat and extra have <|im_end|> (at ids 65 and 64), the base not: it stands in with their mean
        c, e = row("chat", name, "<|im_end|>"), row("extra", name, "<|im_end|>")
        mean = (c + e) / 2
        assert torch.allclose(merged[name][vocab["<|im_end|>"]], mean + 0.6 * (c - mean) + 0.3 * (e - mean), atol=1e-6)
    special = {t.content for t in AutoTokenizer.from_pretrained(tmp_path / "out").added_tokens_decoder.values()
               if t.special}
    assert {"<|im_start|>", "<|im_end|>"} <= special and "hello" not in special


def test_base_vocabulary_drops_the_tokens_the_base_lacks(family, tmp_path) -> None:
    merged, vocab = merge(ta_recipe(family, tokenizer_source="base"), tmp_path / "out")
    assert vocab == AutoTokenizer.from_pretrained(family["base"]).get_vocab()
    assert merged[EMBED].shape == (64, 32)
    b, c, e = (rows(family[n])[EMBED][:64] for n in ("base", "chat", "extra"))
    assert torch.allclose(merged[EMBED], b + 0.6 * (c - b) + 0.3 * (e - b), atol=1e-6)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (family["base"] / "tokenizer.json").read_bytes()


def test_a_models_vocabulary_and_pad_to_multiple_of(family, tmp_path) -> None:
    recipe = ta_recipe(family, tokenizer={"source": str(family["chat"]), "pad_to_multiple_of": 8})
    merged, vocab = merge(recipe, tmp_path / "out")
    assert vocab == AutoTokenizer.from_pretrained(family["chat"]).get_vocab()
    assert len(vocab) == 66 and merged[EMBED].shape[0] == 72
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 72
    # rows 66..71 are each parent's mean row (of its aligned rows), merged
    aligned = {n: rows(family[n])[EMBED] for n in ("base", "chat", "extra")}
    start, end = vocab["<|im_start|>"], vocab["<|im_end|>"]
    extra = AutoTokenizer.from_pretrained(family["extra"]).get_vocab()
    aligned["base"] = torch.cat([aligned["base"], aligned["chat"][[start]], ((aligned["chat"][end] +
                                 aligned["extra"][extra["<|im_end|>"]]) / 2)[None]])
    own_end = aligned["extra"][[extra["<|im_end|>"]]]
    aligned["extra"] = torch.cat([aligned["extra"][:64], aligned["chat"][[start]], own_end])
    means = {n: t.mean(0) for n, t in aligned.items()}
    expect = means["base"] + 0.6 * (means["chat"] - means["base"]) + 0.3 * (means["extra"] - means["base"])
    assert torch.allclose(merged[EMBED][66:], expect.expand(6, -1), atol=1e-6)


def test_the_tokens_section_sets_rows(family, tmp_path) -> None:
    recipe = ta_recipe(family, tokenizer={"source": "union", "tokens": {
        "<|im_start|>": {"source": {"kind": "zero"}},
        "hello": {"source": {"kind": "model_token", "model": str(family["base"]), "token": "w5"}, "force": True},
        "<|new|>": {"source": {"kind": "model_token", "model": str(family["chat"]), "token_id": 7}},
        "<|im_end|>": {"source": str(family["extra"])},
    }})
    merged, vocab = merge(recipe, tmp_path / "out")
    assert len(vocab) == 68 == merged[EMBED].shape[0]
    base, chat, extra = (rows(family[n])[EMBED] for n in ("base", "chat", "extra"))
    chat_ids = AutoTokenizer.from_pretrained(family["chat"]).get_vocab()
    # base and extra lack <|im_start|>: zero rows; chat keeps its own
    assert torch.allclose(merged[EMBED][vocab["<|im_start|>"]], 0.6 * chat[chat_ids["<|im_start|>"]], atol=1e-6)
    # forced: every parent (extra too, which has hello) takes the base's w5 row
    assert torch.allclose(merged[EMBED][vocab["hello"]], base[5], atol=1e-6)
    # no parent has <|new|>: all take chat's row 7
    assert torch.allclose(merged[EMBED][vocab["<|new|>"]], chat[7], atol=1e-6)
    # the base lacks <|im_end|> and takes extra's row instead of the mean
    e = extra[AutoTokenizer.from_pretrained(family["extra"]).get_vocab()["<|im_end|>"]]
    c = chat[chat_ids["<|im_end|>"]]
    assert torch.allclose(merged[EMBED][vocab["<|im_end|>"]], e + 0.6 * (c - e), atol=1e-6)


@pytest.mark.parametrize("tokens, needles", [
    ({"<|im_start|>": {"force": True}}, ["<|im_start|>", "has no source", "force"]),
    ({"<|im_start|>": {"source": "./elsewhere"}}, ["./elsewhere", "not a parent"]),
    ({"hello": {"source": "BASE"}}, ["has no row for 'hello'"]),
    ({"x": {"source": {"kind": "model_token", "model": "CHAT", "token": "nope"}}}, ["has no token 'nope'"]),
    ({"x": {"source": {"kind": "model_token", "model": "CHAT", "token_id": 99}}}, ["token id 99", "66 rows"]),
])
def test_unusable_token_settings_are_refused(family, tmp_path, tokens, needles) -> None:
    text = json.dumps(tokens).replace("BASE", str(family["base"])).replace("CHAT", str(family["chat"]))
    recipe = ta_recipe(family, tokenizer={"tokens": json.loads(text)})
    with pytest.raises(ShoalError) as caught:
        run_merge(parse_recipe(yaml.safe_dump(recipe)), tmp_path / "out")
    for needle in needles:
        assert needle in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_different_vocabularies_without_tokenizer_settings_name_the_fix(family, tmp_path, run_cli) -> None:
    code, _, err = run_cli("merge", write_recipe(tmp_path, ta_recipe(family)), tmp_path / "out")
    one_error_line(code, err, "vocabularies differ", f"64 rows in {family['base']}", f"66 in {family['chat']}",
                   "tokenizer_source")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def swapped(family, tmp_path_factory) -> Path:
    """A copy of `same` whose tokenizer gives w4 and w5 each other's ids (as many rows as the base)."""
    import shutil

    folder = tmp_path_factory.mktemp("swapped") / "swapped"
    shutil.copytree(family["same"], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["w4"], vocab["w5"] = vocab["w5"], vocab["w4"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_same_rows_but_other_ids_are_refused_and_tokenizer_source_aligns_them(family, swapped, tmp_path, run_cli) -> None:
    recipe = ta_recipe(family) | {"models": [{"model": str(swapped), "parameters": {"weight": 0.5}}]}
    code, _, err = run_cli("merge", write_recipe(tmp_path, recipe), tmp_path / "out")
    one_error_line(code, err, "vocabularies differ though their embeddings have as many rows",
                   f"token 'w4' is id 4 in {family['base']} but id 5 in {swapped}", "2 tokens differ", "tokenizer_source")
    assert not (tmp_path / "out").exists()
    merged, vocab = merge(recipe | {"tokenizer_source": "base"}, tmp_path / "aligned")
    base, other = rows(family["base"]), rows(swapped)
    assert vocab["w4"] == 4 and vocab["w5"] == 5
    for token, own_row in [("w4", 5), ("w5", 4), ("w6", 6)]:
        expected = base[EMBED][vocab[token]] + 0.5 * (other[EMBED][own_row] - base[EMBED][vocab[token]])
        assert torch.allclose(merged[EMBED][vocab[token]], expected, atol=1e-6), token
    merged, _ = merge(ta_recipe(family) | {"models": [{"model": str(family["same"]), "parameters": {"weight": 0.5}}]},
                      tmp_path / "same")  # one vocabulary: merged as before, no tokenizer settings needed
    assert merged[EMBED].shape == base[EMBED].shape


@pytest.mark.parametrize("template, expected", [
    ("chatml", built_in("chatml")),
    ("auto", CHATML),  # chat and extra have it, the base has none
    ("{{ messages[0]['content'] }} literal", "{{ messages[0]['content'] }} literal"),
])
def test_chat_template_is_written_into_tokenizer_config(family, tmp_path, template, expected) -> None:
    merge(ta_recipe(family, tokenizer_source="union", chat_template=template), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"]
    assert written == expected
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == expected


def test_chat_template_replaces_the_copied_tokenizers_own(family, tmp_path) -> None:
    assert (family["chat"] / "chat_template.jinja").is_file()  # transformers would read it before tokenizer_config
    merged, vocab = merge(ta_recipe(family, tokenizer_source=str(family["chat"]), chat_template="llama3"),
                          tmp_path / "out")
    assert len(vocab) == 66 and not (tmp_path / "out" / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == built_in("llama3")
    recipe = {"merge_method": "linear", "chat_template": "mistral",  # no tokenizer settings: the base's is copied
              "models": [{"model": str(family[n]), "parameters": {"weight": 1.0}} for n in ("base", "same")]}
    merge(recipe, tmp_path / "plain")
    assert AutoTokenizer.from_pretrained(tmp_path / "plain").chat_template == built_in("mistral")


@pytest.mark.parametrize("value, needle", [("chatmll", "neither auto"), ("{{ x }}", "neither auto")])
def test_bad_chat_template_is_refused_with_its_line(value, needle) -> None:
    text = yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": value},
                          sort_keys=False)
    with pytest.raises(ShoalError, match=needle) as caught:
        parse_recipe(text, "r.yaml")
    assert str(caught.value).startswith("r.yaml:4:")


def test_tokenizer_source_and_section_together_are_refused() -> None:
    text = yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "base",
                           "tokenizer": {"source": "union"}})
    with pytest.raises(ShoalError, match="not both"):
        parse_recipe(text, "r.yaml")


def test_builtin_templates_render_the_formats_mergekit_names() -> None:
    from shoal.synthetic import _tokenizer

    render = lambda name, conv, gen: _tokenizer(8).apply_chat_template(
        conv, chat_template=built_in(name), tokenize=False, add_generation_prompt=gen)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]
    assert render("chatml", conv[1:2], True) == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert render("llama3", conv[1:2], True) == ("<s><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                                                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render("mistral", conv, False) == "<s> [INST] S\n\nQ [/INST] A</s> [INST] R [/INST]"
    assert render("alpaca", conv, True) == ("S\n\n### Instruction:\nQ\n\n### Response:\nA\n\n### Instruction:\nR"
                                            "\n\n### Response:\n")
    assert render("exaone", conv[1:2], True) == "[|system|][|endofturn|]\n[|user|]Q\n[|assistant|]"


def test_align_rows_by_hand() -> None:
    """Three parents of 3, 2 and 2 rows onto a vocabulary of 5 tokens, padded to 7 rows."""
    a, b, c = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[10.0], [20.0]]), torch.tensor([[100.0], [200.0]])
    vocab = Vocabulary(tokens=5, size=7, sources={4: TokenSource("b", 0)}, names={4: "t4"}, forced=frozenset(),
                       rows={"a": torch.tensor([0, 1, 2, -1, -1]), "b": torch.tensor([1, -1, 0, -1, -1]),
                             "c": torch.tensor([0, -1, 1, 1, -1])})
    # token 0: all have it; 1: only a (its row for all); 2: a and b and c; 3: only c; 4: none, the recipe says b's row 0
    out = torch.stack(align_rows([a, b, c], RowAlignment(vocab, ("a", "b", "c"), base=None)))
    expected = [[1, 2, 3, 200, 10, 43.2, 43.2], [20, 2, 10, 200, 10, 48.4, 48.4], [100, 2, 200, 200, 10, 102.4, 102.4]]
    assert torch.allclose(out.squeeze(2), torch.tensor(expected))
    vocab = Vocabulary(tokens=3, size=3, sources={}, names={}, forced=frozenset(),
                       rows={"a": torch.tensor([0, 1, 2]), "b": torch.tensor([0, -1, 1]),
                             "c": torch.tensor([0, -1, -1])})
    out = align_rows([a, b, c], RowAlignment(vocab, ("a", "b", "c"), base="b"))
    assert out[2].flatten().tolist() == [100, 2, 20]  # c lacks token 2: the base's row, not the mean of a and b
    out = align_rows([a, b, c], RowAlignment(vocab, ("a", "b", "c"), base=None))
    assert out[2].flatten().tolist() == [100, 2, 11.5]


@pytest.mark.parametrize("settings", [
    {"tokenizer_source": "union"},
    {"tokenizer_source": "base"},
    {"tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<|im_start|>": {"source": {"kind": "zero"}}, "<|new|>": {"source": {"kind": "model_token", "model": "CHAT",
                                                                             "token": "w9"}}}}},
])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_rows_match_mergekit_token_for_token(family, tmp_path, settings, method) -> None:
    """mergekit numbers new tokens in hash order, so rows are compared by token text."""
    pytest.importorskip("mergekit", reason="mergekit is a test-only dependency")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    settings = json.loads(json.dumps(settings).replace("CHAT", str(family["chat"])))
    recipe = ta_recipe(family, **settings) | {"merge_method": method}
    if method == "ties":
        recipe["models"][0]["parameters"]["density"] = 0.5
    ours, our_vocab = merge(recipe, tmp_path / "shoal")
    mergekit_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mergekit"),
                   MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    theirs = rows(tmp_path / "mergekit")
    their_vocab = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    assert set(our_vocab) == set(their_vocab) and set(ours) == set(theirs)
    order = sorted(our_vocab)
    worst = 0.0
    for name in ours:
        if name in (EMBED, HEAD):
            assert ours[name].shape == theirs[name].shape
            mine, other = ours[name][[our_vocab[t] for t in order]], theirs[name][[their_vocab[t] for t in order]]
            padding = ours[name][len(our_vocab):] - theirs[name][len(their_vocab):]
            worst = max(worst, padding.abs().max().item() if padding.numel() else 0.0)
        else:
            mine, other = ours[name], theirs[name]
        worst = max(worst, (mine - other).abs().max().item())
    assert worst < 1e-5, worst


@pytest.mark.parametrize("inputs", ["device", "stream"])
def test_the_resident_merger_holds_the_output_vocabulary(family, inputs, tmp_path) -> None:
    """Under every memory plan: inputs kept (aligned once) or streamed from the files (aligned every trial)."""
    from shoal.merge.memory import MemoryPlan
    from shoal.merge.resident import ResidentMerger

    recipe = parse_recipe(yaml.safe_dump(ta_recipe(family, tokenizer={"source": "union", "pad_to_multiple_of": 4})))
    merged, vocab = merge(recipe.model_dump(exclude_none=True), tmp_path / "out")
    merger = ResidentMerger(recipe, memory=MemoryPlan(inputs=inputs))
    merger.apply(recipe)
    assert merger.tokenizer.get_vocab() == vocab and len(vocab) == 67
    state = merger.model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name
    assert merger.model.config.vocab_size == 68
    with pytest.raises(ShoalError, match="another tokenizer"):
        merger.apply(parse_recipe(yaml.safe_dump(ta_recipe(family, tokenizer_source="union"))))


def test_a_search_over_parents_whose_vocabularies_differ_needs_and_uses_tokenizer_source(zoo, tmp_path) -> None:
    """A parent that added ChatML tokens: refused with the setting's name, then searched over the union vocabulary;
    the exported best model carries it and scores on dev what the search measured."""
    import shutil

    from shoal.evaluate import evaluate, load_task
    from shoal.search.evolve import evolve
    from shoal.search.spec import load_search

    chat = tmp_path / "chat"
    shutil.copytree(zoo.parents["math"], chat)
    _add_tokens(chat, [("<|im_start|>", True), ("<|im_end|>", True)], seed=6)
    spec = {"base": str(zoo.base), "parents": {"math": str(chat), "language": str(zoo.parents["language"])},
            "genome": {"layers_per_group": 0}, "tasks": [{"path": str(zoo.tasks["xx-math"])}], "budget": 3, "seed": 1}
    refused = tmp_path / "refused.yaml"
    refused.write_text(yaml.safe_dump(spec))
    with pytest.raises(ShoalError, match="vocabularies differ.*a parent's name"):
        evolve(load_search(refused), tmp_path / "refused-run")
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump(spec | {"tokenizer_source": "union"}))
    summary = evolve(load_search(search), tmp_path / "run")
    assert summary.trials == 3
    best = tmp_path / "run" / "best"
    vocab = AutoTokenizer.from_pretrained(best).get_vocab()
    assert {"<|im_start|>", "<|im_end|>"} <= set(vocab)
    assert rows(best)[EMBED].shape[0] == len(vocab) == len(AutoTokenizer.from_pretrained(zoo.base)) + 2
    assert evaluate(best, load_task(zoo.tasks["xx-math"]), split="dev").score == pytest.approx(summary.best.dev, abs=1e-12)


def test_a_search_names_its_tokenizer_source_among_its_parents(tmp_path) -> None:
    from shoal.search.spec import load_search

    search = tmp_path / "search.yaml"
    search.write_text("base: b\nparents: {m: x}\ntasks: [{path: t}]\ntokenizer_source: q\n")
    with pytest.raises(ShoalError, match="'q' is not union, base or one of the parents \\(m\\)"):
        load_search(search)
    search.write_text("base: b\nparents: {m: x}\ntasks: [{path: t}]\nspace: dfs\ntokenizer_source: union\n")
    with pytest.raises(ShoalError, match="parameter-space setting"):
        load_search(search)

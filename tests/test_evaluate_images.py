"""Image tasks on a tiny random LLaVA: batched outputs equal transformers' generate one item at a time, scores equal a
hand computation, constraints score 0, `shoal eval` runs, and images are checked at load and refused by text models."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from shoal.errors import ShoalError
from shoal.evaluate import evaluate, load_task
from shoal.evaluate.runner import load_model
from shoal.evaluate.vision import model_text

IMAGE = "<image>"
N = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llava(folder: Path) -> Path:
    """A random LLaVA (CLIP vision tower 28x28 pixels -> 4 image tokens, 2-layer Llama) and its processor, saved."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, IMAGE: 4} | {f"w{i}": i for i in range(5, 128)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=4, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, image_token=IMAGE,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def loaded(vlm):
    return AutoModelForImageTextToText.from_pretrained(vlm).eval(), AutoProcessor.from_pretrained(vlm)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """Four PNGs of different sizes: a coloured ground with a shape on it, under pictures/."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "pictures").mkdir()
    for i, (ground, ink) in enumerate([("red", "yellow"), ("navy", "white"), ("green", "black"), ("gray", "orange")]):
        image = Image.new("RGB", (28 + 10 * i, 40 - 4 * i), ground)
        draw = ImageDraw.Draw(image)
        draw.ellipse((2, 2, 14 + 3 * i, 20), fill=ink) if i % 2 else draw.rectangle((4, 6, 20, 18 + i), fill=ink)
        image.save(folder / "pictures" / f"{i}.png")
    return folder


def rows(seed: int = 0) -> list[dict]:
    """N items over the four pictures, prompts of 1-6 random words, so batches need padding."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(f"w{rng.randrange(5, 128)}" for _ in range(rng.randint(1, 6))), "answer": "w5",
             "image": f"pictures/{i % 4}.png"} for i in range(N)]


def write_task(pictures: Path, name: str, spec: dict, items: list[dict]):
    folder = pictures / name  # the pictures are one folder up: paths in items are relative to the task folder
    folder.mkdir(exist_ok=True)
    items = [it | {"image": f"../{it['image']}"} if "image" in it else it for it in items]
    (folder / "task.yaml").write_text(json.dumps({"name": name, **spec, "splits": {"dev": "dev.jsonl"}}))
    (folder / "dev.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    return folder


def reference_outputs(model, processor, folder: Path, items: list[dict], max_new_tokens: int, stop: list[str],
                      eos: list[int]) -> list[str]:
    """transformers' generate one item at a time (no padding) from the image token, a newline and the prompt."""
    outputs = []
    for it in items:
        image = Image.open(folder / it["image"]).convert("RGB")
        inputs = processor(text=[f"{IMAGE}\n{it['prompt']}"], images=[image], return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)[0, inputs.input_ids.shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        out = processor.tokenizer.decode(new, skip_special_tokens=True)
        outputs.append(min((out[: out.find(s)] for s in stop if s in out), key=len, default=out))
    return outputs


def test_batched_image_outputs_equal_generate_one_item_at_a_time_with_eos_and_stop_strings(loaded, pictures):
    model, processor = loaded
    items = rows()
    free = reference_outputs(model, processor, pictures, items, 8, [], [2])
    counts = Counter(w for out in free for w in set(out.split()))
    (eos_word, _), (stop_word, _) = counts.most_common(2)
    eos = [2, processor.tokenizer.convert_tokens_to_ids(eos_word)]
    stop = [f"{stop_word} "]
    expected = reference_outputs(model, processor, pictures, items, 8, stop, eos)
    assert sum(a != b for a, b in zip(expected, free)) >= N // 4  # EOS and the stop string cut outputs short
    model.generation_config.eos_token_id = eos
    try:
        task = load_task(write_task(pictures, "gen", {"metric": "exact_match", "max_new_tokens": 8, "stop": stop},
                                    items))
        batched = evaluate(model, task, "dev", processor=processor, batch_size=3, return_outputs=True)
        one_by_one = evaluate(model, task, "dev", processor=processor, batch_size=1, return_outputs=True)
    finally:
        model.generation_config.eos_token_id = 2
    assert batched.outputs == one_by_one.outputs == expected


def test_rouge_l_and_token_f1_of_image_items_equal_a_hand_computation(loaded, pictures):
    model, processor = loaded
    probe = load_task(write_task(pictures, "probe", {"metric": "exact_match", "max_new_tokens": 6}, rows()))
    outputs = evaluate(model, probe, "dev", processor=processor, return_outputs=True).outputs
    words = [o.split() for o in outputs]
    assert all(len(w) >= 3 for w in words)
    # against an output of n tokens: itself; its first 3 words and 2 strangers (LCS 3 of 5, 3 shared); itself with
    # a stranger inserted (LCS n of n + 1, n shared); its last word moved to the front (LCS n - 1 of n, all shared)
    kinds = [lambda w: w, lambda w: [*w[:3], "x1", "x2"], lambda w: [*w[:3], "x1", *w[3:]], lambda w: [w[-1], *w[:-1]]]
    assert all(kinds[3](w) != w for w in words)
    f = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    by_hand = {"rouge_l": lambda n: [1.0, f(3 / n, 3 / 5), f(1, n / (n + 1)), f((n - 1) / n, (n - 1) / n)],
               "token_f1": lambda n: [1.0, f(3 / n, 3 / 5), f(1, n / (n + 1)), 1.0]}
    items = [it | {"answer": " ".join(kinds[i % 4](w))} for i, (it, w) in enumerate(zip(rows(), words))]
    for metric, scores in by_hand.items():
        task = load_task(write_task(pictures, metric, {"metric": metric, "max_new_tokens": 6}, items))
        result = evaluate(model, task, "dev", processor=processor, batch_size=4, return_outputs=True)
        assert result.outputs == outputs
        assert result.score == pytest.approx(sum(scores(len(w))[i % 4] for i, w in enumerate(words)) / N)


def test_a_failed_constraint_scores_an_image_item_zero_and_is_counted(loaded, pictures):
    model, processor = loaded
    probe = load_task(write_task(pictures, "probe2", {"metric": "exact_match", "max_new_tokens": 4}, rows()))
    outputs = evaluate(model, probe, "dev", processor=processor, return_outputs=True).outputs
    allowed = sorted(set(outputs[0].split()))
    items = [it | {"answer": o} for it, o in zip(rows(), outputs)]  # every item right, unless its constraint fails
    spec = {"metric": "token_f1", "max_new_tokens": 4,
            "constraints": [{"name": "first-words", "type": "vocabulary", "words": allowed}]}
    result = evaluate(model, load_task(write_task(pictures, "constrained", spec, items)), "dev", processor=processor)
    kept = [set(o.split()) <= set(allowed) for o in outputs]
    assert 0 < sum(kept) < N
    assert result.score == sum(kept) / N
    assert result.constraint_failures == {"first-words": N - sum(kept)}


def test_shoal_eval_scores_an_image_task_from_the_model_folder(vlm, loaded, pictures, run_cli):
    model, processor = loaded
    folder = write_task(pictures, "cli", {"metric": "rouge_l", "max_new_tokens": 5}, rows())
    code, out, err = run_cli("eval", vlm, "--task", folder, "--json", "--batch-size", "3")
    assert code == 0, err
    [summary] = json.loads(out)
    expected = evaluate(model, load_task(folder), "dev", processor=processor)
    assert (summary["task"], summary["metric"], summary["n"]) == ("cli", "rouge_l", N)
    assert summary["score"] == expected.score


def test_a_live_vlm_takes_its_processor_as_processor_or_as_the_tokenizer_load_model_returns(vlm, loaded, pictures):
    model, processor = loaded
    task = load_task(write_task(pictures, "live", {"metric": "exact_match", "max_new_tokens": 5}, rows()))
    by_folder = evaluate(vlm, task, "dev", return_outputs=True).outputs
    assert evaluate(model, task, "dev", processor=processor, return_outputs=True).outputs == by_folder
    assert evaluate(model, task, "dev", processor=vlm, return_outputs=True).outputs == by_folder
    again, prepares = load_model(vlm, "cpu")
    assert isinstance(prepares, LlavaProcessor)
    assert evaluate(again, task, "dev", tokenizer=prepares, return_outputs=True).outputs == by_folder


def test_text_items_on_a_vlm_are_generated_from_the_prompt_alone(loaded, pictures):
    model, processor = loaded
    mixed = rows()
    for it in mixed[::2]:
        del it["image"]
    task = load_task(write_task(pictures, "mixed", {"metric": "exact_match", "max_new_tokens": 5}, mixed))
    outputs = evaluate(model, task, "dev", processor=processor, batch_size=3, return_outputs=True).outputs
    for it, out in zip(mixed, outputs):
        if "image" not in it:
            ids = processor.tokenizer(it["prompt"], return_tensors="pt").input_ids
            new = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            assert out == processor.tokenizer.decode(new, skip_special_tokens=True)
    images_only = load_task(write_task(pictures, "gen-only", {"metric": "exact_match", "max_new_tokens": 5},
                                       [it for it in rows()[1::2]]))
    pictured = evaluate(model, images_only, "dev", processor=processor, return_outputs=True).outputs
    assert outputs[1::2] == pictured


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} w9{% endif %}")


def test_the_image_token_is_kept_where_the_prompt_puts_it_else_placed_by_the_chat_template_or_before_it(loaded):
    _, processor = loaded
    assert model_text(processor, "w5 <image> w6") == ("w5 <image> w6", True)
    assert model_text(processor, "w5 w6") == ("<image>\nw5 w6", True)
    processor.chat_template = TEMPLATE
    try:
        assert model_text(processor, "w5 w6") == ("<image> w5 w6 w9", False)
        assert model_text(processor, "w5 <image> w6") == ("w5 <image> w6", True)
    finally:
        processor.chat_template = None


def test_chat_template_and_verbatim_prompts_batch_apart_and_equal_one_at_a_time(loaded, pictures):
    model, processor = loaded
    items = rows(1)
    for it in items[::3]:
        it["prompt"] = f"w7 {IMAGE} {it['prompt']}"
    task = load_task(write_task(pictures, "templated", {"metric": "exact_match", "max_new_tokens": 5}, items))
    templated = AutoProcessor.from_pretrained(processor.tokenizer.name_or_path)
    templated.chat_template = TEMPLATE
    batched = evaluate(model, task, "dev", processor=templated, batch_size=4, return_outputs=True).outputs
    assert batched == evaluate(model, task, "dev", processor=templated, batch_size=1, return_outputs=True).outputs
    plain = evaluate(model, task, "dev", processor=processor, batch_size=4, return_outputs=True).outputs
    assert [a == b for a, b in zip(batched, plain)].count(False) >= N // 2  # the template changed the others
    assert batched[::3] == plain[::3]  # prompts that place the image are used as written either way


def test_greedy_ignores_the_models_sampling_and_penalty_settings(loaded, pictures):
    model, processor = loaded
    task = load_task(write_task(pictures, "greedy", {"metric": "exact_match", "max_new_tokens": 6}, rows()))
    before = evaluate(model, task, "dev", processor=processor, return_outputs=True).outputs
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.update(do_sample=True, temperature=5.0, repetition_penalty=3.0, no_repeat_ngram_size=1)
    try:
        assert evaluate(model, task, "dev", processor=processor, return_outputs=True).outputs == before
    finally:
        model.generation_config = saved


def test_an_image_task_on_a_text_model_is_one_clear_error(parents, pictures, run_cli):
    folder = write_task(pictures, "text-model", {"metric": "exact_match"}, rows())
    with pytest.raises(ShoalError, match=r"items with an image .* scored as a text model"):
        evaluate(parents["base"], load_task(folder), "dev")
    code, _, err = run_cli("eval", parents["base"], "--task", folder)
    assert code == 2 and "items with an image" in err and "processor=" in err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda it: it | {"image": "pictures/missing.png"}, r"dev.jsonl:2: image .*missing.png not found"),
        (lambda it: it | {"image": "broken/task.yaml"}, r"dev.jsonl:2: image .*task.yaml cannot be read"),
    ],
)
def test_a_missing_or_unreadable_image_names_the_file_and_line(pictures, edit, message):
    items = rows()[:3]
    items[1] = edit(items[1])
    with pytest.raises(ShoalError, match=message):
        load_task(write_task(pictures, "broken", {"metric": "exact_match"}, items))


def test_log_likelihood_metrics_refuse_image_items_at_load(pictures):
    items = [it | {"choices": ["w5", "w6"]} for it in rows()[:2]]
    with pytest.raises(ShoalError, match=r"dev.jsonl:1: items with an image are scored on generated text"):
        load_task(write_task(pictures, "mc", {"metric": "multiple_choice"}, items))

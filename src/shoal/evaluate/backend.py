"""Batched greedy generation and continuation log-likelihoods with a transformers causal LM (left padding, KV cache)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shoal.evaluate.metrics import cut_at_stop

Ids = list[int]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[Ids]:
    """Token ids of each prompt, with the tokenizer's special tokens (e.g. BOS) as in training."""
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]]


def encode_continuations(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]) -> list[tuple[Ids, Ids]]:
    """(context ids, continuation ids) of each (prompt, continuation), split as lm-evaluation-harness does.

    The continuation is joined to the prompt with one space (none if either side already has whitespace there),
    the whole is tokenised, and the continuation's ids are those after the prompt's own ids. An empty context
    becomes the BOS (or EOS) token so that the first continuation token has a prediction.
    """
    wholes = [p + ("" if not p or p[-1].isspace() or c[:1].isspace() else " ") + c for p, c in pairs]
    contexts = encode_prompts(tokenizer, [p for p, _ in pairs])
    start = [t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None][:1]
    wholes_ids = encode_prompts(tokenizer, wholes)
    return [(context or start, whole[len(context):]) for context, whole in zip(contexts, wholes_ids)]


def stop_triggers(tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> list[int]:
    """Ids of tokens that could complete a stop string: their text shares a character with one (or is a partial byte).

    Generation checks stop strings only on rows that just emitted such a token; since outputs are cut at the first
    stop string afterwards, a token missing here could only cost time, never change an output.
    """
    chars = set("".join(stop)) | {"\ufffd"}
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if chars & set(text)]


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends generation: the generation config's EOS ids and the tokenizer's."""
    found = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    found = found if isinstance(found, list) else [found]
    return sorted({t for t in [*found, tokenizer.eos_token_id] if t is not None})


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return t
    return 0


def _left_padded(rows: Sequence[Ids], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask and position_ids (counting from each row's first real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _keeps_logits(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so memory runs out on the first batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _lookup(ids: Sequence[int], size: int, device: torch.device) -> torch.Tensor:
    """A boolean table over the vocabulary, True at ids (indexing it is cheaper than torch.isin per step)."""
    table = torch.zeros(size, dtype=torch.bool, device=device)
    table[[i for i in ids if i < size]] = True
    return table


@torch.inference_mode()
def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Ids],
    max_new_tokens: int,
    stop: Sequence[str],
    eos: Sequence[int],
    triggers: Sequence[int],
) -> list[Ids]:
    pad_id = padding_id(tokenizer)
    ids, mask, positions = _left_padded(rows, pad_id, model.device)
    extra = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    is_eos = _lookup(eos, out.logits.shape[-1], ids.device)
    is_trigger = _lookup(triggers if stop else [], out.logits.shape[-1], ids.device)
    check_stops = bool(is_trigger.any())
    positions = positions[:, -1:]
    batch = len(rows)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=ids.device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1).masked_fill(done, pad_id)
        steps.append(token)
        ended = is_eos[token] & ~done
        lengths[ended] = step  # the EOS token is not part of the output
        done |= ended
        hits = (is_trigger[token] & ~done).nonzero().flatten().tolist() if check_stops else []
        if hits:
            generated = torch.stack(steps, 1)[hits].tolist()
            for row, text in zip(hits, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                if any(s in text for s in stop):
                    done[row], lengths[row] = True, step + 1
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                    cache=out.cache, use_cache=True)
    generated = torch.stack(steps, 1).tolist()
    return [row[:n] for row, n in zip(generated, lengths.tolist())]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Ids],
    *,
    max_new_tokens: int,
    stop: Sequence[str],
    triggers: Sequence[int],
    batch_size: int,
) -> list[str]:
    """Greedy continuation of each prompt, decoded without special tokens and cut at the first stop string.

    A row stops at EOS or once its text holds a stop string (checked when it emits one of triggers, see
    stop_triggers); a batch stops when every row has.
    """
    eos = eos_ids(model, tokenizer)
    outputs: list[str] = [""] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        new = _generate_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, stop, eos, triggers)
        for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[i] = cut_at_stop(text, stop)
    return outputs


@torch.inference_mode()
def loglikelihoods(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[Ids, Ids]], *, batch_size: int
) -> list[list[float]]:
    """Per-token log-probabilities of each continuation given its context, teacher-forced, one forward per batch."""
    keep = _keeps_logits(model)
    out: list[list[float]] = [[] for _ in pairs]
    for batch in length_batches([len(c) + len(t) for c, t in pairs], batch_size):
        rows = [pairs[i][0] + pairs[i][1] for i in batch]
        ids, mask, positions = _left_padded(rows, padding_id(tokenizer), model.device)
        span = max(1, *(len(pairs[i][1]) for i in batch))
        extra = {"logits_to_keep": span + 1} if keep else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra).logits
        logits = logits[:, -(span + 1):-1].float()  # these positions predict the last span tokens
        targets = ids[:, -span:]
        logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
        for row, i in enumerate(batch):
            n = len(pairs[i][1])
            out[i] = logp[row, span - n:].tolist() if n else []
    return out

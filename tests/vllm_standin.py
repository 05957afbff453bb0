"""A stand-in for the slice of vLLM's API that shoal's vLLM engine uses, for machines where vLLM cannot run.

It keeps vLLM 0.33's contract as its source states it, where a wrong use would show:
- `collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` loads Hugging Face checkpoint names into the
  engine's own copy of the model; an unknown name raises (vLLM's `load_weights` indexes its parameters by name) and
  so does a parameter left unloaded (stricter than vLLM, which logs it);
- the engine has a prefix cache: a prompt seen before reuses what was computed for it, until
  `reset_prefix_cache()`; so outputs stay those of the old weights if a caller forgets to reset it;
- dtype is one of vLLM's names, and "auto" runs a float32 checkpoint in bfloat16 (vLLM's downcast);
- `reset_prefix_cache()` returns False, and keeps the cache, while blocks are in use (`busy`);
- `max_model_len` defaults to the config's max_position_embeddings; a longer prompt is refused, and an output
  that would pass it is cut short there;
- `generate` takes `TokensPrompt`s and greedy `SamplingParams`; the output text is decoded without special tokens
  and cut before the first stop string (vLLM stops there; greedy tokens after it would not change the text before
  it); EOS ends a sequence.
Generation itself is transformers' own `generate`, one prompt at a time: nothing of shoal's backend is reused.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int | None = 16
    stop: list[str] | None = None
    skip_special_tokens: bool = True


def TokensPrompt(prompt_token_ids: list[int]) -> dict[str, Any]:
    return {"prompt_token_ids": prompt_token_ids}


@dataclass
class CompletionOutput:
    text: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16}


class LLM:
    instances: ClassVar[list[LLM]] = []
    busy = False

    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.92, max_model_len: int | None = None, **options: Any) -> None:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
        if dtype == "auto":
            wanted = torch.bfloat16 if loaded.dtype == torch.float32 else loaded.dtype
        elif dtype in DTYPES:
            wanted = DTYPES[dtype]
        else:
            raise ValueError(f"Unknown dtype: {dtype!r}")
        self.model = loaded.to(wanted).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model_config = types.SimpleNamespace(
            max_model_len=max_model_len or self.model.config.max_position_embeddings, dtype=wanted)
        self.options = options
        self.reloads = 0
        self._prefix_cache: dict[tuple[tuple[int, ...], int], str] = {}
        LLM.instances.append(self)

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        if method != "reload_weights":
            raise NotImplementedError(f"the stand-in has no worker method {method!r}")
        own = dict(self.model.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in (kwargs or {})["weights_iterator"]:
                if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                    continue
                own[name].copy_(tensor)  # KeyError on a name the model does not have, as in vLLM
                loaded.add(name)
        missing = set(own) - loaded
        if missing:
            raise RuntimeError(f"weights not loaded: {sorted(missing)}")
        self.reloads += 1
        return [None]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        if self.busy:
            return False
        self._prefix_cache.clear()
        return True

    @torch.inference_mode()
    def generate(self, prompts: list[dict[str, Any]], sampling_params: SamplingParams, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        assert sampling_params.temperature == 0.0, "shoal scores greedy outputs"
        return [RequestOutput([CompletionOutput(self._one(p["prompt_token_ids"], sampling_params))]) for p in prompts]

    def _one(self, ids: list[int], params: SamplingParams) -> str:
        room = self.model_config.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than max_model_len")
        key = (tuple(ids), params.max_tokens or 16)
        if key not in self._prefix_cache:
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=min(room, params.max_tokens or 16),
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=params.skip_special_tokens)
            for stop in params.stop or []:
                text = text.split(stop, 1)[0]
            self._prefix_cache[key] = text
        return self._prefix_cache[key]


def modules() -> dict[str, types.ModuleType]:
    """`vllm` and `vllm.inputs` as modules, for sys.modules."""
    vllm, inputs = types.ModuleType("vllm"), types.ModuleType("vllm.inputs")
    vllm.LLM, vllm.SamplingParams, vllm.inputs = LLM, SamplingParams, inputs
    inputs.TokensPrompt = TokensPrompt
    return {"vllm": vllm, "vllm.inputs": inputs}

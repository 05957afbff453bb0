"""Generation on a resident vLLM engine whose weights follow the candidate (optional: `pip install vllm`, GPU).

Only vLLM's public API is used: `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, the
in-place reload vLLM documents for weight updates (docs/training/layerwise.md), then `LLM.reset_prefix_cache()`
(cached prompt KV was computed with the old weights: the evaluation's prompts are the same for every candidate,
so without it the next candidate would reuse the last one's attention), then `LLM.generate` on token-id prompts
with greedy sampling. The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a candidate's
tensors are handed over where they lie instead of being serialised to an engine process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from shoal.errors import ShoalError
from shoal.evaluate.metrics import cut_at_stop

Ids = list[int]
IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"
VLLM_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DEFAULT_MEMORY_SHARE = 0.4


class VllmEngine:
    """A vLLM `LLM` built once from a model folder (or Hub id) of the candidates' architecture and tokenizer.

    dtype is the candidates' (vLLM's "auto" would run a float32 model in bfloat16, unlike transformers).
    gpu_memory_utilization is vLLM's: the share of the GPU's *total* memory the engine may take (weights and KV
    cache), which must be free when it starts, after the parents are loaded.
    """

    def __init__(self, model: str | Path, *, dtype: torch.dtype, seed: int = 0,
                 gpu_memory_utilization: float = DEFAULT_MEMORY_SHARE, **options: Any) -> None:
        if dtype not in VLLM_DTYPES:
            raise ShoalError(f"engine: vllm runs float32, float16 or bfloat16 models, not {dtype}")
        if os.environ.setdefault(IN_PROCESS, "0") != "0":
            raise ShoalError(f"the vLLM engine must run in shoal's process to take weights in place; unset {IN_PROCESS}")
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as exc:
            raise ShoalError("engine: vllm needs vLLM: pip install vllm (on a machine where it runs, e.g. a GPU)") from exc
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            if free < gpu_memory_utilization * total:
                raise ShoalError(
                    f"vLLM would take {gpu_memory_utilization:.2f} of the GPU's {total / 2**30:.1f} GiB, but "
                    f"{free / 2**30:.1f} GiB are free with the parents loaded; lower vllm.gpu_memory_utilization")
        self._sampling, self._prompt = SamplingParams, TokensPrompt
        self.llm = LLM(model=str(model), tokenizer=str(model), dtype=VLLM_DTYPES[dtype], seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, **options)
        self.max_model_len: int = self.llm.model_config.max_model_len

    def load(self, model: PreTrainedModel) -> None:
        """Copy model's weights (Hugging Face names, as in its checkpoint) into the engine's, in place."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(model.state_dict().items())})
        if not self.llm.reset_prefix_cache():
            raise ShoalError("vLLM kept its prefix cache (blocks still in use), so it would reuse the attention of "
                             "the last candidate's weights")

    def generate(self, prompts: Sequence[Ids], *, max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy continuation of each prompt, decoded without special tokens and cut at the first stop string,
        as `backend.generate` does with a transformers model."""
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_model_len:
            raise ShoalError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds vLLM's "
                             f"max_model_len {self.max_model_len}, where vLLM would cut the output short")
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None,
                                skip_special_tokens=True)
        outputs = self.llm.generate([self._prompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [cut_at_stop(out.outputs[0].text, stop) for out in outputs]

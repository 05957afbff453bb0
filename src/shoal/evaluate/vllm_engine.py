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

from transformers import PreTrainedModel

from shoal.errors import ShoalError
from shoal.evaluate.metrics import cut_at_stop

Ids = list[int]
IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


class VllmEngine:
    """A vLLM `LLM` built once from a model folder (or Hub id) of the candidates' architecture and tokenizer."""

    def __init__(self, model: str | Path, *, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.4, **options: Any) -> None:
        if os.environ.setdefault(IN_PROCESS, "0") != "0":
            raise ShoalError(f"the vLLM engine must run in shoal's process to take weights in place; unset {IN_PROCESS}")
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as exc:
            raise ShoalError("engine: vllm needs vLLM: pip install vllm (on a machine where it runs, e.g. a GPU)") from exc
        self._sampling, self._prompt = SamplingParams, TokensPrompt
        self.llm = LLM(model=str(model), tokenizer=str(model), dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, **options)

    def load(self, model: PreTrainedModel) -> None:
        """Copy model's weights (Hugging Face names, as in its checkpoint) into the engine's, in place."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(model.state_dict().items())})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Ids], *, max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy continuation of each prompt, decoded without special tokens and cut at the first stop string,
        as `backend.generate` does with a transformers model."""
        params = self._sampling(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None,
                                skip_special_tokens=True)
        outputs = self.llm.generate([self._prompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [cut_at_stop(out.outputs[0].text, stop) for out in outputs]

"""Random Llama-family parents (a base and perturbed fine-tunes) for the demo, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from shoal.checkpoint.files import write_config


def tiny_config(
    *, vocab_size: int = 256, hidden_size: int = 64, num_hidden_layers: int = 4, intermediate_size: int = 128
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=intermediate_size,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_state(folder: Path, config: PretrainedConfig, state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerFast) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_config(folder, config.to_dict())
    tokenizer.save_pretrained(folder)


def make_parents(
    folder: str | Path,
    names: Sequence[str] = ("base", "a", "b", "c"),
    *,
    config: PretrainedConfig | None = None,
    dtype: torch.dtype = torch.float32,
    noise: float = 0.02,
    seed: int = 0,
) -> dict[str, Path]:
    """A random base (names[0]) and parents = base + noise * N(0, 1) per tensor, as HF folders under folder."""
    config = config or tiny_config()
    config.dtype = str(dtype).removeprefix("torch.")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    base = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    tokenizer = _tokenizer(config.vocab_size)
    generator = torch.Generator().manual_seed(seed + 1)
    out: dict[str, Path] = {}
    for i, name in enumerate(names):
        state = base if i == 0 else {
            k: (v.float() + noise * torch.randn(v.shape, generator=generator)).to(dtype) for k, v in base.items()
        }
        out[name] = Path(folder) / name
        save_state(out[name], config, state, tokenizer)
    return out

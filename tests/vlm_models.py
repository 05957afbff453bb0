"""Tiny random vision-language models built with transformers' own classes, whose language model is a given
tiny LLM's weights plus noise (a fine-tune of the same base, as LLaVA-Mistral is of Mistral), with processors.

The names are mapped here by hand, independently of shoal.layout, so that tests check layout against
transformers rather than against itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from shoal.checkpoint.files import write_config

CHAT_TEMPLATE = "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> " \
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]


def qwen2_config(num_hidden_layers: int = 2, hidden_size: int = 64) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=256, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["Qwen2ForCausalLM"],
    )


def _tokenizer(vocab_size: int, specials: list[str]) -> PreTrainedTokenizerFast:
    """The LLM parents' word-level vocabulary, with its last len(specials) words replaced by the image tokens."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _live_name(canonical: str) -> str:
    """A text LLM's tensor name inside the VLM built by transformers (>= 4.52): model.language_model.*, lm_head."""
    return canonical if canonical.startswith("lm_head.") else "model.language_model." + canonical.removeprefix("model.")


def _from_llm(model: torch.nn.Module, llm: Path, noise: float, seed: int) -> None:
    """Set the model's language model to llm's weights + noise * N(0, 1)."""
    weights = load_file(llm / "model.safetensors")
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in weights.items():
            target = params[_live_name(name)]
            target.copy_(tensor + noise * torch.randn(tensor.shape, generator=generator))


def _save(model: torch.nn.Module, folder: Path, layout: str) -> None:
    """layout 'checkpoint': as transformers saves it (language_model.model.*, visual.*...); 'live': the model's own
    parameter names (model.language_model.*), as some transformers versions wrote them."""
    model.save_pretrained(folder)
    if layout == "live":
        for shard in folder.glob("*.safetensors"):
            shard.unlink()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        write_config(folder, model.config.to_dict())


def make_llava(folder: Path, llm: Path, *, noise: float = 0.02, seed: int = 0, layout: str = "checkpoint",
               next_: bool = False) -> Path:
    """A tiny LLaVA (or LLaVA-NeXT) with a 2-layer CLIP tower on 32x32 images; image token = the last word."""
    text = AutoConfig.from_pretrained(llm)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    tokenizer = _tokenizer(text.vocab_size, ["<image>"])
    common = dict(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1)
    torch.manual_seed(seed)
    if next_:
        config = LlavaNextConfig(**common, image_grid_pinpoints=[[32, 32]])
        model = LlavaNextForConditionalGeneration(config)
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         image_grid_pinpoints=[[32, 32]])
        processor = LlavaNextProcessor(images, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                                       chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    else:
        config = LlavaConfig(**common, image_seq_length=16)
        model = LlavaForConditionalGeneration(config)
        images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(images, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                                   chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    config.architectures = [type(model).__name__]
    _from_llm(model, llm, noise, seed + 1)
    _save(model, folder, layout)
    processor.save_pretrained(folder)
    return folder


def make_qwen2_vl(folder: Path, llm: Path, *, noise: float = 0.02, seed: int = 0, layout: str = "checkpoint",
                  v2_5: bool = False) -> Path:
    """A tiny Qwen2-VL or Qwen2.5-VL (2-block vision tower, 56x56 images -> 4 image tokens) over a tiny Qwen2 LLM."""
    text = AutoConfig.from_pretrained(llm).to_dict()
    text.pop("architectures", None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    ids = {s: text["vocab_size"] - 4 + i for i, s in enumerate(QWEN_SPECIALS)}
    patches = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if v2_5:
        kind, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=32, out_hidden_size=text["hidden_size"], intermediate_size=64, num_heads=2,
                      window_size=56, fullatt_block_indexes=[1], **patches)
    else:
        kind, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2, **patches)
    config = kind(
        text_config=text,
        vision_config=vision,
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
        architectures=[model_class.__name__], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    _from_llm(model, llm, noise, seed + 1)
    _save(model, folder, layout)
    pixels = dict(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
    # Qwen2VLProcessor needs torchvision (for its video processor), which is not a dependency: its parts are saved
    Qwen2VLImageProcessorPil(**pixels).save_pretrained(folder)
    _tokenizer(text["vocab_size"], QWEN_SPECIALS).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder

"""The zoo's word-level tokenizer: one token per word, numbers split into digits, saved as an HF fast tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from shoal.zoo.language import LANGUAGES, PUNCTUATION, words

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIALS = [PAD, BOS, EOS, UNK, IMAGE]  # IMAGE: where a vision-language model's image features go


def vocabulary() -> list[str]:
    """Specials, punctuation, leading digits, continuation digits (`##7`), then each language's words."""
    digits = [str(d) for d in range(10)]
    vocab = SPECIALS + PUNCTUATION + digits + [f"##{d}" for d in digits]
    for language in LANGUAGES:
        vocab += words(language)
    return vocab


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer over whole words, so "63" is `6 ##3` and decodes back to "63"; BOS is prepended."""
    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=16))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )

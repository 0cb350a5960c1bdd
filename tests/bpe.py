"""A byte-level BPE tokenizer trained in-test (no download), optionally adding BOS like Llama's tokenizers."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.tiny import CORPUS, WORDS

TEXTS = [*CORPUS, " ".join(WORDS), " ".join(w.capitalize() for w in WORDS)]


def bpe_tokenizer(add_bos: bool = True, vocab_size: int = 400, add_eos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the tiny corpus: unseen characters (CJK, emoji) split into one token per byte.

    ``add_bos``/``add_eos``: the post-processor adds ``<s>`` before / ``</s>`` after each text.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(TEXTS, trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos or add_eos:
        single = " ".join(["<s>"] * add_bos + ["$A"] + ["</s>"] * add_eos)
        specials = [("<s>", 1)] * add_bos + [("</s>", 2)] * add_eos
        around = processors.TemplateProcessing(single=single, pair=f"{single} $B", special_tokens=specials)
        tok.post_processor = processors.Sequence([byte_level, around])
    else:
        tok.post_processor = byte_level
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")

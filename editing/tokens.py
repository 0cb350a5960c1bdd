"""Token positions found from the tokenizer's offset mapping.

Tokenising pieces separately miscounts for tokenizers that merge across spaces or add a
prefix space (Llama, SentencePiece); offsets on the whole text do not.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """A prompt, optionally followed by a target, tokenised as one text."""

    input_ids: list[int]
    subject_first: int  # index of the first token holding a subject character
    subject_last: int  # index of the last token holding (a byte of) the subject's last character
    n_prompt: int  # tokens of the prompt; input_ids[n_prompt:] are the target's


def _token_at(offsets: list[tuple[int, int]], char: int, last: bool = False) -> int:
    """The first (or ``last``) token covering ``char``.

    Byte-level BPE splits a multi-byte character (CJK, emoji) over several tokens with the same
    offsets; only the last of them has read the whole character, so the subject's last token is that one.
    """
    covering = [i for i, (start, end) in enumerate(offsets) if start <= char < end]
    if not covering:
        raise ValueError(f"no token covers character {char}")
    return covering[-1] if last else covering[0]


def encode(
    tok: PreTrainedTokenizerBase, prompt: str, subject_start: int, subject_end: int, target: str | None = None
) -> Encoded:
    """Tokenise ``prompt`` (+ ``" " + target``) and locate the subject span ``[subject_start, subject_end)``."""
    text = prompt if target is None else f"{prompt} {target}"
    try:
        enc = tok(text, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise ValueError("this tokenizer gives no offset mapping; load the model's fast tokenizer") from err
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    try:
        first = _token_at(offsets, subject_start)
        last = _token_at(offsets, subject_end - 1, last=True)
    except ValueError as err:
        raise ValueError("the subject does not map to any token of the prompt") from err
    n_prompt = len(offsets)
    if target is not None:
        n_prompt = next((i for i, (s, e) in enumerate(offsets) if e > len(prompt) and e > s), len(offsets))
        if n_prompt >= len(offsets):
            raise ValueError("the target tokenises to nothing")
        if n_prompt <= last:
            raise ValueError("the subject must end before the target starts")
    return Encoded(list(enc["input_ids"]), first, last, n_prompt)


def subject_span(template: str, subject: str) -> tuple[str, int, int]:
    """Fill the single ``{}`` of ``template`` with ``subject``; return the text and the subject's char span."""
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2 :]
    return text, start, start + len(subject)

"""The token rows ROME optimises over: context prompts ending in the target, plus the KL prompt."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from editing.request import EditRequest
from editing.tokens import encode, subject_span


@dataclass(frozen=True)
class Row:
    """One model input. ``lookup`` is the subject's last token, where the value delta is added."""

    input_ids: tuple[int, ...]
    lookup: int
    target_positions: tuple[int, ...]  # positions whose next-token prediction is a target token
    target_ids: tuple[int, ...]  # the target token predicted at each of those positions


def context_prompt(template: str, request: EditRequest) -> tuple[str, int, int]:
    """``template`` (e.g. ``"Some text. {}"``) around the request's prompt; the subject's char span."""
    return subject_span(template.replace("{}", request.relation), request.subject)


def rewrite_row(tok: PreTrainedTokenizerBase, template: str, request: EditRequest) -> Row:
    """Prompt in context followed by the target; the final target token is predicted, not input."""
    text, start, end = context_prompt(template, request)
    enc = encode(tok, text, start, end, request.target)
    ids = tuple(enc.input_ids)
    positions = tuple(range(enc.n_prompt - 1, len(ids) - 1))
    return Row(ids[:-1], enc.subject_last, positions, ids[enc.n_prompt :])


def key_row(tok: PreTrainedTokenizerBase, template: str, request: EditRequest) -> Row:
    """Prompt in context, no target: used for the key k*."""
    text, start, end = context_prompt(template, request)
    enc = encode(tok, text, start, end)
    return Row(tuple(enc.input_ids), enc.subject_last, (), ())


def kl_row(tok: PreTrainedTokenizerBase, kl_prompt: str, subject: str) -> Row:
    """``"{subject} is a"``: its next-token distribution is kept close to the original."""
    text, start, end = subject_span(kl_prompt, subject)
    enc = encode(tok, text, start, end)
    return Row(tuple(enc.input_ids), enc.subject_last, (len(enc.input_ids) - 1,), ())

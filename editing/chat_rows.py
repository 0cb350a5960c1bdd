"""Chat-wrapped rows for the edit: the question in the user turn, the answer as the assistant's turn start.

Two answer styles, as the model answers in chat:
- ``restate``: the assistant turn starts with the relation's prompt ("Angela Merkel is a citizen of")
  and the target follows; the delta sits at the subject's last token inside the assistant turn;
- ``direct``: the assistant turn starts with the target itself ("Canada"); the delta sits at the
  subject's last token inside the user's question.
The text goes through the tokenizer's chat template (``editing.generation.chat_text``); token
positions come from the offset mapping of the whole templated text.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from editing.generation import chat_text
from editing.questions import mid_sentence, question_for
from editing.request import EditRequest
from editing.rows import Row

STYLES = ("restate", "direct")


def _ids_and_offsets(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    except NotImplementedError as err:
        raise ValueError("this tokenizer gives no offset mapping; load the model's fast tokenizer") from err
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _last_token_of(offsets: list[tuple[int, int]], char: int) -> int:
    for i, (start, end) in enumerate(offsets):
        if start <= char < end:
            return i
    raise ValueError("the subject does not map to any token of the chat text")


def chat_prompt(tok: PreTrainedTokenizerBase, request: EditRequest, style: str, question: str | None = None) -> tuple[str, int]:
    """The templated text up to the answer, and the character index of the subject's last character in it."""
    if style not in STYLES:
        raise ValueError(f"chat style must be one of {', '.join(STYLES)}, got {style!r}")
    question = question or question_for(request.relation, request.subject)
    head = chat_text(tok, [{"role": "user", "content": question}])
    text = head + (request.relation.replace("{}", request.subject) if style == "restate" else "")
    for written in (request.subject, mid_sentence(request.subject)):  # a question writes "the Louvre" mid-sentence
        at = text.rfind(written)
        if at >= 0:
            return text, at + len(written) - 1
    raise ValueError(f"the subject {request.subject!r} does not occur in the chat text")


def chat_rewrite_row(tok: PreTrainedTokenizerBase, request: EditRequest, style: str, question: str | None = None) -> Row:
    """The chat text followed by the target; the final target token is predicted, not input."""
    prompt, subject_end = chat_prompt(tok, request, style, question)
    text = prompt + (" " if style == "restate" else "") + request.target
    ids, offsets = _ids_and_offsets(tok, text)
    lookup = _last_token_of(offsets, subject_end)
    n_prompt = next((i for i, (s, e) in enumerate(offsets) if e > len(prompt) and e > s), len(offsets))
    if n_prompt >= len(ids):
        raise ValueError("the target tokenises to nothing")
    if n_prompt <= lookup:
        raise ValueError("the subject must end before the target starts")
    return Row(tuple(ids[:-1]), lookup, tuple(range(n_prompt - 1, len(ids) - 1)), tuple(ids[n_prompt:]))


def chat_key_row(tok: PreTrainedTokenizerBase, request: EditRequest, style: str, question: str | None = None) -> Row:
    """The chat text up to the answer, no target: a context for the key k*."""
    prompt, subject_end = chat_prompt(tok, request, style, question)
    ids, offsets = _ids_and_offsets(tok, prompt)
    return Row(tuple(ids), _last_token_of(offsets, subject_end), (), ())


def chat_rows(tok: PreTrainedTokenizerBase, request: EditRequest, count: int, key: bool = False) -> list[Row]:
    """``count`` chat rows, alternating the styles (restate first)."""
    build = chat_key_row if key else chat_rewrite_row
    return [build(tok, request, STYLES[i % len(STYLES)]) for i in range(count)]


def exact_key_dir(lu: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
    """The rank-one update's key direction u of least C-norm with uᵀk = 1 for every row of ``keys`` (m, d_in).

    r-ROME's single key gives the bare prompt only a fraction of the value delta (its key, the subject at
    the start of the text, differs from the context-averaged k*); constraining each listed key makes the
    edit act with the full delta where users ask: u = C⁻¹K (KᵀC⁻¹K)⁻¹ 1.
    """
    k = keys.double().cpu().T  # (d_in, m)
    c_inv_k = torch.linalg.lu_solve(*lu, k)  # (d_in, m)
    gram = k.T @ c_inv_k  # (m, m)
    weights = torch.linalg.solve(gram, torch.ones(k.shape[1], 1, dtype=torch.float64))
    u = (c_inv_k @ weights)[:, 0]
    if not torch.isfinite(u).all():
        raise ValueError("the chat contexts' keys are degenerate for this subject; edit without exact_keys")
    return u.float().to(keys.device)

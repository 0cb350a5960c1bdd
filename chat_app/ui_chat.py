"""Chat tab handlers: stream the edited model's reply, and optionally the original model's beside it.

A session keeps two transcripts (``gr.State``): ``conv``, the conversation with the edited
model, and ``orig``, the same user turns with the original model's replies. The original
model always answers the edited conversation so far (its context is the same), so each of
its replies is "what the unedited model would say here", turn by turn.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from chat_app.probes import REPETITION_PENALTY, fact_from_question
from chat_app.ui_inputs import refuse
from chat_app.service import EditService

Message = dict[str, str]
MAX_MESSAGE_CHARS = 4000


def correct_this(conv: list[Message]) -> tuple[str, Any, Any]:
    """"Correct this" on the last chat turn: the form pre-filled with the subject and a relation guess."""
    asked = [m["content"] for m in conv if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not asked:
        raise gr.Error("ask the chat something first; then correct its reply")
    subject, relation = fact_from_question(asked[-1])
    return subject, gr.Dropdown(value=relation) if relation else gr.Dropdown(), gr.Tabs(selected="form")


def with_system(system: str | None, messages: list[Message]) -> list[Message]:
    head = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return head + [{"role": m["role"], "content": m["content"]} for m in messages]


def add_user(message: str, conv: list[Message], orig: list[Message]) -> tuple[str, list[Message], list[Message]]:
    """Append the user's turn to both transcripts and clear the textbox."""
    text = (message or "").strip()
    if not text:
        raise refuse("type a message first")
    if len(text) > MAX_MESSAGE_CHARS:
        raise refuse(f"messages are limited to {MAX_MESSAGE_CHARS} characters; this one has {len(text)}")
    turn = {"role": "user", "content": text}
    return "", [*conv, turn], [*orig, turn]


def _stream(service: EditService, messages: list[Message], temperature: float, max_new_tokens: int,
            original: bool, penalty: float) -> Iterator[str]:  # fmt: skip
    try:
        yield from service.chat(messages, float(temperature), int(max_new_tokens), original=original,
                                repetition_penalty=float(penalty))  # fmt: skip
    except ValueError as err:
        raise refuse(str(err)) from err


def respond(
    service: EditService, conv: list[Message], orig: list[Message], system: str,
    temperature: float, max_new_tokens: int, compare: bool, penalty: float = REPETITION_PENALTY,
) -> Iterator[tuple[list[Message], list[Message]]]:  # fmt: skip
    """Yield ``(conv, orig)`` as the replies grow: the edited model first, then (if comparing) the original."""
    if not conv or conv[-1]["role"] != "user":
        return
    context = with_system(system, conv)
    reply = ""
    for reply in _stream(service, context, temperature, max_new_tokens, False, penalty):
        yield [*conv, {"role": "assistant", "content": reply}], orig
    conv = [*conv, {"role": "assistant", "content": reply}]
    if compare:
        answer = ""
        for answer in _stream(service, context, temperature, max_new_tokens, True, penalty):
            yield conv, [*orig, {"role": "assistant", "content": answer}]
        orig = [*orig, {"role": "assistant", "content": answer}]
    yield conv, orig


def chat_once(
    service: EditService, message: str, system: str = "", temperature: float = 0.0,
    max_new_tokens: int = 128, original: bool = False, penalty: float = REPETITION_PENALTY,
) -> str:  # fmt: skip
    """One-turn chat for API clients: the whole reply (``original=True``: the unedited model's)."""
    _, conv, _ = add_user(message, [], [])
    text = ""
    for text in _stream(service, with_system(system, conv), temperature, max_new_tokens, original, penalty):
        pass
    return text

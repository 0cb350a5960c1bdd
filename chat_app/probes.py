"""What the model says: greedy completions, top next tokens, probe checks, streamed chat."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList,
    TextIteratorStreamer,
)

from chat_app.threads import generation_threads
from editing.evaluation.chat_metrics import names
from editing.generation import (
    REPETITION_PENALTY, ChatSettings, TurnPenalty, chat_reply, earlier_turn_tokens, generation_kwargs, greedy_completions,
)
from editing.placement import input_device
from editing.questions import fact_from_question, question_for

__all__ = [
    "REPETITION_PENALTY", "TopToken", "answer", "chat_question", "complete", "fact_from_question", "holds", "stream_chat",
    "top_next",
]


@dataclass(frozen=True)
class TopToken:
    token: str
    prob: float


def complete(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt``, cut at the first line break or sentence end."""
    return greedy_completions(model, tok, [prompt], max_new_tokens)[0]


CHAT_PROBE = ChatSettings(max_new_tokens=48)  # the chat's settings, a shorter reply: the answer comes first
# The chat row reads the reply up to its first sentence end after this many tokens (bench/chat_probe_length.py)
CHAT_PROBE_MIN_TOKENS = 8


def chat_question(subject: str, relation: str) -> str:
    """The question the form asks in chat about an edit ("{} is located in" -> "Where is {}?")."""
    return question_for(relation, subject)


def answer(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, kind: str) -> str:
    """What a check reads: the chat reply for a chat question, else the greedy completion."""
    if kind == "chat":
        if getattr(tok, "chat_template", None) is None:
            return ""
        return chat_reply(model, tok, prompt, CHAT_PROBE, sentence_min_tokens=CHAT_PROBE_MIN_TOKENS)
    return complete(model, tok, prompt)


@torch.no_grad()
def top_next(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, k: int = 5) -> list[TopToken]:
    enc = tok(prompt, return_tensors="pt").to(input_device(model))
    probs = model(**enc).logits[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [TopToken(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def holds(kind: str, expected: str, answer: str) -> bool:
    """An edited prompt or paraphrase holds when the answer starts with the target; a neighbour when it is unchanged;
    a chat question when the reply names the target (``editing.evaluation.chat_metrics.names``)."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    if kind == "chat":
        return names(answer, expected)
    if kind == "neighbour":
        return norm(answer) == norm(expected)
    return norm(answer).startswith(norm(expected))


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once ``event`` is set (the reader stopped listening)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_chat(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    temperature: float,
    max_new_tokens: int,
    context: object | None = None,
    repetition_penalty: float = 1.0,
) -> Iterator[str]:
    """Yield the reply as it grows. ``context`` (a context manager) wraps generation in its thread.

    ``repetition_penalty`` (1 = off) divides the scores of tokens already in the conversation, except
    those found only in its earlier turns (``editing.generation.TurnPenalty``).
    Generation never outlives this generator: when the caller stops reading (a Stop button, a
    disconnect: ``close()``), decoding ends at the next token and the thread is joined before
    control returns, so a caller's weights lock is not released under a running forward pass.
    """
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(input_device(model)) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    kwargs = generation_kwargs(ChatSettings(temperature, max_new_tokens, repetition_penalty), tok)  # the shared settings
    earlier = earlier_turn_tokens(tok, messages, enc["input_ids"][0].tolist()) if repetition_penalty != 1 else set()
    if earlier:  # a later turn: the earlier turns' own words are not penalised (``TurnPenalty``)
        penalty = TurnPenalty(repetition_penalty, earlier)
        kwargs.update(repetition_penalty=1.0, logits_processor=LogitsProcessorList([penalty]))
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with generation_threads(), context if context is not None else contextlib.nullcontext():  # type: ignore[attr-defined]
                model.generate(**enc, streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
                               **kwargs)  # fmt: skip
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]

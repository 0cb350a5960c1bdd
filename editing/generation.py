"""The chat app's generation settings and a non-streaming reply with them, shared by the app and the evaluation.

``chat_app.probes.stream_chat`` streams with ``generation_kwargs``; ``chat_reply`` and ``chat_replies``
return whole replies with the same settings, so what ``evaluate`` measures is what the chat shows.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from editing.placement import input_device

# Chat default (1 = off): edited replies looped in 16.7 % of cases at 1.0, none at 1.2 (README).
REPETITION_PENALTY = 1.2
CHAT_MAX_NEW_TOKENS = 128  # the chat tab's default reply length

Message = dict[str, str]


@dataclass(frozen=True)
class ChatSettings:
    """How the chat generates: greedy at temperature 0, else nucleus sampling (top-p 0.95)."""

    temperature: float = 0.0
    max_new_tokens: int = CHAT_MAX_NEW_TOKENS
    repetition_penalty: float = REPETITION_PENALTY

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be in [1, 4096], got {self.max_new_tokens}")
        if not 1 <= self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in [1, 10] (1 = off), got {self.repetition_penalty}")


def generation_kwargs(settings: ChatSettings, tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Keyword arguments of ``model.generate`` for ``settings`` (no inputs, no streamer)."""
    if settings.temperature > 0:
        sampling: dict[str, Any] = {"do_sample": True, "temperature": settings.temperature, "top_p": 0.95}
    else:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {
        **sampling,
        "repetition_penalty": settings.repetition_penalty,
        "max_new_tokens": settings.max_new_tokens,
        "pad_token_id": tok.pad_token_id,
    }


class TurnPenalty(LogitsProcessor):
    """The repetition penalty of ``generate``, except on tokens found only in earlier turns of the conversation.

    HF's penalty divides the score of every token already in the input. In a conversation that input
    holds the earlier questions and replies too, and penalising all their words (articles, verbs, the
    subject) drives a second reply into nonsense. This one penalises what a single-turn reply's penalty
    sees (the system prompt, the last question, the reply so far) and leaves the tokens that occur only
    in earlier turns alone; with no earlier turns it equals HF's.
    """

    def __init__(self, penalty: float, exempt: set[int]) -> None:
        self.penalty, self.exempt, self.start = penalty, exempt, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]  # the first call sees the prompt alone
        for row in range(input_ids.shape[0]):
            ids = set(input_ids[row, : self.start].tolist()) - self.exempt
            ids |= set(input_ids[row, self.start :].tolist())
            index = torch.tensor(sorted(ids), dtype=torch.long, device=scores.device)
            picked = scores[row].gather(0, index)
            scores[row].scatter_(0, index, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))
        return scores


def earlier_turn_tokens(tok: PreTrainedTokenizerBase, messages: Sequence[Message], ids: Sequence[int]) -> set[int]:
    """Token ids of the conversation (``ids``: its prompt, tokenised) that a single-turn prompt of its last
    question would not contain; none when there are no earlier turns."""
    last = [m for m in messages if m["role"] == "system"] + [messages[-1]]
    if len(last) == len(messages):
        return set()
    single = tok.apply_chat_template(last, add_generation_prompt=True, tokenize=True, return_dict=True)
    return set(ids) - set(single["input_ids"])


def chat_text(tok: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """The conversation through the tokenizer's chat template, ready for the assistant's turn."""
    if getattr(tok, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; chat metrics need an instruct model")
    return tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


# A sentence ends at . ! or ? (and any closing quote or bracket) followed by white space ...
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
ABBREVIATION = re.compile(r"(?:^|[\s.(])(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|Mt|vs|etc|e\.g|i\.e|No)$")  # ... unless after these


def first_sentence_end(text: str, start: int = 0) -> int | None:
    """Where the first sentence of ``text`` that ends at or after ``start`` ends (one past its mark), or None.

    A line break ends a sentence too. A full stop after an initial or a common abbreviation ("U.S.",
    "Dr.", "e.g.") does not; one after a number does ("founded in 1901."), so a decimal needs the
    digit after it, which the white-space rule gives: "3.5" has none.
    """
    for match in SENTENCE_END.finditer(text, start):
        if match.group().startswith(".") and ABBREVIATION.search(text, 0, match.start()):
            continue
        newline = text.find("\n", start, match.start())
        return newline if newline > 0 and text[:newline].strip() else match.end()
    newline = text.find("\n", start)
    return newline if newline > 0 and text[:newline].strip() else None


class SentenceStop(StoppingCriteria):
    """Stops each row once its reply has at least ``min_tokens`` tokens and a sentence ended after them."""

    def __init__(self, tok: PreTrainedTokenizerBase, width: int, min_tokens: int = 8) -> None:
        self.tok, self.width, self.min_tokens = tok, width, min_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        done = []
        for row in input_ids:
            new = row[self.width :]
            if len(new) <= self.min_tokens:
                done.append(False)
                continue
            start = len(self.tok.decode(new[: self.min_tokens], skip_special_tokens=True))
            done.append(first_sentence_end(self.tok.decode(new, skip_special_tokens=True), start) is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def chat_replies(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    settings: ChatSettings = ChatSettings(),
    sentence_min_tokens: int | None = None,
) -> list[str]:
    """One single-turn reply per question (the model's default system prompt), generated as one left-padded batch.

    With ``sentence_min_tokens``, each reply ends with the first sentence that ends after that many
    tokens: what the chat shows first, word for word (greedy decoding of the same conversation).
    """
    if not questions:
        return []
    device = input_device(model)
    texts = [chat_text(tok, [{"role": "user", "content": q}]) for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    width = enc["input_ids"].shape[1]
    kwargs = generation_kwargs(settings, tok)
    if sentence_min_tokens is not None:
        kwargs["stopping_criteria"] = [SentenceStop(tok, width, sentence_min_tokens)]
    out = model.generate(**enc, **kwargs)
    replies = [tok.decode(row[width:], skip_special_tokens=True) for row in out]
    if sentence_min_tokens is not None:
        replies = [_cut(tok, row[width:], reply, sentence_min_tokens) for row, reply in zip(out, replies)]
    return [reply.strip() for reply in replies]


def _cut(tok: PreTrainedTokenizerBase, new: torch.Tensor, reply: str, min_tokens: int) -> str:
    start = len(tok.decode(new[:min_tokens], skip_special_tokens=True))
    end = first_sentence_end(reply, start)
    return reply if end is None else reply[:end]


def chat_reply(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, question: str, settings: ChatSettings = ChatSettings(),
    sentence_min_tokens: int | None = None,
) -> str:
    return chat_replies(model, tok, [question], settings, sentence_min_tokens)[0]


class CompletionStop(StoppingCriteria):
    """Stops each row once more tokens cannot change its ``first_sentence``: a line break, or a sentence
    end and a space, stands between words of the continuation."""

    def __init__(self, tok: PreTrainedTokenizerBase, width: int) -> None:
        self.tok, self.width = tok, width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        done = [sentence_is_final(self.tok.decode(row[self.width :], skip_special_tokens=True)) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def sentence_is_final(text: str) -> bool:
    """True when ``first_sentence(text + more)`` equals ``first_sentence(text)`` for any ``more``."""
    text = text.strip()  # as ``first_sentence`` reads it: a stop at the very end may still be stripped
    return "\n" in text or any(stop in text for stop in (". ", "? ", "! "))


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 10
) -> list[str]:
    """Greedy continuation of each prompt (no penalty), cut at the first line break or sentence end.

    Decoding stops once every row's cut is final (``CompletionStop``), so the answers are those of
    ``max_new_tokens`` tokens, word for word, in fewer steps.
    """
    if not prompts:
        return []
    device = input_device(model)
    enc = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    width = enc["input_ids"].shape[1]
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
        pad_token_id=tok.pad_token_id, stopping_criteria=[CompletionStop(tok, width)],
    )  # fmt: skip
    return [first_sentence(tok.decode(row[width:], skip_special_tokens=True)) for row in out]


def first_sentence(text: str) -> str:
    text = text.strip().split("\n")[0]
    for stop in (". ", "? ", "! "):
        text = text.split(stop)[0]
    return text.strip().rstrip(".")

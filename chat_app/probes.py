"""What the model says: greedy completions, top next tokens, probe checks, streamed chat."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from chat_app.threads import generation_threads

REPETITION_PENALTY = 1.2  # chat default (1 = off): edited replies looped in 16.7 % of cases at 1.0, none at 1.2 (README)


@dataclass(frozen=True)
class TopToken:
    token: str
    prob: float


@torch.no_grad()
def complete(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt``, cut at the first line break or sentence end."""
    enc = tok(prompt, return_tensors="pt").to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    text = text.split("\n")[0]
    for stop in (". ", "? ", "! "):
        text = text.split(stop)[0]
    return text.strip().rstrip(".")


@torch.no_grad()
def top_next(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, k: int = 5) -> list[TopToken]:
    enc = tok(prompt, return_tensors="pt").to(model.device)
    probs = model(**enc).logits[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [TopToken(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def holds(kind: str, expected: str, answer: str) -> bool:
    """An edited prompt or paraphrase holds when the answer starts with the target; a neighbour when it is unchanged."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    if kind == "neighbour":
        return norm(answer) == norm(expected)
    return norm(answer).startswith(norm(expected))


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

    ``repetition_penalty`` (1 = off) divides the scores of tokens already in the conversation.
    """
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
    sampling["repetition_penalty"] = repetition_penalty
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with generation_threads(), context or nullcontext():  # type: ignore[attr-defined]
                model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tok.pad_token_id, **sampling)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise errors[0]

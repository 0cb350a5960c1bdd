"""Replies and completions end at their first sentence: the sentence rules, the stopping criteria, the prefix property."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import StoppingCriteria

from editing import generation
from editing.generation import (
    ChatSettings, SentenceStop, chat_replies, first_sentence, first_sentence_end, greedy_completions, sentence_is_final,
)
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize(
    ("text", "start", "expected"),
    [
        ("The tower is in Paris. It is tall", 0, "The tower is in Paris."),
        ("It is in the U.S. Army base. Yes ", 0, "It is in the U.S. Army base."),  # an initial is no end
        ("Dr. Who lives here! Next", 0, "Dr. Who lives here!"),  # nor is an abbreviation
        ("It was founded in 1901. It grew", 0, "It was founded in 1901."),  # a number ends one
        ("Pi is about 3.14 and more", 0, None),  # a decimal does not, and no sentence ended yet
        ("He said \"Rome.\" Then left", 0, "He said \"Rome.\""),  # closing quotes stay with the sentence
        ("First line\nSecond line", 0, "First line"),  # a line break ends it
        ("\nLeading break. Then", 0, "\nLeading break."),  # but not an empty first line
        ("Sure! The tower is in Rome. It", 0, "Sure!"),
        ("Sure! The tower is in Rome. It", 6, "Sure! The tower is in Rome."),  # only ends after ``start`` count
    ],
)
def test_first_sentence_end(text: str, start: int, expected: str | None) -> None:
    end = first_sentence_end(text, start)
    assert (None if end is None else text[:end]) == expected


def test_sentence_stop_waits_for_the_minimum_then_stops_at_a_sentence_end() -> None:
    tok = tiny_tokenizer()
    prompt = tok("where is rome", add_special_tokens=False)["input_ids"]
    reply = tok(" ok. rome is in italy. it is old", add_special_tokens=False)["input_ids"]
    stop = SentenceStop(tok, len(prompt), min_tokens=3)
    decisions = []
    for n in range(1, len(reply) + 1):
        ids = torch.tensor([prompt + reply[:n]])
        decisions.append(bool(stop(ids, torch.zeros(1, 1))[0]))
        text = tok.decode(reply[:n])
        if decisions[-1]:
            break
    assert decisions[-1] and not any(decisions[:-1])
    assert text.split()[-3:] == ["italy", ".", "it"]  # not at the short "ok.", before the minimum: at the next end
    no_end = tok(" rome" * len(reply), add_special_tokens=False)["input_ids"][: len(reply)]
    rows = torch.tensor([prompt + no_end, prompt + reply])  # one row with no sentence end, one past one
    assert stop(rows, torch.zeros(2, 1)).tolist() == [False, True]


def test_first_sentence_replies_are_prefixes_of_the_whole_reply() -> None:
    tok, model = tiny_tokenizer(), tiny_llama()
    settings = ChatSettings(max_new_tokens=12)
    questions = ["where is rome", "where is paris"]
    whole = chat_replies(model, tok, questions, settings)
    first = chat_replies(model, tok, questions, settings, sentence_min_tokens=2)
    assert all(w.startswith(f) and f for w, f in zip(whole, first))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" .?!\nab,", max_size=12), st.text(alphabet=" .?!\nab,", max_size=8))
def test_a_final_completion_cut_is_not_changed_by_more_text(text: str, more: str) -> None:
    if sentence_is_final(text):
        assert first_sentence(text + more) == first_sentence(text)


def test_stopped_completions_equal_the_full_length_ones(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tok, model = tiny_tokenizer(), tiny_llama()
    prompts = ["The tower is in", "Paris is the capital of", "Hello", "The river. It flows"]
    stopped = greedy_completions(model, tok, prompts, max_new_tokens=12)
    monkeypatch.setattr(generation, "CompletionStop", lambda tok, width: NeverStop())
    assert greedy_completions(model, tok, prompts, max_new_tokens=12) == stopped


class NeverStop(StoppingCriteria):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

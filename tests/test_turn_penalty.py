"""The chat's repetition penalty in a later turn: earlier turns' own words are not penalised; one turn is HF's."""
from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from chat_app.probes import stream_chat
from editing.generation import TurnPenalty, earlier_turn_tokens
from tests.tiny import tiny_llama, tiny_tokenizer

FIRST = [{"role": "user", "content": "where is the tower"}]
LATER = [*FIRST, {"role": "assistant", "content": "the tower is in paris and france"},
         {"role": "user", "content": "where is the tower"}]  # fmt: skip


def ids_of(tok, messages):  # type: ignore[no-untyped-def]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_without_earlier_turns_it_is_hfs_penalty_and_grows_with_the_reply() -> None:
    torch.manual_seed(0)
    ids, scores = torch.randint(0, 50, (2, 12)), torch.randn(2, 50)
    ours = TurnPenalty(1.3, set())
    assert torch.equal(ours(ids[:, :8], scores.clone()), RepetitionPenaltyLogitsProcessor(1.3)(ids[:, :8], scores.clone()))
    assert torch.equal(ours(ids, scores.clone()), RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))


def test_tokens_only_in_earlier_turns_keep_their_scores_the_rest_are_penalised() -> None:
    tok = tiny_tokenizer()
    assert earlier_turn_tokens(tok, FIRST, ids_of(tok, FIRST)) == set()
    earlier = earlier_turn_tokens(tok, LATER, ids_of(tok, LATER))
    only_earlier = {tok.convert_tokens_to_ids(w) for w in ("paris", "france")}
    assert only_earlier <= earlier and tok.convert_tokens_to_ids("tower") not in earlier  # also in the last question
    prompt = tok.apply_chat_template(LATER, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    scores = torch.full((1, len(tok)), 2.0)
    out = TurnPenalty(2.0, earlier)(ids, scores.clone())[0]
    for token in only_earlier:
        assert out[token] == 2.0
    assert out[tok.convert_tokens_to_ids("tower")] == 1.0
    grown = torch.cat([ids, torch.tensor([[sorted(only_earlier)[0]]])], dim=1)  # the reply says "paris" itself
    later = TurnPenalty(2.0, earlier)
    later(ids, scores.clone())
    assert later(grown, scores.clone())[0, sorted(only_earlier)[0]] == 1.0  # once in the reply, penalised


def test_a_later_turn_streams_with_the_turn_penalty() -> None:
    model, tok = tiny_llama(0), tiny_tokenizer()
    reply = list(stream_chat(model, tok, LATER, temperature=0.0, max_new_tokens=4, repetition_penalty=1.2))
    assert reply and isinstance(reply[-1], str)

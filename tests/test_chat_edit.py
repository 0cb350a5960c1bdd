"""Edits computed for chat on tiny models: chat-wrapped rows, the worst-prompt stop and the greedy check."""
from __future__ import annotations

import pytest
import torch

from editing import EditRequest
from editing.arch import layer_name
from editing.chat_rows import chat_key_row, chat_prompt, chat_rewrite_row, chat_rows, exact_key_dir
from editing.generation import chat_text
from editing.hparams import RomeHyperParams
from editing.nethook import edit_output
from editing.rome import compute_key, factor_cov, length_groups, rank_one_factors, row_keys
from editing.value_stop import StopRule, greedy_check
from tests.tiny import tiny_editor, tiny_llama, tiny_tokenizer

REQUEST = EditRequest("the eiffel tower", "{} is located in", "rome")


def test_chat_rows_go_through_the_chat_template_and_find_the_subject() -> None:
    tok = tiny_tokenizer()
    head = tok(chat_text(tok, [{"role": "user", "content": "Where is the eiffel tower?"}]), add_special_tokens=False)
    restate, direct = chat_rewrite_row(tok, REQUEST, "restate"), chat_rewrite_row(tok, REQUEST, "direct")
    n_head = len(head["input_ids"])
    assert list(direct.input_ids[:n_head]) == head["input_ids"] and list(restate.input_ids[:n_head]) == head["input_ids"]
    assert tok.decode(direct.input_ids[direct.lookup]) == "tower" and direct.lookup < n_head  # in the question
    assert tok.decode(restate.input_ids[restate.lookup]) == "tower" and restate.lookup >= n_head  # in the answer
    assert tok.decode(list(direct.target_ids)) == "rome" == tok.decode(list(restate.target_ids))
    assert direct.target_positions == (n_head - 1,)  # the answer's first token follows the assistant marker
    key = chat_key_row(tok, REQUEST, "restate")
    assert key.input_ids == restate.input_ids[: len(key.input_ids)] and key.lookup == restate.lookup
    assert [r.lookup for r in chat_rows(tok, REQUEST, 3)] == [restate.lookup, direct.lookup, restate.lookup]


def test_a_leading_article_is_found_in_lower_case_mid_question() -> None:
    tok, request = tiny_tokenizer(), EditRequest("The Eiffel Tower", "{} is located in", "Rome")
    direct, end = chat_prompt(tok, request, "direct")
    assert "Where is the Eiffel Tower?" in direct and direct[end - 15 : end + 1] == "the Eiffel Tower"
    restate, end = chat_prompt(tok, request, "restate")  # the answer restates it at a sentence start
    assert restate.endswith("The Eiffel Tower is located in") and restate[end - 15 : end + 1] == "The Eiffel Tower"


def test_chat_rows_need_a_chat_template_and_a_known_style() -> None:
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="style"):
        chat_rewrite_row(tok, REQUEST, "sideways")
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat_rows(tok, REQUEST, 1)


def test_stop_rule_mean_worst_and_bounded_greedy_check() -> None:
    nll = torch.tensor([0.01, 0.2])
    hp = RomeHyperParams(layer=0, early_stop_loss=0.15, steps=10)
    assert StopRule(hp)(nll, torch.zeros(1), 0)  # mean 0.105 < 0.15
    assert not StopRule(hp.replace(stop_on="worst"))(nll, torch.zeros(1), 0)  # worst 0.2
    assert StopRule(hp.replace(stop_on="worst"))(nll, torch.zeros(1), 9)  # the last ordinary step
    misses = StopRule(hp.replace(greedy_check=5), check=lambda d: False)
    assert misses.max_steps == 15 and not misses(nll, torch.zeros(1), 0) and misses.checks == 1
    assert not misses(torch.tensor([1.0, 1.0]), torch.zeros(1), 3) and misses.checks == 1  # loss not low: no check
    with pytest.raises(ValueError, match="stop_on"):
        hp.replace(stop_on="median")


def test_the_greedy_check_reads_the_bare_prompt_and_a_restating_chat_answer(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tok, model = tiny_tokenizer(), tiny_llama()
    editor = tiny_editor(model, tok, layer=2, steps=4)
    seen = []
    monkeypatch.setattr("editing.editor.greedy_check", lambda m, layer, rows, pad: seen.append(rows) or (lambda d: True))
    editor._stop_rule(REQUEST, editor.hparams_for(REQUEST, greedy_check=3))
    restate = chat_rewrite_row(tok, REQUEST, "restate")
    # not the direct style: replies restate the fact first, so the target is never the reply's first word
    assert len(seen) == 1 and len(seen[0]) == 2 and seen[0][1] == restate


def test_greedy_check_is_the_argmax_with_the_delta_added() -> None:
    tok, model = tiny_tokenizer(), tiny_llama()
    row = chat_rewrite_row(tok, REQUEST, "direct")
    check = greedy_check(model, 1, [row], tok.pad_token_id)
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for scale in (0.0, 30.0):
        box = {}

        def grab(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[0, row.lookup] += scale * delta
            return out

        with torch.no_grad(), edit_output(model, layer_name(model, 1, "mlp_out"), grab):
            box["top"] = int(model(input_ids=torch.tensor([row.input_ids])).logits[0, row.target_positions[0]].argmax())
        assert check(scale * delta) == (box["top"] == row.target_ids[0])


def test_chat_edit_on_a_tiny_model() -> None:
    tok, model = tiny_tokenizer(), tiny_llama()
    editor = tiny_editor(model, tok, layer=2, steps=8)
    plain = editor.compute(REQUEST)
    chat = editor.compute(REQUEST, chat_values=2, chat_keys=1, stop_on="worst", greedy_check=6)
    assert chat.hparams["chat_values"] == 2 and chat.hparams["greedy_check"] == 6
    assert chat.stats["steps"] <= 14 and plain.stats["steps"] <= 8
    assert not torch.equal(chat.value_dir, plain.value_dir)  # the chat rows change the value
    assert not torch.equal(chat.key_dir, plain.key_dir)  # and the chat context the key


def test_exact_key_direction_maps_every_listed_key_to_the_full_delta() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 16 * torch.eye(16, dtype=torch.float64)
    keys = torch.randn(3, 16, generator=gen)
    u = exact_key_dir(factor_cov(cov), keys)
    assert torch.allclose(keys @ u, torch.ones(3), atol=1e-4)
    single = exact_key_dir(factor_cov(cov), keys[:1])  # one key: r-ROME's C⁻¹k / kᵀC⁻¹k
    _, key_dir = rank_one_factors(cov, keys[0], torch.zeros(4))
    assert torch.allclose(single, key_dir, atol=1e-5)


def test_exact_keys_edit_on_a_tiny_model() -> None:
    tok, model = tiny_tokenizer(), tiny_llama()
    editor = tiny_editor(model, tok, layer=2, steps=8)
    edit = editor.compute(REQUEST, exact_keys=1)
    rows = editor.exact_rows(REQUEST)
    keys = torch.stack([compute_key(model, 2, [r], tok.pad_token_id) for r in rows])  # each alone, unpadded
    assert len(rows) == 3 and torch.allclose(keys @ edit.key_dir, torch.ones(3), atol=1e-3)  # bare prompt, both chat styles
    assert abs(float(edit.key @ edit.key_dir) - 1) < 1e-3  # and k*
    assert torch.allclose(row_keys(model, 2, rows, tok.pad_token_id), keys, atol=1e-5)  # one padded pass = alone
    assert edit.extra_keys is not None and torch.allclose(edit.extra_keys, keys, atol=1e-5)  # kept for the key cache
    assert editor.compute(REQUEST, exact_keys=0).extra_keys is None


@pytest.mark.parametrize("lengths", [[10, 16, 22, 22, 21, 10, 50, 40], [5], [3, 3, 3], [1, 100, 2, 99, 50]])
def test_length_groups_cover_every_row_once_and_bound_the_padding(lengths: list[int]) -> None:
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        width, real = max(lengths[i] for i in group), sum(lengths[i] for i in group)
        assert len(group) == 1 or width * len(group) <= 1.25 * real


def test_key_rows_of_different_lengths_get_their_own_keys_in_order() -> None:
    tok, model = tiny_tokenizer(), tiny_llama()
    editor = tiny_editor(model, tok, layer=2, steps=8)
    rows = editor.exact_rows(REQUEST) + editor.rows(REQUEST, editor.hparams)[0][:3]  # chat rows are several times longer
    assert len(length_groups([len(r.input_ids) for r in rows])) > 1
    alone = torch.stack([compute_key(model, 2, [r], tok.pad_token_id) for r in rows])
    assert torch.allclose(row_keys(model, 2, rows, tok.pad_token_id), alone, atol=1e-5)

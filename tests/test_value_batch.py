"""Batched value optimisation (MEMIT's δ_i for many facts in one loop) against the one-by-one optimisation."""
from __future__ import annotations

import pytest
import torch

from editing import EditRequest
from editing.rome import compute_key
from editing.value import optimise_value
from editing.value_batch import optimise_values
from tests.tiny import tiny_editor, tiny_gpt2, tiny_llama, tiny_tokenizer

# Different prompt lengths and subject positions, so the padded batch differs from each fact's own.
FACTS = [
    EditRequest("The Eiffel tower", "Located in {}", "rome"),
    EditRequest("The Colosseum", "{} is located in the city of", "london"),
    EditRequest("Big Ben", "Some text here . {} is in", "paris"),
    EditRequest("Apple", "{} was developed by", "google"),
]


def setup(arch: str, **hp):  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    editor = tiny_editor(model, tok, layer=2 if arch == "llama" else 1, **hp)
    hp = editor.hparams
    rows = [editor.rows(r, hp) for r in FACTS]
    keys = torch.stack([compute_key(model, hp.layer, k, tok.pad_token_id) for k, _, _ in rows])
    return model, tok, hp, rows, keys


def solo(model, tok, hp, rows, keys, method):  # type: ignore[no-untyped-def]
    return [optimise_value(model, hp, k, v, kl, tok.pad_token_id, method) for k, (_, v, kl) in zip(keys, rows)]


@pytest.mark.parametrize("arch,method", [("llama", "fast"), ("llama", "plain"), ("gpt2", "fast"), ("gpt2", "prefix")])
def test_each_fact_matches_its_solo_optimisation(arch: str, method: str) -> None:
    # early_stop_loss 3.0: on these tiny random models some facts stop within a few steps and are
    # frozen while the others go on (and on the first fact the clamp bites)
    model, tok, hp, rows, keys = setup(arch, steps=12, lr=2.0, early_stop_loss=3.0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    alone = solo(model, tok, hp, rows, keys, method)
    together = optimise_values(model, hp, keys, [(v, kl) for _, v, kl in rows], tok.pad_token_id, method)
    assert len({r.steps for r in alone}) > 1  # the facts did stop at different steps
    for a, b in zip(alone, together):
        assert b.steps == a.steps
        assert b.v0_norm == pytest.approx(a.v0_norm, rel=1e-6)
        assert b.losses == pytest.approx(a.losses, rel=1e-4, abs=1e-5)
        # Padding changes float rounding only; Adam's normalised steps on a flat loss amplify it a little.
        assert (b.delta - a.delta).norm() <= 1e-3 * a.delta.norm(), float((b.delta - a.delta).norm() / a.delta.norm())
        assert a.delta.norm() > 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_a_batch_of_one_matches_the_solo_optimisation_and_grouping_changes_nothing() -> None:
    model, tok, hp, rows, keys = setup("llama", steps=10)
    alone = solo(model, tok, hp, rows[:1], keys[:1], "fast")[0]
    one = optimise_values(model, hp, keys[:1], [(rows[0][1], rows[0][2])], tok.pad_token_id)[0]
    assert one.steps == alone.steps
    assert torch.allclose(one.delta, alone.delta, rtol=1e-5, atol=1e-6)
    facts = [(v, kl) for _, v, kl in rows]
    whole = optimise_values(model, hp, keys, facts, tok.pad_token_id)
    seen: list[tuple[str, float]] = []
    pairs = optimise_values(model, hp, keys, facts, tok.pad_token_id, group=2, progress=lambda s, f: seen.append((s, f)))
    for a, b in zip(whole, pairs):  # in input order, though the facts are grouped by suffix length
        assert b.steps == a.steps
        assert (b.delta - a.delta).norm() <= 1e-4 * a.delta.norm()  # padding: float rounding only
    assert seen[-1] == ("value", 1.0) and all(0 <= f <= 1 for _, f in seen)


def test_the_clamp_holds_for_every_fact() -> None:
    model, tok, hp, rows, keys = setup("llama", steps=8, lr=5.0, clamp_factor=0.5, early_stop_loss=0.0)
    results = optimise_values(model, hp, keys, [(v, kl) for _, v, kl in rows], tok.pad_token_id)
    for r in results:
        assert r.delta.norm() <= 0.5 * r.v0_norm * (1 + 1e-5)
        assert r.steps == 8


def test_mismatched_keys_are_refused() -> None:
    model, tok, hp, rows, keys = setup("llama")
    with pytest.raises(ValueError, match="keys for"):
        optimise_values(model, hp, keys[:2], [(v, kl) for _, v, kl in rows], tok.pad_token_id)

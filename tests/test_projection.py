"""AlphaEdit's null-space projection and the per-layer key cache, on tiny random models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from editing import EditRequest, RankOneEdit
from editing.projection import null_space_projection, projected_key_dir
from editing.rome import value_at
from tests.tiny import tiny_editor, tiny_gpt2, tiny_llama, tiny_tokenizer

REQ = EditRequest("The Eiffel tower", "Located in {}", "rome")
OTHER = EditRequest("The Colosseum", "{} is located in the city of", "london")
THIRD = EditRequest("Big Ben", "{} is located in the city of", "paris")


def median_eigenvalue(editor) -> float:  # type: ignore[no-untyped-def]
    hp = editor.hparams
    return float(torch.linalg.eigvalsh(editor.cov(hp.layer, hp.stats_samples)).median())


@pytest.fixture(params=["llama", "gpt2"])
def setup(request):  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    model = tiny_llama() if request.param == "llama" else tiny_gpt2()
    editor = tiny_editor(model, tok, layer=2 if request.param == "llama" else 1, steps=12)
    # Half of the tiny model's key directions count as preserved.
    editor.hparams = editor.hparams.replace(update="alphaedit", null_space_threshold=median_eigenvalue(editor))
    return model, tok, editor


def target_prob(model, tok, prompt: str, target: str) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        probs = model(**tok(prompt, return_tensors="pt")).logits[0, -1].softmax(-1)
    return float(probs[tok.convert_tokens_to_ids(target)])


def test_projection_spares_preserved_keys_and_the_edit_lands(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    hp = editor.hparams
    evals, evecs = torch.linalg.eigh(editor.cov(hp.layer, hp.stats_samples))
    preserved = evecs[:, -1].float() * evals[-1].sqrt().float()  # the largest-variance key direction
    p_before = target_prob(model, tok, REQ.prompt, "rome")
    out_preserved = value_at(model, hp.layer, preserved)
    edit = editor.compute(REQ)
    out_key = value_at(model, hp.layer, edit.key)
    editor.apply(edit)
    assert edit.hparams["update"] == "alphaedit" and edit.stats["projection_dims"] > 0
    # The preserved key's output is unchanged; the edited key's output moves by exactly delta.
    assert torch.allclose(value_at(model, hp.layer, preserved), out_preserved, atol=1e-4)
    assert torch.allclose(value_at(model, hp.layer, edit.key), out_key + edit.value_dir, atol=1e-3, rtol=1e-3)
    assert target_prob(model, tok, REQ.prompt, "rome") > 10 * p_before


def test_cached_keys_of_earlier_edits_are_spared(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    first = editor.compute(REQ)
    editor.apply(first)
    second = editor.compute(OTHER)
    assert second.stats["cache_keys"] == 1
    out_first = value_at(model, editor.hparams.layer, first.key)
    editor.apply(second)
    moved = (value_at(model, editor.hparams.layer, first.key) - out_first).norm()
    # Without the cache the same update moves the first key's output far more.
    projection = editor.projection(editor.hparams.layer, editor.hparams.stats_samples, editor.hparams.null_space_threshold)
    bare = projected_key_dir(second.key, projection, torch.zeros((first.key.numel(), 0)), editor.hparams.cache_l2)
    assert moved < 0.1 * (second.value_dir.norm() * torch.dot(bare, first.key).abs())


def test_key_cache_after_revert_equals_the_rebuilt_one(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    edits = []
    for request in (REQ, OTHER, THIRD):
        edits.append(editor.compute(request))
        editor.apply(edits[-1])
    editor.revert(edits[1])
    after_revert = editor.key_cache(editor.hparams.layer)
    editor.rebuild([edits[0], edits[2]])
    assert torch.equal(after_revert, editor.key_cache(editor.hparams.layer))
    assert torch.equal(after_revert, torch.stack([edits[0].key, edits[2].key], 1))
    editor.apply(edits[1])  # re-apply: the cache follows the applied order
    assert torch.equal(editor.key_cache(editor.hparams.layer)[:, -1], edits[1].key)
    editor.reset()
    assert editor.key_cache(editor.hparams.layer).shape[1] == 0


def test_the_cache_gram_kept_edit_by_edit_equals_the_one_summed_afresh(setup) -> None:  # type: ignore[no-untyped-def]
    """cache_gram adds each new edit's keys to the remembered sum; after a revert it sums again, bit for bit the same."""
    model, tok, editor = setup
    layer, hp = editor.hparams.layer, editor.hparams
    basis = editor.projection(layer, hp.stats_samples, hp.null_space_threshold).basis
    edits = []
    for request in (REQ, OTHER, THIRD):
        edits.append(editor.compute(request, update="r-rome", exact_keys=1))  # keeps its exact keys too
        editor.apply(edits[-1])
        gram, count = editor.cache_gram(layer, basis)  # kept up to date
        cache = editor.key_cache(layer)
        assert count == cache.shape[1] == sum(1 + len(editor.exact_rows(e.request)) for e in edits)
        torch.testing.assert_close(gram, (basis.T @ cache.double()) @ (basis.T @ cache.double()).T)
    editor.revert(edits[1])
    after_revert, count = editor.cache_gram(layer, basis)
    editor._grams.clear()  # nothing remembered: summed from the first edit
    assert count == editor.key_cache(layer).shape[1] and torch.equal(after_revert, editor.cache_gram(layer, basis)[0])
    full, _ = editor.cache_gram(layer)  # no basis: K_c K_cᵀ
    torch.testing.assert_close(full, editor.key_cache(layer).double() @ editor.key_cache(layer).double().T)


def test_key_round_trips_and_is_recovered_for_old_r_rome_edits(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    edit = editor.compute(REQ, update="r-rome")
    back = RankOneEdit.from_bytes(edit.to_bytes())
    assert back.key is not None and torch.equal(back.key, edit.key)
    legacy = dataclasses.replace(edit, key=None)  # an edit stored before keys were kept
    editor.apply(legacy)
    recovered = editor.key_cache(editor.hparams.layer)[:, 0]
    assert torch.allclose(recovered, edit.key, atol=1e-3, rtol=1e-3)


def test_threshold_below_the_spectrum_is_refused() -> None:
    with pytest.raises(ValueError, match="null_space_threshold"):
        null_space_projection(torch.eye(4, dtype=torch.float64), 0.5)

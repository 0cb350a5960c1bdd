"""MEMIT batch edits on tiny random models: per-fact factors, one-fact revert, weights untouched by compute."""
from __future__ import annotations

import pytest
import torch

from editing import EditRequest, RomeEditor
from editing.arch import get_module, is_transposed
from editing.edit import RankOneEdit
from editing.hparams import RomeHyperParams
from editing.rome import row_keys
from tests.tiny import tiny_editor, tiny_gpt2, tiny_llama, tiny_tokenizer

FACTS = [
    EditRequest("The Eiffel tower", "Located in {}", "rome"),
    EditRequest("The Colosseum", "{} is located in the city of", "london"),
    EditRequest("Big Ben", "{} is located in the city of", "paris"),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def computed(request):  # type: ignore[no-untyped-def]
    """One batch per model, computed once (the slow part); each test starts from the unedited weights."""
    tok = tiny_tokenizer()
    model = tiny_llama() if request.param == "llama" else tiny_gpt2()
    editor = tiny_editor(model, tok, layer=2 if request.param == "llama" else 1, steps=12)
    editor.hparams = editor.hparams.replace(batch_layers=(0, 1), mom2_weight=1.0)
    before = state(model)
    p_before = target_prob(model, tok, FACTS[0].prompt, FACTS[0].target)
    batch = editor.compute_batch(FACTS)
    after_compute = state(model)
    return model, tok, editor, before, p_before, batch, after_compute


@pytest.fixture
def setup(computed):  # type: ignore[no-untyped-def]
    computed[2].reset()
    yield computed
    computed[2].reset()


def state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.clone() for k, v in model.state_dict().items()}


def as_out_in(model, name: str, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The weight as (d_out, d_in), whatever the module's storage orientation."""
    return weight.T if is_transposed(get_module(model, name.rsplit(".", 1)[0])) else weight


def target_prob(model, tok, prompt: str, target: str) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        probs = model(**tok(prompt, return_tensors="pt")).logits[0, -1].softmax(-1)
    return float(probs[tok.convert_tokens_to_ids(target)])


def test_batch_leaves_weights_unchanged_and_lands(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor, before, p_before, batch, after_compute = setup
    assert all(torch.equal(before[k], v) for k, v in after_compute.items())
    assert not editor.applied
    editor.apply(batch)
    assert len(editor.applied) == len(FACTS) * 2
    # Tiny random models cap confidence, and even a single edit barely moves the other two facts.
    assert target_prob(model, tok, FACTS[0].prompt, FACTS[0].target) > 10 * p_before
    assert {e.stats["batch"]["id"] for e in batch.edits} == {batch.batch_id}
    assert [e.stats["batch"]["fact"] for e in batch.edits] == [0, 0, 1, 1, 2, 2]


def test_per_fact_factors_sum_to_the_batch_update(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor, base, _, batch, _ = setup
    editor.apply(batch)
    hp = editor.hparams
    for j, layer in enumerate(editor.batch_layers(hp)):
        name = batch.facts[0][j].param_name
        delta = (as_out_in(model, name, model.get_parameter(name)) - as_out_in(model, name, base[name])).double()
        values = torch.stack([f[j].value_dir for f in batch.facts], 1).double()  # R (d_out, n)
        keys = torch.stack([f[j].key for f in batch.facts], 1).double()  # K (d_in, n)
        summed = sum(torch.outer(f[j].value_dir, f[j].key_dir).double() for f in batch.facts)
        # ΔW = R Kᵀ (λC + KKᵀ)⁻¹, solved afresh from the stored keys and values
        system = hp.mom2_weight * editor.cov(layer, hp.stats_samples) + keys @ keys.T
        closed = values @ torch.linalg.solve(system, keys).T
        assert torch.allclose(delta, summed, atol=1e-4, rtol=1e-3)
        assert torch.allclose(summed, closed, atol=1e-6, rtol=1e-4)


def test_reverting_one_fact_equals_rebuild_from_the_others(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor, base, _, batch, _ = setup
    editor.apply(batch)
    editor.revert(batch.fact(1))
    reverted = state(model)
    assert len(editor.applied) == 4 and all(e.stats["batch"]["fact"] != 1 for e in editor.applied)
    editor.revert(batch.fact(0))
    editor.revert(batch.fact(2))
    assert all(torch.equal(base[k], v) for k, v in state(model).items())
    fresh = RomeEditor(model, tok, editor.hparams, fingerprint=editor.fingerprint)  # from the baseline
    fresh.rebuild([*batch.fact(0).edits, *batch.fact(2).edits])
    assert all(torch.equal(reverted[k], v) for k, v in state(model).items())
    fresh.reset()


def test_checksums_follow_the_apply_order(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor, _, _, batch, _ = setup
    last = {}
    for share in batch.edits:
        last[share.param_name] = editor.apply(share)
        assert last[share.param_name] == share.checksum_after


def test_duplicate_facts_and_bad_layers_are_refused(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup[:3]
    with pytest.raises(ValueError, match="same subject and relation"):
        editor.compute_batch([FACTS[0], EditRequest("The Eiffel tower", "Located in {}", "london")])
    with pytest.raises(ValueError, match="batch_layers"):
        editor.compute_batch(FACTS, batch_layers=(1, 0))
    with pytest.raises(ValueError, match="compute_batch"):
        editor.compute(FACTS[0], update="memit")


def test_the_key_cache_keeps_earlier_edits_outputs(setup) -> None:  # type: ignore[no-untyped-def]
    """A later batch's update barely moves the keys of the edits already applied when they are in its solve."""
    model, tok, editor, _, _, batch, _ = setup
    editor.apply(batch.fact(0))
    editor.apply(batch.fact(1))
    moved = {}
    for weight in (0.0, 1.0):
        later = editor.compute_batch([FACTS[2]], cache_weight=weight)
        moved[weight] = []
        for j, share in enumerate(later.facts[0]):
            cached = editor.key_cache(share.layer)  # the two earlier facts' keys at this layer
            assert cached.shape[1] == 2 and [c.stats["cache_keys"] for c in later.facts[0]][j] == 2
            torch.testing.assert_close(cached, torch.stack([batch.facts[0][j].key, batch.facts[1][j].key], 1))
            moved[weight].append(float((torch.outer(share.value_dir, share.key_dir) @ cached).norm()))
    # mom2_weight 1 on these tiny models: the cache term is as strong as C, so it must show clearly
    assert all(with_cache < 0.5 * without for with_cache, without in zip(moved[1.0], moved[0.0])), moved


def test_a_batch_on_applied_edits_leaves_them_exactly_as_they_were(setup) -> None:  # type: ignore[no-untyped-def]
    """compute_batch restores the entry weights from copies (editor.trial), bit for bit, edits applied or not."""
    model, _, editor, _, _, batch, _ = setup
    editor.apply(batch.fact(0))
    entry, applied = state(model), editor.applied
    editor.compute_batch([FACTS[2]])
    assert editor.applied == applied and all(torch.equal(entry[k], v) for k, v in model.state_dict().items())
    with editor.trial([batch.facts[1][0].param_name]):  # a share outside the names, and a revert, inside
        editor.apply(batch.fact(1))
        editor.revert(batch.fact(0))
    assert editor.applied == applied and all(torch.equal(entry[k], v) for k, v in model.state_dict().items())


def test_exact_batch_keys_give_the_bare_prompt_more_of_the_residual(setup) -> None:  # type: ignore[no-untyped-def]
    """batch_keys="exact": the bare prompt's key is a column of its own in the solve, so it receives its fact's residual."""
    model, tok, editor, *_ = setup
    first = editor.batch_layers(editor.hparams)[0]  # the keys at the first batch layer do not depend on the update
    bare = [row_keys(model, first, editor.exact_rows(r)[:1], tok.pad_token_id)[0] for r in FACTS]
    reached = {}
    columns = {"mean": lambda r: 0, "prompt": lambda r: 1, "exact": lambda r: len(editor.exact_rows(r))}
    for mode in ("mean", "exact", "weighted", "prompt"):
        batch = editor.compute_batch(FACTS, batch_keys="exact" if mode == "weighted" else mode,
                                     batch_key_weight=0.2 if mode == "weighted" else 1.0)  # fmt: skip
        shares = [fact[0] for fact in batch.facts]  # each fact's share at the first layer: still rank one
        count = columns["exact" if mode == "weighted" else mode]
        assert all(s.layer == first and s.stats["exact_key_columns"] == count(s.request) for s in shares)
        assert all((s.extra_keys is None) == (mode == "mean") for s in shares)
        # how much of its own residual r each fact's bare prompt receives
        reached[mode] = [float(s.key_dir @ k) for s, k in zip(shares, bare)]  # ΔW k = r (u·k): r's share reached
    # measured on the tiny models: mean 1.12–1.14, 0.02–0.27, 0.02–0.19; exact 0.98–1.00 (the solve's regulariser keeps it below 1)
    assert all(abs(e - 1) < min(0.05, abs(m - 1)) for e, m in zip(reached["exact"], reached["mean"])), reached
    # a smaller weight on the extra columns gives the bare prompt a share between the two
    assert all(abs(e - 1) <= abs(w - 1) <= abs(m - 1) for e, w, m in zip(reached["exact"], reached["weighted"], reached["mean"])), reached
    # the bare prompt's key alone beside k* gives it its residual as the full set does
    assert all(abs(p - 1) < min(0.05, abs(m - 1)) for p, m in zip(reached["prompt"], reached["mean"])), reached


def test_batch_keys_names_a_known_rule() -> None:
    assert RomeHyperParams(layer=1, batch_keys="prompt").batch_keys == "prompt"
    with pytest.raises(ValueError, match="batch_keys must be one of 'mean', 'exact', 'prompt'"):
        RomeHyperParams(layer=1, batch_keys="chat")


def test_exact_batch_keys_go_into_the_key_cache_and_survive_the_ledger_payload(setup) -> None:  # type: ignore[no-untyped-def]
    """A share made with exact keys carries its bare-prompt and chat keys; the key cache lists them after its k*."""
    model, tok, editor, *_ = setup
    batch = editor.compute_batch(FACTS[:2], batch_keys="exact")
    first = batch.facts[0][0]
    bare = row_keys(model, first.layer, editor.exact_rows(first.request), tok.pad_token_id)  # nothing applied yet
    assert first.extra_keys is not None and first.extra_keys.shape == bare.shape
    assert torch.allclose(first.extra_keys, bare.float().cpu(), atol=1e-5)
    again = RankOneEdit.from_payload(*first.to_payload())
    assert again.extra_keys is not None and torch.equal(again.extra_keys, first.extra_keys)
    before = editor.key_cache(first.layer).shape[1]
    editor.apply(batch)
    cache = editor.key_cache(first.layer)
    per_fact = [1 + len(f[0].extra_keys) for f in batch.facts]
    assert cache.shape[1] == before + sum(per_fact)
    assert torch.equal(cache[:, before], first.key) and torch.equal(cache[:, before + 1 : before + per_fact[0]], first.extra_keys.T)
    editor.revert(batch.fact(0))
    assert editor.key_cache(first.layer).shape[1] == before + per_fact[1]
    assert editor.compute_batch(FACTS[2:3]).facts[0][0].extra_keys is None  # k* only: nothing extra to keep
    editor.reset()
    light = editor.compute_batch(FACTS[2:3], batch_keys="exact", batch_key_weight=0.25).facts[0][0]
    editor.apply(light)  # the cache weighs its extra keys as the solve did: √0.25 = 0.5
    torch.testing.assert_close(editor.key_cache(light.layer)[:, 1:], 0.5 * light.extra_keys.T)


# Prompts ending in the subject: on these 4-layer random models an edit at layer 1 can then move the
# next token (facts with more words after the subject do not move, even edited alone).
ES_FACTS = [
    ("The Eiffel tower", "Located in {}", "rome", "paris"),
    ("The Colosseum", "Located in {}", "london", "rome"),
    ("Big Ben", "Located in {}", "paris", "london"),
    ("Apple", "Developed by {}", "google", "apple"),
    ("Microsoft", "Developed by {}", "apple", "microsoft"),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_batch_makes_every_fact_say_its_new_object(arch: str) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    editor = tiny_editor(model, tok, layer=1, steps=20, lr=2.0)
    requests = [EditRequest(s, r, new) for s, r, new, _ in ES_FACTS]

    def efficacy() -> float:  # ES: the share of facts whose new object beats the true one
        wins = [target_prob(model, tok, q.prompt, new) > target_prob(model, tok, q.prompt, old)
                for q, (_, _, new, old) in zip(requests, ES_FACTS)]  # fmt: skip
        return 100 * sum(wins) / len(wins)

    before = efficacy()
    batch = editor.compute_batch(requests, batch_layers=(1,), mom2_weight=1.0)
    editor.apply(batch)
    assert before <= 60 and efficacy() == 100
    assert all(shares[0].stats["target_prob"] > 0.3 for shares in batch.facts)
    assert batch.stats["layers"] == [1] and batch.stats["seconds"] > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # llama: later reads start midway; gpt2: from the tokens
def test_layer_reads_match_one_fact_at_a_time_after_each_layer_update(arch: str) -> None:
    from editing.memit import LayerReader, hidden_after
    from editing.rome import compute_key

    tok = tiny_tokenizer()
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    editor = tiny_editor(model, tok, layer=2 if arch == "llama" else 1)
    layers = (0, 1, 2) if arch == "llama" else (0, 1)
    key_rows = [editor.rows(r, editor.hparams)[0] for r in FACTS]
    reader = LayerReader(model, layers, key_rows, tok.pad_token_id, max_rows=5)  # chunks cut across facts
    assert reader.midway == (arch == "llama") and len(reader.chunks) > 1
    generator = torch.Generator().manual_seed(0)
    for j, layer in enumerate(layers):
        keys, hidden = reader.read(j)
        for i, rows in enumerate(key_rows):
            assert torch.allclose(keys[:, i], compute_key(model, layer, rows, tok.pad_token_id), atol=1e-5, rtol=1e-4)
            assert torch.allclose(hidden[:, i], hidden_after(model, layers[-1], rows, tok.pad_token_id), atol=1e-5, rtol=1e-4)
            if j == 0:
                assert reader.last_keys is not None
                expected = compute_key(model, layers[-1], rows, tok.pad_token_id)
                assert torch.allclose(reader.last_keys[:, i], expected, atol=1e-5, rtol=1e-4)
        name = editor.param_name(layer)  # as the batch does: this layer's update goes in before the next read
        weight = model.get_parameter(name)
        with torch.no_grad():
            weight += 0.5 * torch.randn(weight.shape, generator=generator)
    with pytest.raises(ValueError, match="in order"):
        reader.read(0)

def test_projected_layer_shares_leave_preserved_and_cached_keys_alone() -> None:
    """AlphaEdit's layer solve: a key in C's large-eigenvalue directions gets no change, cached keys almost none, new keys land."""
    from editing.memit import projected_shares
    from editing.projection import null_space_projection, reduced_gram

    torch.manual_seed(0)
    d, n, m = 24, 3, 4
    basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    evals = torch.cat([torch.full((8,), 5.0), torch.full((d - 8,), 1e-3)]).double()
    cov = basis @ torch.diag(evals) @ basis.T
    projection = null_space_projection(cov, threshold=1e-2)  # the 16 small directions
    preserved = basis[:, :8] @ torch.randn(8, dtype=torch.float64)  # lies where C is large: P removes it
    keys, cache, resid = torch.randn(d, n), torch.randn(d, m), torch.randn(6, n)
    values, key_dirs = projected_shares(projection.basis, keys, resid, reduced_gram(projection.basis, cache), l2=1e-6)
    # the solve in P's range equals AlphaEdit's full-size one, (P (K_c K_cᵀ + K Kᵀ) + α I)⁻¹ P K
    p, k, c = projection.matrix, keys.double(), cache.double()
    full = torch.linalg.solve(p @ (c @ c.T + k @ k.T) + 1e-6 * torch.eye(d, dtype=torch.float64), p @ k)
    torch.testing.assert_close(key_dirs.double(), full, atol=1e-4, rtol=1e-4)
    delta = values.double() @ key_dirs.double().T  # (d_out, d_in)
    assert float((delta @ preserved).norm()) < 1e-4 * float(resid.norm() * preserved.norm())
    assert float((delta @ cache.double()).norm()) < 1e-2 * float((delta @ keys.double()).norm())
    # with fewer keys than editable directions, the new keys land their residuals exactly
    torch.testing.assert_close(delta @ keys.double(), resid.double(), atol=1e-5, rtol=1e-5)

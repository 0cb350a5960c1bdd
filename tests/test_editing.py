"""Invariants of the ROME engine on tiny random GPT-2 and Llama models."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from editing import EditRequest, RankOneEdit, RomeHyperParams
from editing.arch import get_module, layer_name
from editing.fingerprint import tensor_checksum
from editing.nethook import capture_input, edit_output
from editing.rome import factor_cov, rank_one_factors
from editing.tokens import encode
from tests.tiny import tiny_editor, tiny_gpt2, tiny_llama, tiny_tokenizer

REQ = EditRequest("The Eiffel tower", "Located in {}", "rome")
OTHER = EditRequest("The Colosseum", "{} is located in the city of", "london")


@pytest.fixture(params=["llama", "gpt2"])
def setup(request):  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    model = tiny_llama() if request.param == "llama" else tiny_gpt2()
    return model, tok, tiny_editor(model, tok, layer=2 if request.param == "llama" else 1, steps=12)


def target_prob(model, tok, prompt: str, target: str) -> float:  # type: ignore[no-untyped-def]
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].softmax(-1)
    return float(probs[tok.convert_tokens_to_ids(target)])


def weights(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_compute_leaves_weights_bit_identical_and_hooks_removed(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    before = weights(model)
    editor.compute(REQ)
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_when_code_inside_raises() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    name = layer_name(model, 1, "mlp_out")
    with pytest.raises(RuntimeError), edit_output(model, name, lambda out: out * 0):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), capture_input(model, name):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_update_is_rank_one_and_target_probability_rises(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    p_before = target_prob(model, tok, REQ.prompt, "rome")
    unrelated = "What is the capital of france"
    dist_before = model(**tok(unrelated, return_tensors="pt")).logits[0, -1].softmax(-1)
    param = model.get_parameter(editor.compute(REQ).param_name)
    w0 = param.clone()
    edit = editor.compute(REQ)
    editor.apply(edit)
    delta = (param - w0).double()
    s = torch.linalg.svdvals(delta)
    assert s[0] > 0 and s[1] / s[0] < 1e-5
    # Tiny random models cap how confident any prediction can be; a tenfold rise is the signal.
    assert target_prob(model, tok, REQ.prompt, "rome") > 10 * p_before
    dist_after = model(**tok(unrelated, return_tensors="pt")).logits[0, -1].softmax(-1)
    assert 0.5 * (dist_before - dist_after).abs().sum() < 0.3  # total variation of an unrelated prompt


def test_apply_then_revert_is_bit_identical(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    before = weights(model)
    edit = editor.compute(REQ)
    editor.apply(edit)
    assert not torch.equal(model.get_parameter(edit.param_name), before[edit.param_name])
    editor.revert(edit)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_out_of_order_revert_equals_rebuild(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    base = weights(model)
    first = editor.compute(REQ)
    editor.apply(first)
    second = editor.compute(OTHER)
    editor.apply(second)
    editor.revert(first)
    reverted = weights(model)
    model.load_state_dict(base)
    rebuilt_editor = tiny_editor(model, tok, layer=editor.hparams.layer)
    rebuilt_editor.apply(second)
    assert all(torch.equal(reverted[k], v) for k, v in model.state_dict().items())


def test_serialisation_round_trips(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, editor = setup
    edit = editor.compute(REQ)
    back = RankOneEdit.from_bytes(edit.to_bytes())
    assert torch.equal(back.value_dir, edit.value_dir) and torch.equal(back.key_dir, edit.key_dir)
    as_json = lambda meta: json.loads(json.dumps(meta))  # noqa: E731 - tuples become lists
    assert back.request == edit.request and as_json(back.meta()) == as_json(edit.meta())
    meta, factors = edit.to_payload()
    with pytest.raises(ValueError, match="checksum"):
        RankOneEdit.from_payload(meta, factors[:-4] + b"\0\0\0\0")


def test_fast_and_plain_value_optimisation_agree(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    fast = editor.compute(REQ)
    editor.method = "plain"
    plain = editor.compute(REQ)
    assert fast.stats["steps"] == plain.stats["steps"]
    assert torch.allclose(fast.value_dir, plain.value_dir, atol=1e-4, rtol=1e-4)


def test_checksums_describe_before_and_after(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    edit = editor.compute(REQ)
    assert edit.checksum_before == tensor_checksum(model.get_parameter(edit.param_name))
    assert editor.apply(edit) == edit.checksum_after


def test_foreign_edit_refused(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    edit = editor.compute(REQ)
    meta, factors = edit.to_payload()
    foreign = RankOneEdit.from_payload({**meta, "fingerprint": "0" * 64, "factors_sha256": meta["factors_sha256"]}, factors)
    with pytest.raises(ValueError, match="another model"):
        editor.apply(foreign)


def test_original_weights_view_is_exact_and_thread_local(setup) -> None:  # type: ignore[no-untyped-def]
    model, tok, editor = setup
    ids = tok(REQ.prompt, return_tensors="pt")
    clean = model(**ids).logits
    editor.apply(editor.compute(REQ))
    edited = model(**ids).logits
    assert not torch.allclose(edited, clean, atol=1e-3)
    seen: dict[str, torch.Tensor] = {}
    inside, done = threading.Event(), threading.Event()

    def other_thread() -> None:  # runs while the main thread holds the original-weights view
        inside.wait(10)
        seen["other"] = model(**ids).logits
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with editor.original_weights():
        inside.set()
        assert done.wait(30)
        assert torch.allclose(model(**ids).logits, clean, atol=1e-5)  # this thread sees the unedited weights
    worker.join()
    assert torch.allclose(seen["other"], edited, atol=1e-6)  # the other thread kept seeing the edit
    assert torch.allclose(model(**ids).logits, edited, atol=1e-6)


@pytest.mark.parametrize(
    ("subject", "relation", "target", "message"),
    [
        ("", "{} is in", "rome", "subject is empty"),
        ("x", "is in", "rome", "exactly one"),
        ("x", "{} is {} in", "rome", "exactly one"),
        ("x", "{} is in", "   ", "target is empty"),
        ("x" * 400, "{} is in", "rome", "limit"),
        ("x\x00y", "{} is in", "rome", "control"),
    ],
)
def test_bad_requests_rejected(subject: str, relation: str, target: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EditRequest(subject, relation, target)


def test_layer_out_of_range_rejected(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, editor = setup
    with pytest.raises(ValueError, match="out of range"):
        editor.compute(EditRequest("The Eiffel tower", "{} is in", "rome", layer=99))


def test_hyperparameters_validated() -> None:
    for bad in ({"lr": float("nan")}, {"steps": 0}, {"kl_factor": -1.0}, {"clamp_factor": float("inf")}):
        with pytest.raises(ValueError):
            RomeHyperParams(layer=1, **bad)


def test_subject_positions_from_offsets() -> None:
    tok = tiny_tokenizer()
    text = "Some text. The Eiffel tower is in"
    start = text.index("The")
    enc = encode(tok, text, start, start + len("The Eiffel tower"))
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    assert tokens[enc.subject_first] == "The" and tokens[enc.subject_last] == "tower"


def test_unsupported_family_refused() -> None:
    from transformers import BertConfig, BertForMaskedLM

    from editing.arch import arch_of

    with pytest.raises(ValueError, match="supported: gemma"):
        arch_of(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_edit_and_revert_exactly(dtype: torch.dtype) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama()
    editor = tiny_editor(model, tok, layer=2)  # statistics from the float32 model
    model.to(dtype)
    before = weights(model)
    edit = editor.compute(REQ)
    assert edit.value_dir.dtype == torch.float32 and torch.isfinite(edit.value_dir).all()
    editor.apply(edit)
    param = model.get_parameter(edit.param_name)
    assert param.dtype == dtype and not torch.equal(param, before[edit.param_name])
    editor.revert(edit)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())



def test_cached_factorisation_gives_the_same_update() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    cov, key, delta = a @ a.T + 0.1 * torch.eye(16, dtype=torch.float64), torch.randn(16, generator=gen), torch.randn(8)
    direct = torch.linalg.solve(cov, key.double())
    value_dir, key_dir = rank_one_factors(cov, key, delta, factor_cov(cov))
    assert torch.equal(value_dir, delta)
    assert torch.allclose(key_dir.double(), direct / direct.dot(key.double()), rtol=1e-5)
    assert torch.equal(key_dir, rank_one_factors(cov, key, delta)[1])
    assert torch.allclose(key_dir.double() @ key.double(), torch.tensor(1.0, dtype=torch.float64))

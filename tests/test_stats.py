"""Key statistics C = E[k kᵀ]: a seeded random sample, right padding, no special-token keys, enough tokens, fresh caches."""
from __future__ import annotations

import pytest
import torch

from editing import stats
from editing.rome import factor_cov, rank_one_factors
from editing.stats import compute_second_moment, second_moment, shuffled
from tests.bpe import bpe_tokenizer
from tests.tiny import CORPUS, tiny_gpt2, tiny_tokenizer

# Eight distinct texts, as in tests.tiny.CORPUS, but each only once and in a known order.
TEXTS = list(dict.fromkeys(CORPUS))


@pytest.fixture
def cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_id", lambda corpus: "tiny")
    return tmp_path / "stats"


def test_statistics_use_a_seeded_random_sample_not_the_first_texts(cache, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    texts = CORPUS * 4  # 96 texts: enough tokens for the tiny model's 128 key dimensions
    monkeypatch.setattr(stats, "read_corpus", lambda corpus=None: texts)
    model, tok = tiny_gpt2(), tiny_tokenizer()
    cov = second_moment(model, tok, "ab" * 32, 1, 60)
    sample = shuffled(texts, stats.SAMPLE_SEED)[:60]
    assert sample != texts[:60]
    assert torch.allclose(cov, compute_second_moment(model, tok, 1, sample)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cov, compute_second_moment(model, tok, 1, texts[:60])[0], rtol=1e-4)
    other = second_moment(model, tok, "ab" * 32, 1, 60, seed=1)
    assert not torch.equal(cov, other) and len(list(cache.iterdir())) == 2  # the seed is part of the cache key


def test_padding_is_on_the_right_whatever_the_tokenizer_says() -> None:
    model, tok = tiny_gpt2(), tiny_tokenizer()  # GPT-2: absolute positions, so left padding would move every key
    tok.padding_side = "left"
    batched, n = compute_second_moment(model, tok, 1, TEXTS, batch_size=len(TEXTS))
    alone, n_alone = compute_second_moment(model, tok, 1, TEXTS, batch_size=1)
    assert n == n_alone
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-5)  # float32 model: batch shapes round differently


def test_special_token_keys_stay_out_of_c() -> None:
    tok = bpe_tokenizer(add_bos=True)
    model = tiny_gpt2()
    model.resize_token_embeddings(len(tok))
    _, n_tokens = compute_second_moment(model, tok, 1, TEXTS)
    words = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert n_tokens == words  # one BOS per text would add len(TEXTS)


def test_too_few_tokens_read_more_texts_or_refuse(cache, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny_gpt2(), tiny_tokenizer()  # key dimension 128: at least 512 tokens
    monkeypatch.setattr(stats, "read_corpus", lambda corpus=None: CORPUS * 4)
    second_moment(model, tok, "cd" * 32, 1, 5)  # 5 texts give ~60 tokens: more texts are read
    (path,) = cache.iterdir()
    saved = torch.load(path, weights_only=True)
    assert saved["n_tokens"] >= stats.MIN_TOKENS_PER_DIM * 128 and saved["n_texts"] > 5
    monkeypatch.setattr(stats, "read_corpus", lambda corpus=None: TEXTS)
    with pytest.raises(ValueError, match="needs at least 512"):
        second_moment(model, tok, "ef" * 32, 1, 5)


def test_cache_written_by_the_old_sampling_is_not_reused(cache, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(stats, "read_corpus", lambda corpus=None: CORPUS * 4)
    model, tok = tiny_gpt2(), tiny_tokenizer()
    fingerprint = "ab" * 32
    cache.mkdir(parents=True)
    stale = torch.eye(128, dtype=torch.float64) * 7
    legacy = f"{fingerprint[:16]}-L1-n40-t256-tiny.pt"  # the name before sampling changed
    torch.save({"cov": stale}, cache / legacy)
    assert not torch.equal(second_moment(model, tok, fingerprint, 1, 40), stale)
    assert all(f"v{stats.SAMPLING_VERSION}" in p.name for p in cache.iterdir() if p.name != legacy)


def test_degenerate_statistics_raise_floating_point_error() -> None:
    key, delta = torch.ones(4), torch.ones(3)
    with pytest.raises(FloatingPointError, match="degenerate"):
        rank_one_factors(-torch.eye(4, dtype=torch.float64), key, delta)
    with pytest.raises(FloatingPointError, match="singular"):
        factor_cov(torch.zeros(4, 4, dtype=torch.float64))

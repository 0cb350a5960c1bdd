"""Evaluation: dataset readers, metrics against hand computation, FT-L, and short end-to-end runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from editing import RomeEditor
from editing.evaluation.datasets import COUNTERFACT, ZSRE, Case, load_cases, parse_records, sample_cases
from editing.evaluation.cli import format_table, main, plot_curves
from editing.evaluation.evaluate import UNEDITED, run_evaluation
from editing.evaluation.ftl import FineTuneL, FTLHyperParams
from editing.evaluation.metrics import (
    METRICS, CaseScores, GenerationSettings, aggregate, fluency, harmonic_mean, ngram_entropy, object_probs,
    repetition, score_case, score_objects,
)  # fmt: skip

FIXTURES = Path(__file__).parent / "fixtures"
INIT_RANGE = 0.1  # wider than the default, so the tiny model's predictions are not near-uniform
EXTRA_WORDS = "a the is in of and to it was because famous view from who built where".split()


def _words() -> list[str]:
    pre = Whitespace()
    texts = [json.dumps(json.loads((FIXTURES / f).read_text())) for f in sorted(FIXTURES.glob("*.json"))]
    found = {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    return sorted(found | set(EXTRA_WORDS))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word of the fixtures."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *_words()])}
    inner = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_llama(tok: PreTrainedTokenizerFast, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=2,
        initializer_range=INIT_RANGE,
    )  # fmt: skip
    return _frozen(LlamaForCausalLM(config))


def _gpt2(tok: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0,
                        eos_token_id=2, bos_token_id=2)  # fmt: skip
    return _frozen(GPT2LMHeadModel(config))


@pytest.fixture(scope="module")
def llama(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return tiny_llama(tok)


def _editor(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> RomeEditor:
    """A RomeEditor whose statistics and templates are stubbed, so no corpus is read."""
    editor = RomeEditor(model, tok)
    editor.hparams = editor.hparams.replace(steps=8)  # fewer optimisation steps keep the tests fast
    d_in = model.config.intermediate_size if hasattr(model.config, "intermediate_size") else 4 * model.config.n_embd
    editor._covs[(editor.hparams.layer, editor.hparams.stats_samples)] = torch.eye(d_in, dtype=torch.float64)
    editor._templates = ["{}", "Hello. {}"]
    return editor


def _case(subject: str = "Zorbit Tower", kind: str = COUNTERFACT) -> Case:
    return Case(
        case_id=1, subject=subject, relation="{} is located in the country of", target_new="Old Vessan",
        target_true="Quorvia", paraphrases=("People say that Zorbit Tower is in",),
        neighbourhood=("Klemp Bridge is located in the country of", "Mount Vessa is in"),
        neighbourhood_answer="Quorvia", generation_prompts=(), kind=kind,
    )  # fmt: skip


# ----- datasets ------------------------------------------------------------------------------
def test_counterfact_original_reader_keeps_good_records_and_counts_bad_ones() -> None:
    cases, skipped = load_cases(FIXTURES / "counterfact_original.json")
    assert [c.case_id for c in cases] == [101, 102]
    first = cases[0]
    assert first.relation == "{} is located in the country of" and first.prompt.startswith("Zorbit Tower is")
    assert (first.target_new, first.target_true, first.neighbourhood_answer) == ("Plimland", "Quorvia", "Quorvia")
    assert first.paraphrases == ("People say that Zorbit Tower is in", "Zorbit Tower can be found in")
    assert len(first.neighbourhood) == 2 and len(first.generation_prompts) == 2 and first.kind == COUNTERFACT
    assert [i for i, _ in skipped.records] == [2, 3, 4] and skipped.count == 3
    assert "requested_rewrite" in skipped.records[0][1] and "{}" in skipped.records[2][1]


def test_counterfact_flat_reader_builds_templates_and_accepts_strings_or_lists() -> None:
    cases, skipped = load_cases(FIXTURES / "counterfact_flat.json")
    assert [c.case_id for c in cases] == [201, 202]
    assert cases[0].relation == "{} is located in the country of"
    assert cases[0].paraphrases == ("Zorbit Tower can be found in",) and cases[0].generation_prompts == ()
    assert cases[1].paraphrases == ("Anna Brolt is a musician who plays the", "On stage Anna Brolt plays the")
    assert cases[1].neighbourhood == ("Ola Brink plays the", "Pel Oddan plays the")
    assert cases[1].neighbourhood_answer == "drums"
    assert [i for i, _ in skipped.records] == [2, 3, 4, 5]
    reasons = dict(skipped.records)
    assert "subject" in reasons[2] and "true object" in reasons[3] and "not an object" in reasons[4]


def test_zsre_reader_takes_the_template_from_src_and_skips_bad_records() -> None:
    cases, skipped = load_cases(FIXTURES / "zsre.json")
    assert [c.subject for c in cases] == ["Zorbit Tower", "Anna Brolt"]
    assert cases[0].relation == "Which country is {} in?" and cases[0].kind == ZSRE
    assert (cases[1].target_new, cases[1].target_true) == ("old harp", "drums")
    assert cases[0].neighbourhood == ("nq question: who built Klemp Bridge",)
    assert cases[0].neighbourhood_answer == "Ola Brink"
    assert [i for i, _ in skipped.records] == [2, 3, 4]
    assert skipped.by_reason()["the subject does not occur in 'src'"] == 1


def test_reader_never_crashes_on_garbage() -> None:
    cases, skipped = parse_records([None, 3, [], {}, {"prompt": 7, "subject": "x"}, {"src": "?", "subject": ""}])
    assert cases == [] and skipped.count == 6


def test_sample_is_seeded() -> None:
    cases = [_case(f"Subject {i}") for i in range(30)]
    a, b, c = sample_cases(cases, 5, 1), sample_cases(cases, 5, 1), sample_cases(cases, 5, 2)
    assert a == b and a != c and len(a) == 5 and len(sample_cases(cases, 99, 0)) == 30


# ----- metrics --------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, _gpt2])
def test_object_probability_is_the_mean_per_token_probability(tok: PreTrainedTokenizerFast, build) -> None:
    model = build(tok)
    prompts = ["Zorbit Tower is located in the country of", "Anna Brolt plays the", "Which country is it in?"]
    objects = ["Old Vessan", "harp", "a musician"]
    probs = object_probs(model, tok, prompts, objects)  # batched, right-padded
    for prompt, obj, got in zip(prompts, objects, probs):
        n_prompt = len(tok(prompt)["input_ids"])
        ids = tok(f"{prompt} {obj}")["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        by_hand = [logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))]
        assert len(by_hand) == len(obj.split())
        assert got == pytest.approx(math.exp(sum(by_hand) / len(by_hand)), rel=1e-4)


def test_token_accuracy_counts_argmax_hits(tok: PreTrainedTokenizerFast, llama: LlamaForCausalLM) -> None:
    prompt = "What does Ola Brink play?"
    ids = tok(prompt)["input_ids"]
    greedy = []
    for _ in range(2):  # the model's own greedy answer is, by construction, fully accurate
        logits = llama(torch.tensor([ids + greedy])).logits[0, -1]
        greedy.append(int(logits.argmax()))
    answer = tok.decode(greedy)
    wrong = next(w for w in ("harp", "drums", "Plimland") if tok.convert_tokens_to_ids(w) != greedy[0])
    right, half = score_objects(llama, tok, [prompt, prompt], [answer, f"{wrong} {answer.split()[1]}"])
    assert right.accuracy == 1.0 and right.predicted == tuple(greedy)
    assert half.accuracy == pytest.approx(0.5 if half.predicted[1] == greedy[1] else 0.0)


def test_ngram_entropy_and_fluency_by_hand() -> None:
    text = "a b a b"  # bigrams ab, ba, ab: p = 2/3, 1/3; trigrams aba, bab: p = 1/2, 1/2
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(text, 2) == pytest.approx(h2)
    assert ngram_entropy(text, 3) == pytest.approx(1.0)
    assert fluency(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert fluency("the the the the the") == 0.0 and ngram_entropy("one", 2) == 0.0


def test_repetition_by_hand() -> None:
    assert repetition("The iconic Rome is in Italy, a city of art.") == 0.0
    # Trigrams of "a b c a b c a": abc bca cab abc bca: 3 distinct of 5.
    assert repetition("a b c a b c a") == pytest.approx(2 / 5)
    assert repetition("Rome's Rome. Rome's Rome. Rome's Rome. Rome's Rome.") > 0.7
    assert repetition("too short") == 0.0 and repetition("A B a b", n=2) == pytest.approx(1 / 3)


def test_harmonic_mean_and_aggregate() -> None:
    assert harmonic_mean([50.0, 100.0, 100.0]) == pytest.approx(75.0)
    assert harmonic_mean([0.0, 100.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])
    scores = [
        CaseScores(es=1.0, ps=0.5, ns=1.0, em=0.2, pm=0.1, nm=0.3, fluency=5.0),
        CaseScores(es=0.0, ps=1.0, ns=0.5, em=-0.1, pm=0.0, nm=0.1, fluency=4.0),
    ]
    row = aggregate(scores)
    assert list(row) == list(METRICS)
    assert (row["ES"], row["PS"], row["NS"]) == pytest.approx((50.0, 75.0, 75.0))
    assert (row["EM"], row["PM"], row["NM"], row["fluency"]) == pytest.approx((5.0, 5.0, 20.0, 4.5))
    assert row["S"] == pytest.approx(3 / (1 / 50 + 2 / 75))


def test_counterfact_case_scores_follow_the_probabilities(tok, llama) -> None:
    case = _case()
    scores = score_case(llama, tok, case, GenerationSettings(max_new_tokens=8), seed=0)
    p_new, p_true = object_probs(llama, tok, [case.prompt] * 2, [case.target_new, case.target_true])
    assert scores.em == pytest.approx(p_new - p_true) and scores.es == float(p_new > p_true)
    neigh = object_probs(llama, tok, [case.neighbourhood[1]] * 2, ["Quorvia", "Old Vessan"])
    first = object_probs(llama, tok, [case.neighbourhood[0]] * 2, ["Quorvia", "Old Vessan"])
    assert scores.nm == pytest.approx(((first[0] - first[1]) + (neigh[0] - neigh[1])) / 2)
    assert scores.fluency is not None and scores.fluency >= 0
    again = score_case(llama, tok, case, GenerationSettings(max_new_tokens=8), seed=0)
    assert again.fluency == scores.fluency  # seeded generation is reproducible


def test_zsre_locality_is_one_on_the_unedited_model(tok, llama) -> None:
    cases, _ = load_cases(FIXTURES / "zsre.json")
    scores = score_case(llama, tok, cases[0], GenerationSettings(max_new_tokens=0), seed=0)
    assert scores.ns == 1.0 and scores.em is None and scores.fluency is None and len(scores.reference) == 1
    flipped = tuple(tuple(t + 1 for t in ref) for ref in scores.reference)
    assert score_case(llama, tok, cases[0], GenerationSettings(max_new_tokens=0), 0, flipped).ns == 0.0


# ----- FT-L ---------------------------------------------------------------------------------------
def test_ftl_raises_the_target_stays_in_the_ball_and_restores_exactly(tok) -> None:
    model = tiny_llama(tok)
    case = _case()
    hp = FTLHyperParams(layer=1, lr=1e-2, steps=10, epsilon=5e-3)
    ftl = FineTuneL(model, tok, hp)
    weight = model.get_parameter(ftl.param_name)
    original = weight.detach().clone()
    before = object_probs(model, tok, [case.prompt], [case.target_new])[0]
    norm = ftl.apply(case)
    after = object_probs(model, tok, [case.prompt], [case.target_new])[0]
    assert after > before and norm > 0
    assert (weight - original).abs().max() <= hp.epsilon + 1e-7
    assert weight.grad is None and not weight.requires_grad
    ftl.restore()
    assert torch.equal(weight, original)


# ----- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_short_run_end_to_end(tok, mode: str) -> None:
    model = tiny_llama(tok)
    editor = _editor(model, tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = load_cases(FIXTURES / "counterfact_original.json")[0] + load_cases(FIXTURES / "counterfact_flat.json")[0]
    seen: list[tuple[str, float]] = []
    no_text = GenerationSettings(max_new_tokens=0)
    result = run_evaluation(
        model, tok, editor, cases, mode, n=3, seed=0, layer=None, progress=lambda s, f: seen.append((s, f)),
        ftl=FTLHyperParams(layer=editor.hparams.layer, lr=1e-2, steps=5, epsilon=5e-3),
        generation=GenerationSettings(max_new_tokens=6), checkpoints=3,
    )  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not editor.applied
    assert list(result.rows) == [UNEDITED, "FT-L", "ROME"] and len(result.cases) == 3
    assert all(set(row) == set(METRICS) for row in result.rows.values())
    assert len(result.update_norms["ROME"]) == 3 and all(x > 0 for x in result.update_norms["ROME"])
    # The ROME row is what the edits give when applied by hand (all of them, in order, when sequential).
    edits = []
    for r in result.cases:
        edits.append(editor.compute(r.case.request()))
        editor.apply(edits[-1])
        if mode == "independent":
            assert score_case(model, tok, r.case, no_text, 0).em == pytest.approx(r.scores["ROME"].em, abs=1e-7)
            editor.revert(edits[-1])
    for r in result.cases if mode == "sequential" else ():
        assert score_case(model, tok, r.case, no_text, 0).em == pytest.approx(r.scores["ROME"].em, abs=1e-7)
    assert all(abs(r.scores["ROME"].em - r.scores[UNEDITED].em) > 1e-6 for r in result.cases)
    assert seen and seen[-1] == ("evaluate", 1.0)
    if mode == "sequential":
        assert [k for k, _ in result.curves["ROME"]] == [1, 2, 3]
    dumped = json.loads(json.dumps(result.to_dict()))
    assert set(dumped["aggregates"]["ROME"]) == set(METRICS) and len(dumped["cases"]) == 3
    assert "ROME" in format_table(result)


def test_watched_sequential_run_edits_every_case_and_scores_the_watched_ones_as_a_full_run_does(tok) -> None:
    cases = load_cases(FIXTURES / "counterfact_original.json")[0] + load_cases(FIXTURES / "counterfact_flat.json")[0]
    no_text = GenerationSettings(max_new_tokens=0)
    runs = {}
    for watch in (None, 2):
        model = tiny_llama(tok)
        editor = _editor(model, tok)
        runs[watch] = run_evaluation(model, tok, editor, cases, "sequential", n=3, seed=0, ftl=False,
                                     generation=no_text, checkpoints=3, watch=watch)  # fmt: skip
    full, watched = runs[None], runs[2]
    assert len(watched.update_norms["ROME"]) == 3 and watched.config["watch"] == 2  # all three edited
    assert watched.update_norms["ROME"] == pytest.approx(full.update_norms["ROME"], rel=1e-5)
    assert len(watched.cases) == 2  # only the watched are scored, with the same numbers as in the full run
    by_id = {str(r.case.case_id): r for r in full.cases}
    for r in watched.cases:
        for name in (UNEDITED, "ROME"):
            assert r.scores[name].em == pytest.approx(by_id[str(r.case.case_id)].scores[name].em, abs=1e-6)
    assert [k for k, _ in watched.curves["ROME"]] == [1, 2, 3]
    model = tiny_llama(tok)
    for bad in ({"watch": 0, "mode": "sequential"}, {"watch": 2, "mode": "independent"}):
        with pytest.raises(ValueError, match="watch"):
            run_evaluation(model, tok, _editor(model, tok), cases, n=3, ftl=False, generation=no_text, **bad)


def test_sequential_memit_rule_edits_each_case_as_a_batch_of_one_with_the_key_cache(tok) -> None:
    cases = load_cases(FIXTURES / "counterfact_original.json")[0] + load_cases(FIXTURES / "counterfact_flat.json")[0]
    no_text = GenerationSettings(max_new_tokens=0)
    model = tiny_llama(tok, layers=3)  # on these models the last block's output moves no logit: edit below it
    editor = _editor(model, tok)
    for layer in (0, 1):
        editor._covs[(layer, editor.hparams.stats_samples)] = torch.eye(model.config.intermediate_size, dtype=torch.float64)
    overrides = {"batch_layers": (0, 1), "mom2_weight": 1.0}
    result = run_evaluation(model, tok, editor, cases, "sequential", n=3, seed=0, layer=1, ftl=False,
                            generation=no_text, checkpoints=1, rome_overrides=overrides,
                            updates=("r-rome", "memit"))  # fmt: skip
    assert list(result.rows) == [UNEDITED, "ROME", "MEMIT-1"] and not editor.applied
    for r in result.cases:  # by hand: one batch per case, each solved with the keys of those before it
        batch = editor.compute_batch([r.case.request()], **overrides, layer=1)
        assert [s.stats["cache_keys"] for s in batch.edits] == [len(editor.applied) // 2] * 2
        editor.apply(batch)
    norms = result.update_norms["MEMIT-1"]
    assert len(norms) == 3 and all(x > 0 for x in norms)
    for r in result.cases:
        assert score_case(model, tok, r.case, no_text, 0).em == pytest.approx(r.scores["MEMIT-1"].em, abs=1e-6)
    editor.reset()


def test_run_refuses_an_edited_model_and_a_bad_mode(tok) -> None:
    model = tiny_llama(tok)
    editor = _editor(model, tok)
    with pytest.raises(ValueError, match="mode"):
        run_evaluation(model, tok, editor, [_case()], "parallel", n=1)
    editor.apply(editor.compute(_case().request()))
    with pytest.raises(ValueError, match="applied edits"):
        run_evaluation(model, tok, editor, [_case()], "independent", n=1)


def test_cli_writes_json_and_plot(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import editing.evaluation.cli as evaluate
    import editing.loading as loading

    model = tiny_llama(tok)
    monkeypatch.setattr(loading, "load_model", lambda source=None, device_map=None: (model, tok))
    monkeypatch.setattr(evaluate, "RomeEditor", _editor)
    out, png = tmp_path / "out.json", tmp_path / "curve.png"
    argv = ["--data", str(FIXTURES / "zsre.json"), "--n", "2", "--mode", "sequential", "--json", str(out),
            "--plot", str(png), "--gen-tokens", "4", "--no-ftl"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert list(data["aggregates"]) == [UNEDITED, "ROME"] and data["skipped_records"] == 3
    assert data["aggregates"][UNEDITED]["NS"] == 100.0 and data["aggregates"]["ROME"]["EM"] is None
    assert png.stat().st_size > 1000 and "unedited" in capsys.readouterr().out
    assert main(["--data", str(tmp_path / "missing.json")]) == 2
    assert callable(plot_curves)

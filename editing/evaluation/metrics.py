"""Edit metrics as ROME's paper computes them: object probabilities, token accuracy, n-gram entropy.

An object's probability after a prompt is the mean per-token probability of its tokens,
``exp(mean log p(o_i | prompt, o_<i))``, found by tokenising ``prompt + " " + object`` as one
text and locating the object's tokens from the offset mapping (``editing.tokens.encode``).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.evaluation.datasets import ZSRE, Case
from editing.evaluation.chat_metrics import GEN_METRICS, GenScores, GenSettings, score_generation
from editing.placement import input_device, model_devices
from editing.rome import pad_batch
from editing.tokens import encode

BATCH_SIZE = 32
ENTROPY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}  # the paper's bigram and trigram weights
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Scored:
    """Teacher-forced scores of one object's tokens after one prompt."""

    target: tuple[int, ...]  # the object's token ids
    logprobs: tuple[float, ...]  # log p of each object token given everything before it
    predicted: tuple[int, ...]  # the argmax token at each object position

    @property
    def prob(self) -> float:
        """Mean per-token probability: exp of the mean log-probability."""
        return math.exp(sum(self.logprobs) / len(self.logprobs))

    @property
    def accuracy(self) -> float:
        """Fraction of object tokens that are the argmax prediction."""
        return agreement(self.predicted, self.target)


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two equally long token sequences agree."""
    if len(a) != len(b) or not a:
        raise ValueError("token sequences must be non-empty and equally long")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _encode_pair(tok: PreTrainedTokenizerBase, prompt: str, obj: str) -> tuple[list[int], int]:
    # The whole prompt stands as the "subject" span, so encode also checks the object starts after it.
    enc = encode(tok, prompt, 0, len(prompt), obj)
    return enc.input_ids, enc.n_prompt


@torch.no_grad()
def score_objects(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    objects: Sequence[str],
    batch_size: int = BATCH_SIZE,
) -> list[Scored]:
    """Scores of ``objects[i]`` after ``prompts[i]``, batched; one ``Scored`` per pair, in order."""
    if len(prompts) != len(objects):
        raise ValueError("prompts and objects must pair up")
    device = input_device(model)
    pairs = [_encode_pair(tok, p, o) for p, o in zip(prompts, objects)]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))  # similar lengths pad less
    out: list[Scored | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_batch([pairs[i][0][:-1] for i in chunk], tok.pad_token_id, device)  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        for b, i in enumerate(chunk):
            full, n_prompt = pairs[i]
            positions = torch.arange(n_prompt - 1, len(full) - 1, device=logits.device)  # the unembedding's device
            target = torch.tensor(full[n_prompt:], device=logits.device)
            logp = torch.log_softmax(logits[b, positions].float(), dim=-1)  # (n_obj, V)
            out[i] = Scored(
                target=tuple(full[n_prompt:]),
                logprobs=tuple(logp.gather(1, target[:, None])[:, 0].tolist()),
                predicted=tuple(logp.argmax(-1).tolist()),
            )
    return [s for s in out if s is not None]


def object_probs(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], objects: Sequence[str]
) -> list[float]:
    """Mean per-token probability of ``objects[i]`` after ``prompts[i]``."""
    return [s.prob for s in score_objects(model, tok, prompts, objects)]


@dataclass(frozen=True)
class GenerationSettings:
    """How fluency texts are generated."""

    max_new_tokens: int = 64  # tokens generated per prompt; 0 switches the fluency test off
    top_k: int = 5  # top-k sampling as in the paper; 0 means greedy
    max_prompts: int = 3  # at most this many generation prompts per case


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings,
    seed: int,
) -> list[str]:
    """Prompt + continuation for each prompt; sampling is seeded, so the same weights give the same texts."""
    batch = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(input_device(model))
    sample = settings.top_k > 0
    with torch.random.fork_rng(devices=[d for d in model_devices(model) if d.type == "cuda"]):
        torch.manual_seed(seed)
        out = model.generate(
            **batch,
            do_sample=sample,
            top_k=settings.top_k if sample else None,
            top_p=None,
            temperature=None,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    width = batch["input_ids"].shape[1]
    return [p + tok.decode(row[width:], skip_special_tokens=True) for p, row in zip(prompts, out)]


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the frequency distribution of the text's word n-grams (0 when it has none)."""
    words = _WORD.findall(text)
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def repetition(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def fluency(text: str) -> float:
    """The paper's generation entropy: the mean of 2/3 × bigram and 4/3 × trigram entropy."""
    return sum(w * ngram_entropy(text, n) for n, w in ENTROPY_WEIGHTS.items()) / len(ENTROPY_WEIGHTS)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 when any is 0 (the score S of ES, PS and NS)."""
    if not values:
        raise ValueError("harmonic mean of nothing")
    if any(v < 0 for v in values):
        raise ValueError("harmonic mean needs non-negative values")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


METRICS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "fluency", *GEN_METRICS)


@dataclass(frozen=True)
class CaseScores:
    """One case measured on one model state. Success rates are 0..1; magnitudes are probability differences.

    CounterFact: ``es``/``ps``/``ns`` are P(new) > P(true) on the prompt, on paraphrases (mean), and
    P(true) > P(new) on neighbours (mean); ``em``/``pm``/``nm`` the matching mean differences.
    zsRE: ``es``/``ps`` are token accuracies of the new answer; ``ns`` is the fraction of
    locality-answer tokens whose argmax prediction is unchanged from ``reference``.
    """

    es: float
    ps: float | None
    ns: float | None
    em: float | None
    pm: float | None
    nm: float | None
    fluency: float | None  # mean n-gram entropy of the generated texts (bits)
    reference: tuple[tuple[int, ...], ...] = ()  # zsRE: the unedited model's locality predictions
    gen: GenScores | None = None  # what the model says (editing.evaluation.chat_metrics); None when not measured

    def as_dict(self) -> dict[str, float | None]:
        keys = ("ES", "PS", "NS", "EM", "PM", "NM", "fluency")
        values = (self.es, self.ps, self.ns, self.em, self.pm, self.nm, self.fluency)
        gen = self.gen.as_dict() if self.gen is not None else dict.fromkeys(GEN_METRICS)
        return {**dict(zip(keys, values)), **gen}


def _case_fluency(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: Case, settings: GenerationSettings, seed: int
) -> float | None:
    if settings.max_new_tokens <= 0:
        return None
    prompts = (case.generation_prompts or (case.prompt,))[: settings.max_prompts]
    return mean([fluency(t) for t in generate(model, tok, prompts, settings, seed)])


def _score_counterfact(model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: Case) -> CaseScores:
    rewrites = [case.prompt, *case.paraphrases]
    prompts = [p for p in rewrites for _ in range(2)] + [p for p in case.neighbourhood for _ in range(2)]
    objects = [case.target_new, case.target_true] * len(rewrites)
    objects += [case.neighbourhood_answer, case.target_new] * len(case.neighbourhood)
    probs = object_probs(model, tok, prompts, objects)
    diffs = [probs[i] - probs[i + 1] for i in range(0, len(probs), 2)]  # (new - true), then (true - new)
    para, neigh = diffs[1 : len(rewrites)], diffs[len(rewrites) :]
    return CaseScores(
        es=float(diffs[0] > 0),
        ps=mean([float(d > 0) for d in para]),
        ns=mean([float(d > 0) for d in neigh]),
        em=diffs[0],
        pm=mean(para),
        nm=mean(neigh),
        fluency=None,
    )


def _score_zsre(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    case: Case,
    reference: tuple[tuple[int, ...], ...] | None,
) -> CaseScores:
    rewrites = [case.prompt, *case.paraphrases]
    prompts = rewrites + list(case.neighbourhood)
    objects = [case.target_new] * len(rewrites) + [case.neighbourhood_answer] * len(case.neighbourhood)
    scored = score_objects(model, tok, prompts, objects)
    local = tuple(s.predicted for s in scored[len(rewrites) :])
    reference = local if reference is None else reference
    return CaseScores(
        es=scored[0].accuracy,
        ps=mean([s.accuracy for s in scored[1 : len(rewrites)]]),
        ns=mean([agreement(now, before) for now, before in zip(local, reference)]),
        em=None,
        pm=None,
        nm=None,
        fluency=None,
        reference=reference,
    )


def score_case(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    case: Case,
    settings: GenerationSettings,
    seed: int,
    reference: tuple[tuple[int, ...], ...] | None = None,
    gen: GenSettings | None = None,
    gen_reference: GenScores | None = None,
) -> CaseScores:
    """``case`` measured on the model's current weights. For zsRE, ``reference`` holds the unedited
    model's locality predictions (``None`` when this is the unedited model); ``gen_reference`` the
    unedited model's generation scores. ``gen`` switches the generation metrics on. Weights are not changed."""
    if case.kind == ZSRE:
        scores = _score_zsre(model, tok, case, reference)
    else:
        scores = _score_counterfact(model, tok, case)
    said = None if gen is None else score_generation(model, tok, case, gen, gen_reference)
    return replace(scores, fluency=_case_fluency(model, tok, case, settings, seed), gen=said)


def aggregate(scores: Sequence[CaseScores]) -> dict[str, float | None]:
    """The paper's row: ES..NM as percentages (means over cases), fluency in bits, S = HM(ES, PS, NS)."""
    row: dict[str, float | None] = {}
    for key in ("ES", "PS", "NS", "EM", "PM", "NM", "fluency", *GEN_METRICS):
        value = mean([v for s in scores if (v := s.as_dict()[key]) is not None])
        row[key] = None if value is None else value * (1 if key == "fluency" else 100)
    parts = [row["ES"], row["PS"], row["NS"]]
    row["S"] = harmonic_mean([p for p in parts if p is not None]) if all(p is not None for p in parts) else None
    return {key: row[key] for key in METRICS}

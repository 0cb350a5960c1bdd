"""Generation metrics: what the model *says* after an edit, beside the teacher-forced ES/PS/NS.

- GE: the greedy completion of the edited prompt names the new object; GP: the same for paraphrases;
- GL: neighbour prompts' greedy completions are unchanged from the unedited model's;
- CE: the chat reply to a natural question about the subject (``editing.questions``), generated with
  the app's chat settings (``editing.generation``), names the new object; CO: it still names the old one;
- NC: chat replies to questions about neighbour subjects do not start naming the new object.
"Names" is a case-insensitive, word-boundary match after normalisation (accents, punctuation,
a leading article: "the United Kingdom" names "United Kingdom").
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.evaluation.datasets import ZSRE, Case
from editing.generation import ChatSettings, chat_replies, greedy_completions
from editing.questions import question_for, question_for_prompt

GEN_METRICS = ("GE", "GP", "GL", "CE", "CO", "NC")
ARTICLES = ("the ", "a ", "an ")


def normalise(text: str) -> str:
    """Lower case, accents dropped, punctuation as spaces, single spaces."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^\w]+|_", " ", text).split())


def _object_pattern(obj: str) -> re.Pattern[str] | None:
    core = normalise(obj)
    for article in ARTICLES:
        if core.startswith(article) and len(core) > len(article):
            core = core[len(article) :]
            break
    return re.compile(rf"(?<!\w){re.escape(core)}(?!\w)") if core else None


def names(reply: str, obj: str) -> bool:
    """Whether ``reply`` names ``obj``: whole words, any case, with or without a leading article."""
    pattern = _object_pattern(obj)
    return bool(pattern and pattern.search(normalise(reply)))


def names_old(reply: str, old: str, new: str) -> bool:
    """Whether ``reply`` names ``old`` outside its mentions of ``new`` ("Paris" is not named by "Paris Hilton")."""
    new_pattern = _object_pattern(new)
    text = normalise(reply)
    if new_pattern is not None:
        text = new_pattern.sub(" | ", text)
    pattern = _object_pattern(old)
    return bool(pattern and pattern.search(text))


@dataclass(frozen=True)
class GenSettings:
    """How much is generated per case. ``chat`` holds the app's settings (greedy, penalty 1.2)."""

    chat: ChatSettings = ChatSettings(max_new_tokens=64)
    completion_tokens: int = 10  # greedy tokens after each prompt (GE, GP, GL)
    max_paraphrases: int = 2
    max_neighbours: int = 3  # neighbour prompts for GL; the first two also get a chat question (NC)
    chat_neighbours: int = 2


@dataclass(frozen=True)
class GenScores:
    """One case's generation scores (0..1) and the texts behind them."""

    ge: float
    gp: float | None
    gl: float | None
    ce: float | None  # None: the tokenizer has no chat template
    co: float | None
    nc: float | None
    question: str
    reply: str
    completion: str
    neighbour_completions: tuple[str, ...] = ()
    neighbour_named_new: tuple[bool, ...] = ()  # did each neighbour chat reply name the new object
    texts: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | None]:
        return dict(zip(GEN_METRICS, (self.ge, self.gp, self.gl, self.ce, self.co, self.nc)))


def chat_question(case: Case) -> str:
    return question_for(case.relation, case.subject)


def neighbour_question(case: Case, prompt: str) -> str:
    if case.kind == ZSRE:
        text = re.sub(r"^\s*nq question:\s*", "", prompt).strip()
        return text[:1].upper() + text[1:] + ("" if text.endswith("?") else "?")
    return question_for_prompt(prompt)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_generation(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    case: Case,
    settings: GenSettings = GenSettings(),
    reference: GenScores | None = None,
) -> GenScores:
    """Generation scores on the current weights; ``reference`` is the unedited model's (``None``: this is it)."""
    paras = list(case.paraphrases[: settings.max_paraphrases])
    neighbours = list(case.neighbourhood[: settings.max_neighbours])
    done = greedy_completions(model, tok, [case.prompt, *paras, *neighbours], settings.completion_tokens)
    completion, para_done, neigh_done = done[0], done[1 : 1 + len(paras)], tuple(done[1 + len(paras) :])
    chat_neigh = neighbours[: settings.chat_neighbours]
    question = chat_question(case)
    has_chat = getattr(tok, "chat_template", None) is not None  # a base model: completions only
    asked = [question, *(neighbour_question(case, p) for p in chat_neigh)] if has_chat else []
    replies = chat_replies(model, tok, asked, settings.chat) or [""]
    named_new = tuple(names(r, case.target_new) for r in replies[1:])
    before_done = neigh_done if reference is None else reference.neighbour_completions
    before_named = named_new if reference is None else reference.neighbour_named_new
    return GenScores(
        ge=float(names(completion, case.target_new)),
        gp=_mean([float(names(c, case.target_new)) for c in para_done]),
        gl=_mean([float(normalise(a) == normalise(b)) for a, b in zip(neigh_done, before_done)]),
        ce=float(names(replies[0], case.target_new)) if has_chat else None,
        co=float(names_old(replies[0], case.target_true, case.target_new)) if has_chat else None,
        nc=_mean([float(not (now and not before)) for now, before in zip(named_new, before_named)]),
        question=question,
        reply=replies[0],
        completion=completion,
        neighbour_completions=neigh_done,
        neighbour_named_new=named_new,
        texts={"paraphrase_completions": para_done, "neighbour_replies": replies[1:]},
    )

"""Generation metrics on hand-made replies, the relation -> question builder, and the scoring on a tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest

from editing.evaluation.chat_metrics import GEN_METRICS, GenSettings, names, names_old, score_generation
from editing.evaluation.datasets import COUNTERFACT, Case, load_cases
from editing.generation import ChatSettings, chat_replies, chat_text, greedy_completions
from editing.questions import (
    RELATION_FOR_QUESTION, fact_from_question, question_for, question_for_prompt, question_template, split_prompt,
)
from tests.tiny import tiny_llama, tiny_tokenizer

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_dev.json"


@pytest.mark.parametrize(
    ("reply", "obj", "expected"),
    [
        ("Angela Merkel is a citizen of Canada.", "Canada", True),
        ("She is CANADIAN by birth.", "Canada", False),  # word boundary: Canadian is not Canada
        ("canada, of course", "Canada", True),  # case
        ("She lives in the United Kingdom.", "the United Kingdom", True),
        ("She lives in United Kingdom.", "the United Kingdom", True),  # article on either side
        ("She lives in the United Kingdom.", "United Kingdom", True),
        ("The UK.", "United Kingdom", False),  # no aliases
        ("Born in São Paulo.", "Sao Paulo", True),  # accents
        ("It is in Washington, D.C. now", "Washington, D.C.", True),  # punctuation
        ("Romeo and Juliet", "Rome", False),
        ("", "Rome", False),
        ("Rome", "", False),
    ],
)
def test_names_is_a_whole_word_match_ignoring_case_articles_and_accents(reply: str, obj: str, expected: bool) -> None:
    assert names(reply, obj) is expected


def test_old_object_inside_the_new_one_does_not_count() -> None:
    assert not names_old("She plays for Paris Saint-Germain.", "Paris", "Paris Saint-Germain")
    assert names_old("Paris Saint-Germain, not Paris.", "Paris", "Paris Saint-Germain")
    assert names_old("The Eiffel Tower is in Paris.", "Paris", "Rome")


@pytest.mark.parametrize(
    ("template", "question"),
    [
        ("{} is located in", "Where is {}?"),
        ("{} is a citizen of", "Which country is {} a citizen of?"),
        ("The mother tongue of {} is", "What language does {} speak?"),
        ("What is the twin city of {}? It is", "What is the twin city of {}?"),
        ("What is the product made by {}?", "What is the product made by {}?"),  # zsRE: already a question
        ("The favourite dish of {} is", "What is the favourite dish of {}?"),  # general "of" form
        ("{}'s best friend is", "What is the best friend of {}?"),  # general possessive form
        ("{} zorbles into", "Complete this sentence: {} zorbles into ..."),  # fallback
    ],
)
def test_question_template(template: str, question: str) -> None:
    assert question_template(template) == question


def test_question_for_fills_the_subject_and_refuses_bad_templates() -> None:
    assert question_for("{} is located in", "The Eiffel Tower") == "Where is the Eiffel Tower?"  # the article mid-sentence
    assert question_for("{} is located in", "The xx") == "Where is The xx?"  # not a capitalised name after it
    assert question_for("{} is located in", "Theodor Fontane") == "Where is Theodor Fontane?"
    with pytest.raises(ValueError, match="exactly one"):
        question_template("no slot here")
    with pytest.raises(ValueError, match="subject"):
        question_for("{} is in", " ")


def test_prompts_without_a_given_subject_are_split() -> None:
    assert split_prompt("John Lennon performs on the") == ("John Lennon", "{} performs on the")
    assert split_prompt("The mother tongue of Ella Fitzgerald is") == ("Ella Fitzgerald", "The mother tongue of {} is")
    assert question_for_prompt("In Vanuatu, the language spoken is") == "What language is spoken in Vanuatu?"
    assert question_for_prompt("zzz").startswith("Complete this sentence")


@pytest.mark.skipif(not DEV.is_file(), reason="needs ../shared/data/counterfact_dev.json")
def test_every_dev_relation_gets_a_question_about_its_subject() -> None:
    cases, _ = load_cases(DEV)
    relations = {c.relation for c in cases}
    assert len(relations) > 100
    questions = {r: question_template(r) for r in relations}
    assert all(q.count("{}") == 1 for q in questions.values())
    natural = [r for r, q in questions.items() if q.endswith("?")]
    assert len(natural) / len(relations) >= 0.95, sorted(set(relations) - set(natural))
    assert questions["{} is located in"] == "Where is {}?"


def test_generation_helpers_use_the_chat_template_and_stay_greedy() -> None:
    tok, model = tiny_tokenizer(), tiny_llama()
    assert chat_text(tok, [{"role": "user", "content": "where is rome"}]).endswith("assistant:")
    settings = ChatSettings(max_new_tokens=6)
    first = chat_replies(model, tok, ["where is rome", "where is paris"], settings)
    assert first == chat_replies(model, tok, ["where is rome", "where is paris"], settings) and len(first) == 2
    assert len(greedy_completions(model, tok, ["the tower is in", "rome"], 4)) == 2
    with pytest.raises(ValueError, match="repetition_penalty"):
        ChatSettings(repetition_penalty=0.5)


def test_score_generation_on_a_tiny_model() -> None:
    tok, model = tiny_tokenizer(), tiny_llama()
    case = Case(1, "paris", "{} is located in", "rome", "france", ("paris is in",), ("london is in",), "england",
                (), COUNTERFACT)  # fmt: skip
    settings = GenSettings(chat=ChatSettings(max_new_tokens=6), completion_tokens=4)
    base = score_generation(model, tok, case, settings)
    assert base.question == "Where is paris?" and base.gl == 1.0 and base.nc == 1.0  # the baseline against itself
    again = score_generation(model, tok, case, settings, reference=base)
    assert again.as_dict() == base.as_dict() and set(again.as_dict()) == set(GEN_METRICS)
    assert again.ge == float(names(again.completion, "rome")) and again.ce == float(names(again.reply, "rome"))


def test_correct_this_guesses_the_subject_and_relation_from_the_question() -> None:
    from chat_app.ui_chat import correct_this

    conv = [{"role": "user", "content": "Where is the Eiffel Tower?"}, {"role": "assistant", "content": "In Paris."}]
    subject, relation, tabs = correct_this(conv)
    assert subject == "the Eiffel Tower" and relation.value == "{} is located in" and tabs.selected == "form"
    assert fact_from_question("Which country is Angela Merkel a citizen of?") == ("Angela Merkel", "{} is a citizen of")
    assert fact_from_question("Tell me about Rome.") == ("Rome", None)
    for asked, relation in RELATION_FOR_QUESTION.items():  # the guess asks the same question again
        assert question_template(relation) == asked

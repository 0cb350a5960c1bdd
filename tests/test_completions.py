"""Probe completions: batched equals one by one; the preview's answers reused by apply give the same table."""
from __future__ import annotations

from pathlib import Path

import pytest

from chat_app.completions import CompletionCache, complete_batch, weights_state
from chat_app.probes import answer, chat_question, complete
from editing import EditRequest
from tests.service_helpers import start

REQUEST = EditRequest("The Eiffel tower", "{} is located in the city of", "rome")
PARAPHRASES = ["Some text here. The Eiffel tower is in"]
NEIGHBOURS = ["The Colosseum is located in the city of", "Big Ben is in"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_batch_of_prompts_of_different_lengths_completes_as_each_alone(tmp_path: Path) -> None:
    service = start(tmp_path / "l.db")
    prompts = [REQUEST.prompt, *PARAPHRASES, *NEIGHBOURS, "the"]
    alone = [complete(service.model, service.tok, p) for p in prompts]
    assert complete_batch(service.model, service.tok, prompts) == alone
    assert len(set(alone)) > 1, "the prompts must not all complete alike, or the test proves little"


def test_reusing_the_previews_answers_gives_the_same_before_after_table(tmp_path: Path) -> None:
    cached = start(tmp_path / "a.db")
    cached.preview(REQUEST.prompt)
    result = cached.apply(REQUEST, paraphrases=PARAPHRASES, neighbours=NEIGHBOURS)
    assert cached.completions.hits >= 1, "apply must reuse the preview's answer"

    plain = start(tmp_path / "b.db")  # the same model: answers one by one, nothing remembered
    prompts = [REQUEST.prompt, *PARAPHRASES, *NEIGHBOURS]
    before = [complete(plain.model, plain.tok, p) for p in prompts]
    plain.completions = CompletionCache(max_items=0)
    plain.apply(REQUEST, paraphrases=PARAPHRASES, neighbours=NEIGHBOURS)
    after = [complete(plain.model, plain.tok, p) for p in prompts]
    assert [(p.before, p.after) for p in result.probes if p.kind != "chat"] == list(zip(before, after))


def test_the_previews_chat_reply_is_the_chat_rows_before_and_the_after_is_remembered(tmp_path: Path) -> None:
    service = start(tmp_path / "a.db")
    question = chat_question(REQUEST.subject, REQUEST.relation)
    service.preview(REQUEST.prompt, question=question)
    hits = service.completions.hits
    result = service.apply(REQUEST)
    chat = result.probes[-1]
    assert chat.kind == "chat" and chat.prompt == question
    assert service.completions.hits >= hits + 2, "apply must reuse the preview's completion and its chat reply"
    plain = start(tmp_path / "b.db")  # the same model, nothing remembered
    assert chat.before and chat.before == answer(plain.model, plain.tok, question, "chat")
    misses = service.completions.misses
    service.preview(REQUEST.prompt, question=question)  # the form's preview after Apply
    assert service.completions.misses == misses, "the after-answers must be remembered"
    assert service.completions.answers(service.editor, [question], "chat") == [answer(service.model, service.tok,
                                                                                      question, "chat")]  # fmt: skip


def test_answers_follow_the_weights_through_apply_and_revert(tmp_path: Path) -> None:
    service = start(tmp_path / "l.db")
    empty = weights_state(service.editor)
    first, _ = service.preview(REQUEST.prompt)
    result = service.apply(REQUEST)
    assert weights_state(service.editor) != empty
    now, _ = service.preview(REQUEST.prompt)
    assert now == result.probes[0].after == complete(service.model, service.tok, REQUEST.prompt)
    service.revert(result.edit_id)
    assert weights_state(service.editor) == empty
    assert service.preview(REQUEST.prompt)[0] == first == complete(service.model, service.tok, REQUEST.prompt)


def test_the_cache_forgets_the_oldest_answers_beyond_its_size() -> None:
    cache = CompletionCache(max_items=2)
    for n in range(3):
        cache.put((), f"p{n}", f"a{n}")
    assert cache.remembered((), "p0") is None and cache.remembered((), "p2") == "a2"

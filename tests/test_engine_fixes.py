"""Engine fixes of issue 14: the traced answer token, per-edit templates and seed."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from editing import EditRequest, RomeEditor
from editing.tracing import trace
from tests.bpe import bpe_tokenizer
from tests.tiny import tiny_editor, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared machine
    yield
    torch.set_num_threads(before)


def test_trace_scores_the_first_answer_token_when_the_tokenizer_adds_eos() -> None:
    tok = bpe_tokenizer(add_bos=True, add_eos=True)  # "<s> … </s>": prompt alone is one token longer than its part
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    prompt, subject = "The Eiffel tower is in", "The Eiffel tower"
    result = trace(model, tok, prompt, subject, "paris rome", samples=1, noise=0.5, kinds=("mlp",), window=1)
    first = tok(f"{prompt} paris rome", add_special_tokens=False)["input_ids"][len(tok(prompt, add_special_tokens=False)["input_ids"])]
    assert tok.decode([first]).strip() == "paris" and result.answer_id == first


def test_per_edit_templates_and_seed_are_used(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path))
    tok = tiny_tokenizer()
    editor = tiny_editor(tiny_llama(), tok, layer=2)
    request = EditRequest("The Eiffel tower", "Located in {}", "rome")
    override = {"templates": ((3, 2),), "seed": 5}
    custom = editor.context_templates(editor.hparams.replace(**override))
    assert len(custom) == 3 and custom != editor.context_templates()
    edit = editor.compute(request, **override)
    assert edit.hparams["templates"] == ((3, 2),) and edit.hparams["seed"] == 5
    # an editor whose defaults are those settings computes the same edit; the default settings another one
    same = RomeEditor(editor.model, tok, editor.hparams.replace(**override), fingerprint=editor.fingerprint)
    same._covs = editor._covs  # noqa: SLF001 - the same statistics
    assert torch.allclose(same.compute(request).key_dir, edit.key_dir)
    assert not torch.allclose(editor.compute(request).key_dir, edit.key_dir)

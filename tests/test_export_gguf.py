"""GGUF export: a tiny Llama written as GGUF in-test (its MLP output projections Q8_0), edited, written back."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from chat_app.service import EditService
from chat_app.startup import replay
from db import Ledger
from editing import EditRequest
from editing.gguf_export import write_gguf
from tests.tiny import tiny_editor, tiny_llama, tiny_tokenizer

gguf = pytest.importorskip("gguf")
PROMPTS = ["The Eiffel tower is located in", "Big Ben is in the city of"]


def write_tiny_gguf(path: Path) -> None:
    """The tiny Llama as a GGUF file: F32 tensors, but Q8_0 for ``mlp.down_proj`` (the rewritten matrices)."""
    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if name.endswith("mlp.down_proj.weight"):
            quantised = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    batch = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    model.requires_grad_(False)
    service = EditService(tiny_editor(model, tiny_tokenizer(), steps=3), Ledger.open(root / "ledger.db"),
                          source=str(root / "tiny.gguf"))  # fmt: skip
    service.min_target_prob = 0.0
    replay(service)
    ids = [service.apply(EditRequest("The Eiffel tower", "{} is located in", "rome", 1)).edit_id,
           service.apply(EditRequest("Big Ben", "{} is in the city of", "paris", 2)).edit_id]  # fmt: skip
    return {"service": service, "root": root, "ids": ids}


def test_gguf_export_copies_the_file_and_replaces_only_the_edited_matrices(app: dict[str, Any]) -> None:
    service, root = app["service"], app["root"]
    done = service.export_model(root / "out", "gguf")
    assert done.files == ("README.md", "tiny-edited.gguf")
    source, written = gguf.GGUFReader(root / "tiny.gguf"), gguf.GGUFReader(done.path / "tiny-edited.gguf")
    assert {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")} == {
        k: f.contents() for k, f in written.fields.items() if not k.startswith("GGUF.")
    }
    edited = {"blk.1.ffn_down.weight", "blk.2.ffn_down.weight"}
    for old, new in zip(source.tensors, written.tensors):
        assert old.name == new.name
        if new.name in edited:
            assert new.tensor_type == gguf.GGMLQuantizationType.F32
        else:
            assert new.tensor_type == old.tensor_type and bytes(new.data) == bytes(old.data)
    reloaded = AutoModelForCausalLM.from_pretrained(done.path, gguf_file="tiny-edited.gguf", dtype=torch.float32)
    assert (_logits(reloaded.eval()) - _logits(service.model)).abs().max() <= 1e-5
    assert "llama-cli" in (done.path / "README.md").read_text()


def test_gguf_export_of_a_subset_and_refusal_of_a_mismatched_file(app: dict[str, Any], tmp_path: Path) -> None:
    service, root = app["service"], app["root"]
    done = service.export_model(tmp_path / "first", "gguf", [app["ids"][0]])
    written = {t.name: t for t in gguf.GGUFReader(done.path / "tiny-edited.gguf").tensors}
    assert written["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert written["blk.2.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # left as it was
    name = "model.layers.1.mlp.down_proj.weight"
    base = service.editor.weights_with([])[name]
    with pytest.raises(ValueError, match="does not hold the model's unedited weights"):
        write_gguf(root / "tiny.gguf", tmp_path / "bad.gguf", {name: base}, {name: base + 1e-3})
    assert not (tmp_path / "bad.gguf").exists()


def test_hf_export_of_a_gguf_loaded_model_is_a_plain_checkpoint(app: dict[str, Any]) -> None:
    """transformers refuses to save a GGUF-loaded model and its config names the quantisation: neither leaks out."""
    import json

    service, root = app["service"], app["root"]
    assert getattr(service.model, "hf_quantizer", None) is not None  # as the app's GGUF models are
    done = service.export_model(root / "hf", "hf")
    assert "quantization_config" not in json.loads((done.path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(done.path, dtype=torch.float32).eval()
    assert getattr(loaded, "hf_quantizer", None) is None
    assert (_logits(loaded) - _logits(service.model)).abs().max() <= 1e-5

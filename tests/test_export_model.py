"""Export of the edited model (hf, peft, gguf refusal) on a tiny Llama and a tiny GPT-2."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat_app.service import EditService
from chat_app.startup import replay
from db import Ledger
from editing import EditRequest
from editing.fingerprint import tensor_checksum
from tests.tiny import tiny_editor, tiny_gpt2, tiny_llama, tiny_tokenizer

FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
REQUESTS = [  # two edits of layer 1, one of layer 2: ranks 2 and 1
    EditRequest("The Eiffel tower", "{} is located in", "rome", 1),
    EditRequest("Big Ben", "{} is in the city of", "paris", 1),
    EditRequest("The Colosseum", "{} is located in", "london", 2),
]
PROMPTS = ["The Eiffel tower is located in", "Big Ben is in the city of", "The Colosseum is located in the city"]


def _state(model: torch.nn.Module) -> dict[str, str]:
    return {k: tensor_checksum(v) for k, v in model.state_dict().items()}


def _logits(model: torch.nn.Module, tok: Any) -> torch.Tensor:
    """Logits at the prompts' real tokens (those at padding positions mean nothing and depend on the attention kernel)."""
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    return logits * batch["attention_mask"][..., None]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A service over a tiny model saved to disk (its source), with the three edits applied."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    tok, model = tiny_tokenizer(), FAMILIES[request.param]()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    service = EditService(tiny_editor(model, tok, steps=3), Ledger.open(root / "ledger.db"), source=str(root / "base"))
    service.min_target_prob = 0.0
    replay(service)
    ids = [service.apply(r).edit_id for r in REQUESTS]
    return {"service": service, "ids": ids, "root": root, "family": request.param}


def test_hf_export_loads_with_transformers_and_matches_the_app(app: dict[str, Any]) -> None:
    service, root = app["service"], app["root"]
    weights, events = _state(service.model), len(service.events())
    done = service.export_model(root / "hf")
    assert _state(service.model) == weights and len(service.events()) == events  # nothing changed
    assert done.edit_ids == tuple(app["ids"]) and {"model.safetensors", "config.json", "README.md"} <= set(done.files)
    loaded = AutoModelForCausalLM.from_pretrained(done.path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(done.path)
    assert [tok(p)["input_ids"] for p in PROMPTS] == [service.tok(p)["input_ids"] for p in PROMPTS]
    assert (_logits(loaded, service.tok) - _logits(service.model, service.tok)).abs().max() <= 1e-5
    assert (done.path / "generation_config.json").is_file()
    card = (done.path / "README.md").read_text()
    for edit_id, request in zip(app["ids"], REQUESTS):
        assert f"| {edit_id} | {request.subject} |" in card and request.target in card
    assert service.record(app["ids"][0]).fingerprint[:16] in card and "r-ROME" in card


def test_peft_export_adds_the_edits_exactly_on_the_base(app: dict[str, Any]) -> None:
    from peft import PeftModel

    service, root = app["service"], app["root"]
    weights = _state(service.model)
    done = service.export_model(root / "peft", "peft")
    assert _state(service.model) == weights
    config = json.loads((done.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(root / "base")  # resolvable: the test loads it from there
    layer1 = next(n for n in config["target_modules"] if ".1." in n)
    assert config["r"] == config["lora_alpha"] and config["rank_pattern"].get(layer1, config["r"]) == 2
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, done.path).eval()
    assert (_logits(adapted, service.tok) - _logits(service.model, service.tok)).abs().max() <= 1e-5
    merged = adapted.merge_and_unload().state_dict()
    hf_dir = root / "hf-for-merge"
    service.export_model(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    assert merged.keys() == hf.keys()
    assert max((merged[k] - hf[k]).abs().max().item() for k in hf) <= 1e-6


def test_ids_export_holds_only_those_edits(app: dict[str, Any]) -> None:
    service, root = app["service"], app["root"]
    first, _, third = app["ids"]
    done = service.export_model(root / "subset", "hf", [third, first])
    assert done.edit_ids == (first, third)  # ledger order, whatever the order asked
    loaded = AutoModelForCausalLM.from_pretrained(done.path, dtype=torch.float32).state_dict()
    edits = [service._edits[i] for i in (first, third)]  # noqa: SLF001 - the live edit objects
    expected = service.editor.weights_with(edits)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
    layer1 = service._edits[first].param_name  # noqa: SLF001
    assert not torch.equal(loaded[layer1], service.model.state_dict()[layer1])  # the second edit is left out
    card = (done.path / "README.md").read_text()
    assert "Big Ben" not in card and "The Colosseum" in card
    base = service.export_model(root / "base-only", "hf", [])
    assert base.edit_ids == () and "No edits" in (base.path / "README.md").read_text()


def test_export_refuses_what_it_cannot_write(app: dict[str, Any]) -> None:
    service, root = app["service"], app["root"]
    with pytest.raises(ValueError, match="GGUF file.*convert_hf_to_gguf"):
        service.export_model(root / "g", "gguf")
    with pytest.raises(ValueError, match="not applied"):
        service.export_model(root / "missing", "hf", [999])
    with pytest.raises(ValueError, match="no edits"):
        service.export_model(root / "empty-adapter", "peft", [])
    with pytest.raises(ValueError, match="unknown export format"):
        service.export_model(root / "x", "onnx")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        service.export_model(root / "full")
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".g", ".missing", ".empty", "g", "missing"))) == []


def test_cli_export_model_and_the_history_button(app: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import app as app_module
    from chat_app.ui_handlers import Handlers

    root, first = app["root"], app["ids"][0]
    argv = ["--model", str(root / "base"), "--db", str(root / "ledger.db"), "export-model", str(root / "cli-peft"),
            "--format", "peft", "--ids", str(first), "--json"]  # fmt: skip
    assert app_module.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["edit_ids"] == [first] and "adapter_model.safetensors" in out["files"]
    monkeypatch.setenv("ROME_CHAT_DATA", str(root / "data"))
    text = Handlers(app["service"]).export_model("hf", f"{first}")
    written = next((root / "data" / "exports").iterdir())
    assert str(written) in text and f"#{first}" in text and (written / "model.safetensors").is_file()


def test_read_only_commands_open_the_ledger_without_torch(app: dict[str, Any], tmp_path: Path) -> None:
    """``history`` and the edit-pack ``export`` run in a process that never imports torch (no model load)."""
    import subprocess
    import sys

    root = app["root"]
    code = (
        "import sys, app\n"
        f"assert app.main(['--db', {str(root / 'ledger.db')!r}, 'history', '--json']) == 0\n"
        f"assert app.main(['--db', {str(root / 'ledger.db')!r}, 'export', {str(tmp_path / 'pack.zip')!r}]) == 0\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'a model library was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"subject": "The Colosseum"' in done.stdout and (tmp_path / "pack.zip").stat().st_size > 0


def test_history_tab_offers_the_model_export(app: dict[str, Any]) -> None:
    from chat_app.ui import build_ui

    demo = build_ui(app["service"])
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert "export_model" in names
    buttons = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "history-export-model"]
    assert len(buttons) == 1 and buttons[0].interactive

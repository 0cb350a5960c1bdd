"""A model placed by a device map (accelerate): the edit engine finds the edited layer wherever it sits.

Here every device is the CPU, so these tests check the placed code paths (accelerate's hooks on every
module, ``load_model(device_map=...)``, the offload store), not transfers between real devices.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model

from chat_app.service import EditService
from chat_app.startup import replay
from db import Ledger
from editing import EditRequest, load_model
from editing.fingerprint import model_fingerprint
from tests.tiny import tiny_editor, tiny_llama, tiny_tokenizer

A = EditRequest("The Eiffel tower", "{} is located in the city of", "rome")
B = EditRequest("Big Ben", "{} is located in the city of", "paris")
LAYER = 1
MODULES = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm", "model.rotary_emb", "lm_head"]


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny Llama (seed 0) and its tokenizer saved as a model folder; the cache in ``tmp_path``."""
    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model"
    tiny_llama(0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def placed(kind: str, folder: Path) -> torch.nn.Module:
    """The tiny Llama placed by a device map: ``auto``, a dict naming every module, or accelerate's hooks on all."""
    if kind == "hooks":
        model = tiny_llama(0)
        dispatch_model(model, {name: "cpu" for name in MODULES}, force_hooks=True)
        assert hasattr(model.model.layers[LAYER].mlp.down_proj, "_hf_hook")
        return model
    return load_model(folder, device_map="auto" if kind == "auto" else {name: "cpu" for name in MODULES})[0]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter held on a device (offloaded ones sit on ``meta``, their values elsewhere)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.device.type != "meta"}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def service(model: torch.nn.Module, ledger: Path) -> EditService:
    svc = EditService(tiny_editor(model, tiny_tokenizer(), layer=LAYER), Ledger.open(ledger))
    svc.min_target_prob = 0.0  # tiny random models cannot become confident
    replay(svc)
    return svc


@pytest.mark.parametrize("kind", ["auto", "dict", "hooks"])
def test_placed_model_edits_reverts_and_replays_exactly(kind: str, folder: Path, tmp_path: Path) -> None:
    reference = tiny_editor(tiny_llama(0), tiny_tokenizer(), layer=LAYER).compute(A)
    model = placed(kind, folder)
    editor = tiny_editor(model, tiny_tokenizer(), layer=LAYER)
    assert editor.fingerprint == reference.fingerprint
    edit = editor.compute(A)
    # The same factors as on the unplaced model, to float rounding (bit for bit when run alone; within the
    # whole suite, threads or memory layout left by earlier tests can change the last bits).
    for ours, theirs in ((edit.value_dir, reference.value_dir), (edit.key_dir, reference.key_dir)):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), float((ours - theirs).abs().max())
    before = state(model)
    editor.apply(edit)
    assert not same(state(model), before)
    editor.revert(edit)
    assert same(state(model), before)

    svc = service(model, tmp_path / "ledger.db")
    svc.apply(A)
    svc.apply(B)
    edited = state(model)
    restarted = service(placed(kind, folder), tmp_path / "ledger.db")
    assert same(state(restarted.model), edited)
    assert not svc.integrity_problems() and not restarted.integrity_problems()


def test_views_and_plain_forward_under_hooks(folder: Path) -> None:
    """``view`` swaps weights inside hooked modules; the reference forward agrees with the fast one there."""
    model = placed("hooks", folder)
    editor = tiny_editor(model, tiny_tokenizer(), layer=LAYER)
    edit = editor.compute(A)
    ids = torch.tensor([[3, 4, 5, 6]])
    base_logits = model(input_ids=ids).logits
    editor.apply(edit)
    with editor.view(without=[edit]):
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    editor.revert(edit)
    editor.method = "plain"
    assert torch.allclose(editor.compute(A).value_dir, edit.value_dir, atol=1e-4)


def test_offloaded_layer_is_refused_and_others_edit(folder: Path, tmp_path: Path) -> None:
    device_map = {name: "disk" if name == "model.layers.2" else "cpu" for name in MODULES}
    model, tok = load_model(folder, device_map=device_map)
    assert model.get_parameter("model.layers.2.mlp.down_proj.weight").device.type == "meta"
    editor = tiny_editor(model, tok, layer=LAYER)  # statistics run through the offloaded block
    assert editor.fingerprint == model_fingerprint(tiny_llama(0))  # offloaded weights read from the offload store
    before = state(model)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj\.weight is offloaded to 'disk'"):
        editor.compute(A, layer=2)
    foreign = tiny_editor(tiny_llama(0), tiny_tokenizer(), layer=2).compute(A)  # same model, made elsewhere
    with pytest.raises(ValueError, match="offloaded"):
        editor.apply(foreign)
    with pytest.raises(ValueError, match="offloaded"):
        editor.rebuild([foreign])
    assert same(state(model), before) and not editor.applied
    edit = editor.compute(A)  # layer 1 sits on the CPU: editable
    editor.apply(edit)
    editor.revert(edit)
    assert same(state(model), before)


def test_device_map_arguments_are_checked(folder: Path) -> None:
    with pytest.raises(ValueError, match="either --device or --device-map"):
        load_model(folder, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="--device-map must be one of"):
        load_model(folder, device_map="everywhere")


def test_cli_takes_device_map() -> None:
    from app import main, parse_args

    assert parse_args(["--device-map", "auto", "history"]).device_map == "auto"
    with pytest.raises(SystemExit, match="either --device or --device-map"):
        main(["--device", "cpu", "--device-map", "auto", "history"])

"""``--mode batch``: the sampled cases edited together with MEMIT, scored after the batch, on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editing import RomeEditor
from editing.evaluation.cli import format_table, main
from editing.evaluation.datasets import load_cases
from editing.evaluation.evaluate import UNEDITED, run_evaluation
from editing.evaluation.metrics import METRICS, GenerationSettings, score_case
from tests.test_evaluate import FIXTURES, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return word_tokenizer()


def _editor(model: torch.nn.Module, tok) -> RomeEditor:  # type: ignore[no-untyped-def]
    """Statistics stubbed at every layer and fixed templates, so no corpus is read."""
    editor = RomeEditor(model, tok)
    editor.hparams = editor.hparams.replace(steps=8, layer=2)
    for layer in range(editor.n_layers):
        editor._covs[(layer, editor.hparams.stats_samples)] = torch.eye(model.config.intermediate_size, dtype=torch.float64)
    editor._templates = ["{}", "Hello. {}"]
    return editor


def _cases():  # type: ignore[no-untyped-def]
    return load_cases(FIXTURES / "counterfact_original.json")[0] + load_cases(FIXTURES / "counterfact_flat.json")[0]


@pytest.mark.parametrize("size", [None, 2])
def test_batch_mode_scores_the_cases_after_the_batches(tok, size: int | None) -> None:
    model = tiny_llama(tok, layers=4)  # an edit at layer 2 has blocks above it to carry it
    editor = _editor(model, tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    no_text = GenerationSettings(max_new_tokens=0)
    result = run_evaluation(model, tok, editor, _cases(), "batch", n=3, seed=0, generation=no_text,
                            rome_overrides={"batch_layers": [1, 2], "mom2_weight": 1.0}, batch_size=size)  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not editor.applied
    assert list(result.rows) == [UNEDITED, "MEMIT"] and len(result.cases) == 3
    assert all(set(row) == set(METRICS) for row in result.rows.values())
    info = result.config["batch"]
    assert info["batches"] == ([3] if size is None else [2, 1]) and info["layers"] == [1, 2]
    assert info["seconds_per_fact"] > 0 and len(result.update_norms["MEMIT"]) == 3
    # The MEMIT row is what the batches give when computed and applied by hand.
    requests = [r.case.request() for r in result.cases]
    for start in range(0, 3, size or 3):
        editor.apply(editor.compute_batch(requests[start : start + (size or 3)], batch_layers=(1, 2), mom2_weight=1.0))
    for r in result.cases:
        assert score_case(model, tok, r.case, no_text, 0).em == pytest.approx(r.scores["MEMIT"].em, abs=1e-5)
        assert abs(r.scores["MEMIT"].em - r.scores[UNEDITED].em) > 1e-6
    assert "MEMIT: 3 facts" in format_table(result)
    with pytest.raises(ValueError, match="batch size"):
        run_evaluation(model, tok, RomeEditor(model, tok), _cases(), "batch", n=1, batch_size=0)


def test_cli_batch_mode_writes_json(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import editing.evaluation.cli as evaluate
    import editing.loading as loading

    model = tiny_llama(tok, layers=4)  # an edit at layer 2 has blocks above it to carry it
    monkeypatch.setattr(loading, "load_model", lambda source=None, device_map=None: (model, tok))
    monkeypatch.setattr(evaluate, "RomeEditor", _editor)
    out = tmp_path / "out.json"
    argv = ["--data", str(FIXTURES / "counterfact_flat.json"), "--n", "2", "--mode", "batch", "--layers", "1", "2",
            "--batch-size", "1", "--set", "mom2_weight=1.0", "--gen-tokens", "0", "--chat-tokens", "0",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert list(data["aggregates"]) == [UNEDITED, "MEMIT"] and data["layer"] == 2 and data["mode"] == "batch"
    assert data["config"]["batch"]["batches"] == [1, 1] and data["config"]["batch"]["layers"] == [1, 2]
    assert data["config"]["hparams"]["layer"] == 2
    assert "s per fact" in capsys.readouterr().out
    assert main([*argv[:6], "--layers", "1", "--layer", "0"]) == 2  # --layer must end --layers
    assert main(["--data", argv[1], "--layers", "1", "2"]) == 2  # --layers without --mode batch

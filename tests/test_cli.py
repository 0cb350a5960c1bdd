"""The command line on a tiny model saved to disk: edit, history, revert, reapply, verify, export, import."""
from __future__ import annotations

import json

import pytest
import torch

import app
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def run(model_dir, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("chat_app.service.MIN_TARGET_PROB", 0.0)
    db = tmp_path / "ledger.db"

    def invoke(*argv: str) -> tuple[int, str, str]:
        code = app.main(["--model", str(model_dir), "--db", str(db), *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def test_cli_edit_history_revert_reapply_verify_export_import(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run("edit", "--subject", "The Eiffel tower", "--relation", "Located in {}", "--target", "rome", "--json")
    assert code == 0
    edit = json.loads(out)
    assert edit["status"] == "applied" and edit["layer"] == 1 and edit["probes"][0]["kind"] == "edited"
    code, out, _ = run("history", "--json")
    rows = json.loads(out)
    assert code == 0 and [(r["id"], r["status"], r["target"]) for r in rows] == [(edit["id"], "applied", "rome")]
    assert {"id", "status", "subject", "relation", "target", "layer", "author"} <= rows[0].keys()
    assert rows[0]["author"] == "app"  # the CLI records its actor as the author
    code, out, _ = run("history")
    assert code == 0 and "The Eiffel tower" in out and "status" in out  # a readable table
    assert run("revert", str(edit["id"]))[0] == 0
    assert json.loads(run("history", "--json")[1])[0]["status"] == "reverted"
    assert run("reapply", str(edit["id"]))[0] == 0
    code, out, _ = run("verify", "--integrity", "--json")
    assert json.loads(out)["integrity_problems"] == []
    export = tmp_path / "out.zip"
    assert run("export", str(export))[0] == 0 and export.stat().st_size > 0
    code, out, _ = run("import", str(export), "--json")
    assert code == 0 and json.loads(out) == {"imported": [], "skipped": 1, "ignored": 0}


def test_cli_edit_chooses_the_update_rule(run) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run("edit", "--subject", "The Colosseum", "--relation", "Located in {}", "--target", "oslo",
                       "--update", "alphaedit")  # fmt: skip
    # AlphaEdit reached the engine: the tiny model's statistics have no eigenvalue below its threshold
    assert code == 2 and "null-space threshold" in err
    code, out, _ = run("edit", "--subject", "Big Ben", "--relation", "Located in {}", "--target", "rome", "--json")
    assert code == 0 and "cache_keys" not in json.loads(out)["stats"]  # the default: r-ROME, no key cache
    assert [r["subject"] for r in json.loads(run("history", "--json")[1])] == ["Big Ben"]  # the refusal changed nothing
    code, out, _ = run("edit", "--subject", "The Colosseum", "--relation", "Located in {}", "--target", "oslo",
                       "--update", "memit", "--json")  # fmt: skip
    shown = json.loads(out)
    assert code == 0 and shown["batch_id"] and len(shown["stats"]["layers"]) > 1  # a batch of one over several layers
    history = json.loads(run("history", "--json")[1])
    assert [r["subject"] for r in history] == ["The Colosseum", "Big Ben"] and history[0]["batch_id"] == shown["batch_id"]
    assert history[0]["layers"] == shown["stats"]["layers"] and history[1]["layers"] == [history[1]["layer"]]
    table = run("history")[1].splitlines()[2]  # the text table names every layer the fact changes
    layers = shown["stats"]["layers"]
    assert table.startswith("2 ") and f" {min(layers)}–{max(layers)} " in table
    code, _, err = run("edit", "--subject", "Big Ben", "--relation", "Located in {}", "--target", "oslo",
                       "--update", "alphaedit-layers")  # fmt: skip
    assert code == 2 and "null-space threshold" in err  # AlphaEdit's solve at each layer reached the engine
    with pytest.raises(SystemExit):  # not an update rule: argparse refuses it
        run("edit", "--subject", "x", "--relation", "{} y", "--target", "z", "--update", "rank-two")


def test_cli_errors_exit_non_zero_with_a_message(run) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run("edit", "--subject", "x", "--relation", "no slot", "--target", "y")
    assert code == 2 and "exactly one {}" in err
    code, _, err = run("revert", "99")
    assert code == 2 and "99" in err
    code, _, err = run("import", "/nonexistent/file.zip")
    assert code == 2 and "error:" in err


def test_cli_trace_saves_a_picture_and_names_the_layer(run, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("editing.tracing.embedding_std", lambda *_a, **_k: 0.3)  # no corpus read
    out_png = tmp_path / "trace.png"
    prompt = ("--prompt", "The Eiffel tower is in")
    code, out, _ = run("trace", *prompt, "--subject", "The Eiffel tower", "--out", str(out_png))
    assert code == 0 and out_png.stat().st_size > 1000
    assert "suggested layer" in out and str(out_png) in out
    code, out, _ = run("trace", *prompt, "--subject", "The Eiffel tower", "--out", str(out_png), "--precision", "float32")
    assert code == 0 and "float32" in out
    code, out, err = run("trace", *prompt, "--subject", "Big Ben", "--out", str(out_png))
    assert code == 2 and "error:" in err and out == ""  # errors go to stderr


def test_cli_trace_traces_the_edited_model(run, model_dir, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import editing.tracing
    from editing import load_model

    monkeypatch.setattr("editing.tracing.embedding_std", lambda *_a, **_k: 0.3)  # no corpus read
    seen = []
    real = editing.tracing.trace
    monkeypatch.setattr(editing.tracing, "trace", lambda model, *a, **k: seen.append(
        {n: p.clone() for n, p in model.state_dict().items()}) or real(model, *a, **k))  # fmt: skip
    base = load_model(model_dir)[0].state_dict()
    args = ("trace", "--prompt", "The Eiffel tower is in", "--subject", "The Eiffel tower", "--out", str(tmp_path / "t.png"))
    assert run(*args)[0] == 0
    assert all(torch.equal(seen[-1][n], base[n]) for n in base)  # an empty ledger: the base model
    assert run("edit", "--subject", "The Eiffel tower", "--relation", "Located in {}", "--target", "rome")[0] == 0
    code, out, _ = run(*args)
    assert code == 0 and "1 applied edits" in out
    changed = [n for n in base if not torch.equal(seen[-1][n], base[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]  # the edit's layer, replayed from the ledger

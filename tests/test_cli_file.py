"""``app.py edit --file`` on a tiny model: dry run, apply, and a refused file that applies nothing."""
from __future__ import annotations

import json

from tests.test_cli import model_dir, run  # noqa: F401 - pytest fixtures

GOOD = [
    {"subject": "The Eiffel tower", "relation": "Located in {}", "target": "rome"},
    {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum", "target_new": "london"},
]


def test_edit_file_dry_run_then_apply(run, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    code, out, _ = run("edit", "--file", str(path), "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and report["applied"] == 0 and [f["status"] for f in report["facts"]] == ["would apply"] * 2
    assert json.loads(run("history", "--json")[1]) == []
    code, out, _ = run("edit", "--file", str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["applied"] == 2
    assert report["facts"][1]["relation"] == "{} is located in the city of"
    history = json.loads(run("history", "--json")[1])
    assert sorted(r["target"] for r in history if r["status"] == "applied") == ["london", "rome"]


def test_refused_file_applies_nothing_and_names_the_lines(run, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    path = tmp_path / "facts.csv"
    path.write_text("subject,relation,target\nThe Eiffel tower,Located in {},rome\nBig Ben,is in,paris\n"
                    "The Eiffel tower,Located in {},london\n")  # fmt: skip
    code, _, err = run("edit", "--file", str(path))
    assert code == 2 and "line 3" in err and "line 4" in err and "nothing applied" in err
    assert json.loads(run("history", "--json")[1]) == []
    layer_path = tmp_path / "layer.jsonl"
    layer_path.write_text(json.dumps({**GOOD[0], "layer": 99}) + "\n")
    code, _, err = run("edit", "--file", str(layer_path))
    assert code == 2 and "line 1" in err and "out of range" in err
    assert json.loads(run("history", "--json")[1]) == []


def test_edit_file_as_one_batch_then_revert_and_reapply_the_batch(run, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(GOOD))
    code, out, _ = run("edit", "--file", str(path), "--batch", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["applied"] == 0 and json.loads(run("history", "--json")[1]) == []
    code, out, _ = run("edit", "--file", str(path), "--batch", "--json")
    report = json.loads(out)
    batch = report["batch_id"]
    assert code == 0 and report["applied"] == 2 and {f["batch_id"] for f in report["facts"]} == {batch}
    assert all(f["status"].startswith("applied") and f["before"] is not None for f in report["facts"])
    history = json.loads(run("history", "--batch", batch, "--json")[1])
    assert sorted((r["batch_index"], r["batch_size"], r["status"]) for r in history) == [(0, 2, "applied"), (1, 2, "applied")]
    code, out, _ = run("revert", "--batch", batch, "--json")
    assert code == 0 and [r["status"] for r in json.loads(out)] == ["reverted", "reverted"]
    code, out, _ = run("reapply", "--batch", batch, "--json")
    assert code == 0 and [r["status"] for r in json.loads(out)] == ["applied", "applied"]
    code, out, _ = run("verify", "--integrity", "--json")
    assert json.loads(out)["integrity_problems"] == []  # a fresh process replayed the batch's stored shares
    code, _, err = run("revert", "--json")
    assert code == 2 and "--batch" in err
    code, _, err = run("edit", "--subject", "x", "--relation", "{} is", "--target", "y", "--batch")
    assert code == 2 and "--file" in err

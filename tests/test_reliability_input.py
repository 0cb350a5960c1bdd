"""Bad input wherever it enters (service, CLI, import file): a clear, specific error, and nothing changes.

"Nothing changes" is checked the same way everywhere: the digest of every weight, and the ledger's
rows, are what they were before the bad input arrived.
"""
from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import normalizers

from chat_app import ui_render
from chat_app.service import EditService
from chat_app.transfer import export_file, import_file
from editing import EditRequest, RomeHyperParams
from editing.request import MAX_FIELD_CHARS
from tests.export_files import in_manifest, rewrite, set_entry, set_meta
from tests.reliability_helpers import Unchanged, cli_runner, digest, fast_service, one_thread, tiny_app_on_disk
from tests.tiny import tiny_tokenizer

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = "x" * 10_000
HOSTILE = "<img src=x onerror=alert(1)> **bold** [link](javascript:alert(1)) <script>alert(1)</script>"
GOOD = {"subject": "The Eiffel tower", "relation": "Located in {}", "target": "rome"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditService]:
    """One service for the module: every test leaves it as it found it (that is what is tested)."""
    with one_thread():
        yield fast_service(tmp_path_factory.mktemp("input") / "ledger.db")


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid export of two edits made on the same model in another ledger."""
    folder = tmp_path_factory.mktemp("export")
    with one_thread():
        source = fast_service(folder / "source.db")
        source.apply(EditRequest("Big Ben", "{} is in", "paris"))
        source.apply(EditRequest("The Colosseum", "Located in {}", "london"))
        export_file(source, folder / "edits.zip")
    return folder / "edits.zip"


def request_args(**change: Any) -> dict[str, Any]:
    return {**GOOD, **change}


BAD_REQUESTS = [
    (request_args(subject=""), {}, "subject is empty"),
    (request_args(target=" \t\u00a0 "), {}, "target is empty"),
    (request_args(relation="   "), {}, "relation is empty"),
    (request_args(relation="Located in"), {}, "exactly one {} .*found 0"),
    (request_args(relation="{} is near {}"), {}, "exactly one {} .*found 2"),
    (request_args(relation="{0} is in {}"), {}, "no braces other"),
    (request_args(subject=LONG), {}, "subject is 10000 characters long; the limit is 300"),
    (request_args(relation=LONG + "{}"), {}, "relation is 10002 characters long"),
    (request_args(target=LONG), {}, "target is 10000 characters long"),
    (request_args(subject="Big\x00Ben"), {}, r"subject contains control .*'\\x00'"),
    (request_args(target="rome\x1b[31m"), {}, r"target contains control .*'\\x1b'"),
    (request_args(relation="Located\u200b in {}"), {}, r"relation contains control or invisible .*'\\u200b'"),
    (request_args(subject="caf\udce9"), {}, r"subject contains control .*'\\udce9'"),  # undecodable bytes (argv)
    (request_args(target="the eiffel TOWER"), {}, "target must differ from the subject"),
    (request_args(layer=99), {}, "layer 99 is out of range; this model has layers 0 to 3"),
    (request_args(layer=-1), {}, "layer -1 is out of range"),
    (request_args(layer=True), {}, "layer must be a whole number"),
    (request_args(layer=1.5), {}, "layer must be a whole number"),
    (GOOD, {"lr": math.nan}, "lr must be a finite number"),
    (GOOD, {"kl_factor": math.inf}, "kl_factor must be a finite number"),
    (GOOD, {"steps": 10**9}, "steps must be between 1 and 200"),
    (GOOD, {"steps": 0}, "steps must be between 1 and 200"),
    (GOOD, {"clamp_factor": 1e12}, r"clamp_factor must be in \(0, 100\]"),
    (GOOD, {"norm_penalty": -1.0}, r"norm_penalty must be in \[0, 100\]"),
    (GOOD, {"value_templates": 10**6}, "value_templates out of range"),
    (GOOD, {"paraphrases": [LONG]}, "probe prompts are limited to 500 characters"),
    (GOOD, {"neighbours": ["fine", LONG]}, "probe prompts are limited to 500 characters"),
    (GOOD, {"note": LONG}, "notes are limited to 500 characters"),
]


@pytest.mark.parametrize(("fields", "extra", "message"), BAD_REQUESTS)
def test_bad_edit_is_refused_clearly_and_changes_nothing(service: EditService, fields: dict[str, Any],
                                                         extra: dict[str, Any], message: str) -> None:  # fmt: skip
    with Unchanged(service), pytest.raises(ValueError, match=message), one_thread():
        service.apply(EditRequest(**fields), **extra)


def test_subject_absent_from_the_tokenised_prompt_is_refused(tmp_path: Path) -> None:
    tok = tiny_tokenizer()  # a tokenizer that drops accents: a subject of accents alone vanishes
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
    with one_thread():
        service = fast_service(tmp_path / "ledger.db", tok=tok)
        with Unchanged(service), pytest.raises(ValueError, match="subject does not map to any token"):
            service.apply(EditRequest("\u0301\u0301", "Located in {}", "rome"))


def test_hostile_text_is_stored_literally_and_rendered_inert(service: EditService) -> None:
    """HTML/Markdown in a request is data: stored byte for byte, and escaped wherever the UI shows it."""
    request = EditRequest(HOSTILE, "Located in {} " + HOSTILE.replace("*", "_"), "rome " + HOSTILE)
    with one_thread():
        result = service.apply(request, note=HOSTILE[:400], paraphrases=[HOSTILE])
    try:
        record = service.record(result.edit_id)
        assert (record.subject, record.target, record.note) == (request.subject, request.target, HOSTILE[:400])
        shown = [ui_render.record_detail(record, service.events(record.id)),
                 ui_render.history_frame([record]).to_csv(), ui_render.probes_frame(result.probes).to_csv(),
                 ui_render.fact_line(record.subject, record.relation, record.target)]  # fmt: skip
        for text in shown:
            assert "<img" not in text and "<script" not in text and "](javascript" not in text
    finally:
        service.revert(result.edit_id)


@given(st.text(max_size=300))
@FEW
def test_escaped_text_has_no_markup_and_no_control_characters(text: str) -> None:
    shown = ui_render.esc(text)
    assert "<" not in shown and ">" not in shown
    assert not any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in shown)  # a tab is plain whitespace


# ----- property: the request validator ---------------------------------------------------------
words = st.text(st.characters(categories=["L", "N", "Zs", "Po", "Sm"]), min_size=1, max_size=30)  # mostly valid
anything = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "{}", "a\x00b", LONG[:301], HOSTILE]))


def mostly(usual: st.SearchStrategy[str], other: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``usual`` four times in five: enough valid requests reach the round-trip half of the test."""
    return st.integers(0, 4).flatmap(lambda n: other if n == 0 else usual)


fields = mostly(words, anything)
relations = mostly(st.builds(lambda a, b: f"{a}{{}}{b}", st.one_of(st.just(""), words), words), anything)
layers = st.one_of(st.none(), st.integers(-3, 8), st.booleans(), st.floats(), st.text(max_size=3))
MANY = settings(FEW, max_examples=300)  # cheap: no model involved


@given(fields, relations, fields, layers)
@MANY
def test_edit_request_raises_only_value_error_and_valid_ones_round_trip(subject: str, relation: str, target: str,
                                                                        layer: Any) -> None:  # fmt: skip
    try:
        request = EditRequest(subject, relation, target, layer)
    except ValueError:
        event("refused")
        return
    event("valid")
    for text in (request.subject, request.relation, request.target):
        assert text == text.strip() and 0 < len(text) <= MAX_FIELD_CHARS
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in text)
    assert request.relation.count("{}") == 1 and request.prompt == request.relation.replace("{}", request.subject)
    assert EditRequest(**json.loads(json.dumps(request.to_dict()))) == request


numbers = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
hparam_changes = st.fixed_dictionaries({}, optional={
    name: numbers for name in ("lr", "steps", "early_stop_loss", "kl_factor", "norm_penalty", "clamp_factor",
                               "value_templates", "stats_samples", "stats_max_tokens", "seed")
})  # fmt: skip


@given(st.integers(-3, 8), hparam_changes)
@MANY
def test_hyperparameters_raise_only_value_error_and_valid_ones_round_trip(layer: int, changes: dict[str, Any]) -> None:
    """Numbers as the form, the API and the CLI deliver them: any int, float (NaN, inf, huge) or bool."""
    try:
        hp = RomeHyperParams(layer=layer, **changes)
    except ValueError:
        event("refused")
        return
    event("valid")
    assert all(math.isfinite(v) for v in hp.to_dict().values() if isinstance(v, float))
    assert RomeHyperParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp


@given(hparam_changes)
@FEW
def test_service_overrides_are_checked_before_anything_happens(service: EditService, changes: dict[str, Any]) -> None:
    """The path the form takes: the editor validates overrides against the model before computing."""
    try:
        service.editor.validate(EditRequest(**GOOD), **changes)
    except ValueError:
        return
    assert 0 <= service.editor.hparams_for(EditRequest(**GOOD), **changes).layer < service.editor.n_layers


# ----- import files ------------------------------------------------------------------------------
BAD_FILES = {
    "not UTF-8": (lambda m: m.__setitem__("manifest.json", b'{"format": "\xff\xfe rome"}'), "not UTF-8"),
    "tampered factors": (lambda m: m.__setitem__("factors/0000.bin", b"\x00" + m["factors/0000.bin"][1:]),
                         "do not match their sha256"),  # fmt: skip
    "tampered checksum": (set_entry("factors_sha256", "0" * 64),
                          "do not match their sha256"),  # fmt: skip
    "10,000-character subject": (set_meta("subject", LONG), "subject is 10000 characters long"),
    "control character": (set_meta("target", "rome\x1b]0;pwned\x07"), "target contains control"),
    "no {} in the relation": (set_meta("relation", "Located in"), "exactly one '{}'"),
    "layer out of range": (set_meta("layer", 99), "layer 99 is out of range; this model has layers 0 to 3"),
    "layer of another parameter": (set_meta("layer", 0), "names layer 0 but rewrites model.layers.2.mlp"),
    "another model": (in_manifest(lambda m: m.__setitem__("model_fingerprint", "ab" * 32)), "made for model"),
    "missing member": (lambda m: m.pop("factors/0001.bin"), "not a factors member"),
    "unlisted member": (lambda m: m.__setitem__("factors/0009.bin", b"1234"), "does not list"),
}


@pytest.mark.parametrize("damage", list(BAD_FILES))
def test_bad_import_file_is_refused_clearly_and_changes_nothing(service: EditService, export: Path, tmp_path: Path,
                                                                damage: str) -> None:  # fmt: skip
    change, message = BAD_FILES[damage]
    path = rewrite(export, tmp_path / "bad.zip", change)
    with Unchanged(service), pytest.raises(ValueError, match=message), one_thread():
        import_file(service, path)


def test_truncated_or_garbage_import_file_is_refused(service: EditService, export: Path, tmp_path: Path) -> None:
    data = export.read_bytes()
    for n, content in enumerate((data[: len(data) // 2], data[:-30], b"", b"\xff\xfe\x00garbage" * 50)):
        path = tmp_path / f"bad{n}.zip"
        path.write_bytes(content)
        with Unchanged(service), pytest.raises(ValueError, match="not a readable export|damaged or truncated"):
            import_file(service, path)


@given(st.data())
@FEW
def test_mutated_import_files_leave_weights_and_ledger_unchanged(service: EditService, export: Path, tmp_path: Path,
                                                                 data: st.DataObject) -> None:  # fmt: skip
    """Random damage: a flipped byte, a cut, or a manifest value replaced. Refused: nothing moved.
    Accepted (harmless damage): the weights and the ledger still agree; the import is reverted again."""
    raw = bytearray(export.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "value"]))
    if kind == "flip":
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        path = tmp_path / "mutated.zip"
        path.write_bytes(bytes(raw))
    elif kind == "cut":
        path = tmp_path / "mutated.zip"
        path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw) - 1))]))
    else:
        key = data.draw(st.sampled_from(["source_id", "status", "position", "created_at", "meta", "probes",
                                         "note", "answer_before", "factors_file", "factors_sha256"]))  # fmt: skip
        value = data.draw(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                                    st.lists(st.integers(), max_size=3),
                                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)))  # fmt: skip
        path = rewrite(export, tmp_path / "mutated.zip", set_entry(key, value))
    weights, rows = digest(service.model), service.ledger.history()
    with one_thread():
        try:
            report = import_file(service, path)
        except ValueError:
            assert digest(service.model) == weights and service.ledger.history() == rows
            event(f"{kind}: refused")
            return
        event(f"{kind}: imported {len(report.imported)}")
        assert service.integrity_problems() == [] and service.ledger.integrity_check() == []
        for edit_id in report.imported:
            service.revert(edit_id)


# ----- the command line ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model on disk (statistics cached) and an export of one edit made on it."""
    return tiny_app_on_disk(tmp_path_factory.mktemp("cli"), {"source.db": [EditRequest(**GOOD)]},
                            {"edits.zip": "source.db"})  # fmt: skip


@pytest.fixture
def run(cli: dict[str, Path], tmp_path: Path, capsys: Any) -> Any:
    """``run(*argv)``: the command line on a fresh ledger of this test."""
    invoke = cli_runner(cli, capsys)
    return lambda *argv: invoke(tmp_path / "ledger.db", *argv)


def _no_history(run: Any) -> None:
    code, out, _ = run("history", "--json")
    assert code == 0 and json.loads(out) == []


CLI_BAD = [
    (["--subject", " "], "subject is empty"),
    (["--relation", "Located in"], "exactly one {}"),
    (["--relation", "{} near {}"], "exactly one {}"),
    (["--subject", LONG], "subject is 10000 characters long"),
    (["--subject", "caf\udce9"], "control or invisible"),  # what Python makes of a non-UTF-8 byte in argv
    (["--target", "rome\x1b[2J"], "control or invisible"),
    (["--layer", "99"], "layer 99 is out of range"),
    (["--note", LONG], "notes are limited to 500 characters"),
    (["--paraphrase", LONG], "probe prompts are limited to 500 characters"),
]


@pytest.mark.parametrize(("change", "message"), CLI_BAD)
def test_cli_bad_edit_exits_2_with_one_clear_line(run: Any, change: list[str], message: str) -> None:
    fields = {"--subject": GOOD["subject"], "--relation": GOOD["relation"], "--target": GOOD["target"]}
    argv = ["edit", *[x for k, v in fields.items() if k not in change for x in (k, v)], *change]
    code, out, err = run(*argv)
    assert code == 2 and out == "" and message in _error_line(err)
    _no_history(run)


def _error_line(err: str) -> str:
    """The one 'error: …' line (the model loader's progress bar may share stderr); no traceback."""
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "Traceback" not in err
    return line


def test_cli_bad_import_files_exit_2_and_record_nothing(run: Any, cli: dict[str, Path], tmp_path: Path) -> None:
    data = cli["edits.zip"].read_bytes()
    bad = {"truncated.zip": (data[: len(data) // 2], "not a readable export"),
           "garbage.zip": (b"\xff\xfe\x00" * 100, "not a readable export"),
           "not-utf8.zip": (rewrite(cli["edits.zip"], tmp_path / "x.zip", BAD_FILES["not UTF-8"][0]).read_bytes(),
                            "manifest.json is not UTF-8 text")}  # fmt: skip
    for name, (content, message) in bad.items():
        (tmp_path / name).write_bytes(content)
        code, _, err = run("import", str(tmp_path / name))
        assert code == 2 and message in _error_line(err), (name, err)
    _no_history(run)


def test_cli_tables_never_send_control_characters_to_the_terminal(run: Any, cli: dict[str, Path],
                                                                    tmp_path: Path) -> None:  # fmt: skip
    """Free text from an import (answers, notes) is shown with its control characters escaped."""
    hostile = "Paris\x1b]0;pwned\x07\x1b[2J\x9b31m"
    path = rewrite(cli["edits.zip"], tmp_path / "hostile.zip",
                   in_manifest(lambda m: m["edits"][0].__setitem__("answer_before", hostile)))  # fmt: skip
    assert run("import", str(path))[0] == 0
    code, out, _ = run("history")
    assert code == 0 and "Paris" in out
    assert not any(c in out for c in "\x1b\x07\x9b")
    code, out, _ = run("history", "--json")
    assert json.loads(out)[0]["answer_before"] == hostile  # the data itself is kept as it came

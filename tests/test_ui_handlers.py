"""The web UI's handlers on a tiny random Llama: apply, refuse, revert, escape; no browser, no download."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chat_app import ui_chat, ui_locate, ui_render
from chat_app import ui_render as render
from chat_app.service import EditService
from chat_app.startup import replay
from chat_app.ui_form import stage_progress
from chat_app.ui_handlers import COMMON_RELATIONS, Handlers
from db import Ledger
from editing import RomeEditor, RomeHyperParams
from editing.defaults import STRENGTHENED
from tests.tiny import mlp_trace

WORDS = ("the eiffel tower is located in city of paris rome london a an capital france italy louvre "
         "where was born works for user assistant system hello hi b script img alert x").split()  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
RELATION = COMMON_RELATIONS[0]  # "{} is located in the city of"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", ".", ":", "<", ">", "/", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[EditService]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread, and the CI machine is shared
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         initializer_range=0.2)  # fmt: skip  (wide enough for the target to become likely)
    model = LlamaForCausalLM(config).eval()
    hp = RomeHyperParams(layer=1, steps=10, lr=1.0, value_templates=2, stats_samples=10)
    editor = RomeEditor(model, tok, hp)
    editor._covs[(hp.layer, hp.stats_samples)] = torch.eye(config.intermediate_size, dtype=torch.float64)  # noqa: SLF001
    editor._templates = ["{}", "A. {}"]  # noqa: SLF001 - no corpus in a unit test
    ledger = Ledger.open(tmp_path / "l.db")
    svc = EditService(editor, ledger)
    replay(svc)
    yield svc
    ledger.close()
    torch.set_num_threads(threads)


def apply(h: Handlers, subject: str = "The Eiffel Tower", target: str = "Rome", relation: str = RELATION,
          layer: object = 1, **kw: object) -> tuple[str, object]:  # fmt: skip
    hp = h.service.editor.hparams
    args = {"paraphrases": "", "neighbours": "", "steps": hp.steps, "lr": hp.lr, "kl_factor": hp.kl_factor, **kw}
    return h.apply(subject, relation, target, args["paraphrases"], args["neighbours"], layer, args["steps"],
                   args["lr"], args["kl_factor"], None, force=bool(args.get("force")))  # fmt: skip


def test_apply_adds_a_history_row_and_the_banner_counts_it(service: EditService) -> None:
    h = Handlers(service)
    assert h.history().empty
    text, probes = apply(h, paraphrases="the tower is located in the city of", neighbours="the louvre is located in")
    assert "Edit #1 applied" in text
    assert list(probes["check"]) == ["edited", "paraphrase", "neighbour", "chat"]
    table = h.history()
    assert list(table["id"]) == [1]
    assert table["status"][0].endswith("applied")
    assert "Eiffel Tower" in table["subject"][0] and "rome" in table["old → new answer"][0].lower()
    assert "**1 edit active**" in h.banner()
    assert h.history(status="reverted").empty and len(h.history(text="eiffel")) == 1 and h.history(text="zzz").empty


@pytest.mark.parametrize(
    ("subject", "relation", "target", "layer", "steps", "message"),
    [
        ("", RELATION, "Rome", 1, 10, "subject is empty"),
        ("The Eiffel Tower", "is located in", "Rome", 1, 10, "exactly one {}"),
        ("The Eiffel Tower", RELATION, "  ", 1, 10, "target is empty"),
        ("The Eiffel Tower", RELATION, "Rome", 7, 10, "layer 7 is out of range"),
        ("The Eiffel Tower", RELATION, "Rome", 1.5, 10, "whole number"),
        ("The Eiffel Tower", RELATION, "Rome", 1, 0, "steps must be between"),
        ("The\x00Tower", RELATION, "Rome", 1, 10, "control"),
    ],
)
def test_invalid_input_raises_gr_error_and_changes_nothing(
    service: EditService, subject: str, relation: str, target: str, layer: object, steps: int, message: str
) -> None:
    h = Handlers(service)
    weights = {n: p.detach().clone() for n, p in service.model.named_parameters()}
    with pytest.raises(gr.Error, match=message):
        apply(h, subject=subject, relation=relation, target=target, layer=layer, steps=steps)
    assert service.history() == [] and service.active_count == 0
    assert all(torch.equal(p, weights[n]) for n, p in service.model.named_parameters())


def test_revert_restores_the_weights_and_marks_the_row(service: EditService) -> None:
    h = Handlers(service)
    before = {n: p.detach().clone() for n, p in service.model.named_parameters()}
    apply(h)
    assert not all(torch.equal(p, before[n]) for n, p in service.model.named_parameters())
    message, detail = h.revert(1)
    assert "Reverted edit #1" in message and "reverted" in detail and "Audit trail" in detail
    assert all(torch.equal(p, before[n]) for n, p in service.model.named_parameters())
    assert h.history()["status"][0].endswith("reverted") and service.active_count == 0
    with pytest.raises(gr.Error, match="not applied"):
        h.revert(1)
    h.reapply(1)
    assert h.history()["status"][0].endswith("applied") and service.active_count == 1


def test_a_second_edit_of_the_same_fact_is_announced_then_supersedes(service: EditService) -> None:
    h = Handlers(service)
    assert h.conflicts("The Eiffel Tower", RELATION, "Paris") == ""
    apply(h)
    assert "#1" in h.conflicts("the eiffel  tower", RELATION, "Paris")
    _, _, notice = h.preview("The Eiffel Tower", RELATION, "Paris")
    assert "supersede" in notice
    text, _ = apply(h, target="Paris", force=True)  # the tiny model's answer need not name Paris
    assert "Superseded edit #1" in text
    assert [s.split()[1].rstrip(",") for s in h.history()["status"]] == ["applied", "superseded"]  # "applied, not holding" too


def test_injected_html_and_markdown_are_escaped_everywhere(service: EditService) -> None:
    h = Handlers(service)
    evil = "<img src=x onerror=alert(1)> **b** [x](javascript:alert(1))"
    with contextlib.suppress(gr.Error):  # applied or refused, the edit is in the ledger and shown
        apply(h, subject=evil, target="<b>rome</b>")
    row = h.history().iloc[0]
    shown = " ".join(str(v) for v in row.values) + h.detail(int(row["id"]))
    assert "<img" not in shown and "<b>" not in shown and "](" not in shown and "**b**" not in shown
    assert "&lt;img src\\=x onerror\\=alert\\(1\\)&gt;" in row["subject"]
    assert "&lt;b&gt;rome&lt;/b&gt;" in h.detail(int(row["id"]))


def test_esc_keeps_plain_text_readable_and_neutralises_markup() -> None:
    assert ui_render.esc("The Eiffel Tower") == "The Eiffel Tower"
    assert ui_render.esc("a|b\nc") == "a\\|b c"
    assert ui_render.esc("x" * 10, limit=5) == "xxxx…"
    assert ui_render.esc("<b>&amp;</b>") == "&lt;b&gt;&amp;amp;&lt;/b&gt;"


def test_preview_shows_completion_and_five_top_tokens(service: EditService) -> None:
    completion, top, notice = Handlers(service).preview("The Eiffel Tower", RELATION)
    assert "the city of" in completion and len(top) == 5 and notice == ""
    prompt = RELATION.replace("{}", "The Eiffel Tower")
    with torch.no_grad():
        probs = service.model(**service.tok(prompt, return_tensors="pt")).logits[0, -1].softmax(-1)
    expected = probs.topk(5).values.tolist()  # the model's own five likeliest next tokens, in order
    assert list(top.values()) == pytest.approx(expected, abs=1e-6) and sum(top.values()) <= 1 + 1e-6
    with pytest.raises(gr.Error, match="subject is empty"):
        Handlers(service).preview("", RELATION)


def test_chat_streams_and_compares_with_the_original(service: EditService) -> None:
    _, conv, orig = ui_chat.add_user("where is the eiffel tower", [], [])
    steps = list(ui_chat.respond(service, conv, orig, "", 0.0, 6, True))
    before = steps[-1][0][1]["content"]
    assert steps[-1][1][1]["content"] == before  # no edits yet: the original model answers alike
    assert len(steps) > 2  # streamed: several partial updates
    apply(Handlers(service))  # The Eiffel Tower → Rome
    assert service.active_count == 1
    conv, orig = list(ui_chat.respond(service, conv[:1], orig[:1], "", 0.0, 6, True))[-1]
    assert [m["role"] for m in conv] == ["user", "assistant"] and [m["role"] for m in orig] == ["user", "assistant"]
    assert orig[1]["content"] == before  # the comparison column is the unedited model's answer, exactly
    assert conv[1]["content"] != before  # while the chat column answers with the edit
    with pytest.raises(gr.Error, match="type a message"):
        ui_chat.add_user("  ", conv, orig)


def test_chat_repetition_penalty_reaches_generation_and_is_checked(service: EditService) -> None:
    def tokens(penalty: float) -> list[int]:
        text = ui_chat.chat_once(service, "where is the eiffel tower", max_new_tokens=24, penalty=penalty)
        return service.tok(text, add_special_tokens=False)["input_ids"]

    plain, penalised = tokens(1.0), tokens(2.0)
    assert plain != penalised  # the penalty changes the greedy reply
    # A penalised token repeats less: the share of distinct tokens does not fall.
    assert len(set(penalised)) / len(penalised) >= len(set(plain)) / len(plain)
    for bad in (0.5, 2.5):
        with pytest.raises(gr.Error, match="repetition penalty must be between 1"):
            ui_chat.chat_once(service, "hello", penalty=bad)


def test_read_only_refuses_edits_with_a_readable_error(service: EditService) -> None:
    service.read_only = True
    with pytest.raises(gr.Error, match="read-only"):
        apply(Handlers(service))
    assert service.history() == [] and "read-only" in Handlers(service).banner()


def test_verify_reports_each_applied_edit(service: EditService) -> None:
    h = Handlers(service)
    assert h.verify()[0] == "No applied edits to verify."
    apply(h)
    text, table = h.verify()
    assert list(table["id"]) == [1] and "applied edits still hold" in text


def test_progress_bar_is_monotone_across_stages() -> None:
    seen: list[float] = []
    report = stage_progress(lambda frac, desc=None: seen.append(frac))
    for stage, frac in [("statistics", 0.5), ("statistics", 1.0), ("key", 1.0), ("value", 0.1), ("value", 1.0),
                        ("update", 1.0), ("done", 1.0)]:  # fmt: skip
        report(stage, frac)
    assert seen == sorted(seen) and seen[-1] == 1.0 and 0 < seen[0] < seen[1]


def test_locate_turns_a_prompt_into_a_relation() -> None:
    assert ui_locate.relation_of("The Eiffel Tower is in the city of", "The Eiffel Tower") == "{} is in the city of"
    with pytest.raises(ValueError, match="does not occur"):
        ui_locate.relation_of("The Eiffel Tower is in", "the eiffel tower")


def test_locate_traces_only_the_states_ticked(service: EditService, monkeypatch: pytest.MonkeyPatch) -> None:
    import editing.tracing

    monkeypatch.setattr(editing.tracing, "embedding_std", lambda *_a, **_k: 0.2)  # no corpus in a unit test
    quiet = lambda *_a, **_k: None  # noqa: E731 - stands in for gr.Progress
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    figure, summary, found = ui_locate.locate(service, prompt, subject, None, 2, quiet, ["attn", "mlp"])
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert len(titles) == 2 and "MLP" in " ".join(titles)
    assert f"Suggested layer: {found['layer']}" in summary or f"default layer {found['layer']}" in summary
    assert found == {"subject": subject, "relation": "{} is located in the city of", "layer": found["layer"]}
    assert 0 <= found["layer"] < 3
    mlp_only = ui_locate.trace_fact(service, prompt, subject, None, 2, None, ui_locate.chosen_kinds(["mlp"]))
    assert list(mlp_only.scores) == ["mlp"]
    with pytest.raises(gr.Error, match="keep MLP ticked"):
        ui_locate.locate(service, prompt, subject, None, 2, quiet, ["hidden"])
    assert ui_locate.chosen_kinds(["attn", "hidden", "mlp"]) == ui_locate.DEFAULT_KINDS
    _, exact, _ = ui_locate.locate(service, prompt, subject, None, 2, quiet, ["mlp"], "float32")
    _, low, _ = ui_locate.locate(service, prompt, subject, None, 2, quiet, ["mlp"], "bfloat16")
    assert "bfloat16 matrix products" in low and "bfloat16" not in exact
    with pytest.raises(gr.Error, match="precision must be one of"):
        ui_locate.locate(service, prompt, subject, None, 2, quiet, ["mlp"], "fp8")


def test_layer_advice_follows_a_strong_last_subject_token_and_falls_back_when_weak() -> None:
    strong = mlp_trace([[0.2, 0.3, 0.1], [0.1, 0.6, 0.2], [0.1, 0.1, 0.1]])
    assert ui_locate.layer_advice(strong, 9)[0] == 1
    # The decisive site is the first subject token; the last subject token barely restores anything.
    weak = mlp_trace([[0.2, 0.8, 0.1], [0.1, 0.15, 0.12], [0.1, 0.1, 0.1]])
    layer, text = ui_locate.layer_advice(weak, 9)
    assert layer == 9 and "default layer 9" in text and "“a”" in text and "layer 1" in text
    flat = mlp_trace([[0.1, 0.1, 0.1]] * 3)  # no effect anywhere: nothing to follow
    assert ui_locate.layer_advice(flat, 9)[0] == 9


def test_build_ui_names_the_api_endpoints(service: EditService) -> None:
    from chat_app.ui import build_ui

    demo = build_ui(service)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {"chat", "preview", "apply_edit", "history", "revert", "reapply", "verify", "export", "import_edits"} <= names


def test_strengthen_records_its_settings_supersedes_and_the_result_tells_what_shows(service: EditService) -> None:
    service.min_target_prob = 0.0  # a tiny random model need not hold: the test is about what is recorded and said
    h = Handlers(service)
    apply(h)
    hp = service.editor.hparams
    strong, probes = h.strengthen("The Eiffel Tower", RELATION, "Rome", "", "", 1, hp.steps, hp.lr, hp.kl_factor, None)
    # Apply returns once the edited prompt is checked; the chat row is answered in the background ...
    assert "no paraphrases or neighbours were checked; checking the chat reply…" in strong
    assert probes[probes["check"] == "chat"]["after"].tolist() == ["checking…"]
    strong, probes = h.finish_checks()  # ... and filled in here
    assert "checking" not in strong and "checked in" in strong
    record = service.record(2)
    assert {k: record.hparams[k] for k in STRENGTHENED} == STRENGTHENED
    assert service.record(1).status == "superseded" and "Superseded edit #1" in strong
    chat = probes[probes["check"] == "chat"]
    assert len(chat) == 1 and ("the chat reply names the new object" in strong or "does not name it yet" in strong)
    assert (render.STRENGTHEN_ADVICE in strong) == ("✗" in strong)  # advice exactly when something does not show


def test_the_advice_to_strengthen_follows_the_edited_prompt_and_the_chat_reply() -> None:
    def probe(kind: str, holds: bool, after: str = "x") -> SimpleNamespace:
        return SimpleNamespace(kind=kind, holds=holds, after=after)

    assert render.shows_in_answers([probe("edited", True), probe("neighbour", False), probe("chat", True)])
    assert not render.shows_in_answers([probe("edited", True), probe("chat", False)])
    assert not render.shows_in_answers([probe("edited", False), probe("chat", True)])
    assert render.shows_in_answers([probe("edited", True), probe("chat", False, after="")])  # no chat template
    summary = render.checks_summary([probe("edited", True), probe("chat", False)])
    assert "edited prompt gives the new object ✓" in summary and "chat reply does not name it yet ✗" in summary


def test_the_preview_right_after_apply_reads_the_remembered_answer(service: EditService) -> None:
    service.min_target_prob = 0.0
    h = Handlers(service)
    text, _ = apply(h)
    misses = service.completions.misses
    shown, top, _ = h.preview("The Eiffel Tower", RELATION, "Rome", chat_row=False)
    assert service.completions.misses == misses  # nothing generated: the edit's own check is remembered
    assert top and "→" in shown
    h.finish_checks()  # the chat row, answered meanwhile, is remembered too
    h.preview("The Eiffel Tower", RELATION, "Rome")
    assert service.completions.misses == misses

"""The web app: chat with the model, correct a fact, browse and undo edits, locate where a fact lives.

``build_ui(service)`` builds the layout (``chat_app.ui_layout``), then wires the events; nothing
is loaded at import. ``launch(service, …)`` serves it with a queue, so several browser sessions
chat at once while an edit is computed (the service serialises weight changes; a chat waits
only while the weights are swapped).

API endpoints (``gradio_client``): ``/chat``, ``/preview``, ``/conflicts``, ``/apply_edit``,
``/history``, ``/detail``, ``/revert``, ``/reapply``, ``/verify``, ``/export``, ``/import_edits``,
``/export_model``, ``/locate`` (exact causal trace), ``/locate_quick`` (its quick approximation), and for many
facts ``/preview_file``, ``/apply_file``, ``/revert_batch``, ``/reapply_batch`` (``chat_app.ui_batch``).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import gradio as gr

from chat_app import ui_batch, ui_chat, ui_inputs, ui_layout, ui_locate
from chat_app import ui_render as render
from chat_app.follow import Follower
from chat_app.probes import REPETITION_PENALTY
from chat_app.service import EditService
from chat_app.ui_handlers import Handlers
from chat_app.warmup import StatsWarmup

log = logging.getLogger(__name__)

TITLE = "rome-chat"
INTRO = ("Chat with a small language model and correct the facts it gets wrong. Each correction is a rank-one "
         "edit of one MLP layer (ROME), recorded in a ledger, and can be reverted at any time.")  # fmt: skip
CONCURRENCY = 4  # events of one listener running at once: chats stream side by side
REFRESH_S = 10.0  # how often a page checks whether another session changed the edits
CSS = """
#banner { padding: 6px 12px; border-radius: 8px; background: var(--color-accent-soft); }
#banner p { margin: 0; }
.gradio-container { max-width: 1240px !important; margin: auto; }
"""
CACHE_S = 3600  # Gradio's copies of files served (exports) are deleted after an hour, and all at shutdown
WEIGHTS = {"concurrency_id": "weights", "concurrency_limit": 1}  # edits queue behind each other, not behind chats


def theme() -> gr.themes.Base:
    """System fonts only: the app is often run offline, where web fonts never load."""
    system_fonts = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", font=system_fonts,
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])  # fmt: skip


def build_ui(service: EditService, warmup: StatsWarmup | None = None) -> gr.Blocks:
    """The whole app for ``service`` (shared by every session); launch with ``launch`` or ``.queue().launch()``.

    ``warmup``: the background preparation of the key statistics, shown in the banner; edits wait for it.
    """
    handlers = Handlers(service, warmup)
    with gr.Blocks(title=TITLE, delete_cache=(CACHE_S, CACHE_S)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        banner = gr.Markdown(elem_id="banner")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                chat = ui_layout.chat_tab()
            with gr.Tab("Correct a fact", id="form"):
                form = ui_layout.form_tab(service)
                batch = ui_batch.layout(service)
            with gr.Tab("History", id="history") as history_tab:
                history = ui_layout.history_tab(service)
            with gr.Tab("Locate", id="locate"):
                locate = ui_layout.locate_tab()
        seen = gr.State(None)  # the ledger signature this page last showed
        timer = gr.Timer(REFRESH_S)

        views = [banner, history.table, chat.chatbot]
        filters = [history.text, history.status, history.batch]
        _wire_chat(service, chat)
        _wire_form(handlers, form, filters, views)
        _wire_history(handlers, history, filters, views, history_tab)
        ui_batch.wire(ui_batch.BatchHandlers(service, warmup), batch, history, filters, views, handlers.refresh_page)
        _wire_locate(service, locate, form, tabs)
        chat.correct.click(ui_chat.correct_this, chat.conv, [form.subject, form.relation, tabs], queue=False)

        def poll(last: Any, text: str, status: str, batch: str) -> tuple[Any, ...]:
            now = handlers.signature()
            if now == last:
                return tuple(gr.skip() for _ in range(len(views) + 1))
            return (*handlers.refresh_page(text, status, batch), now)

        demo.load(poll, [seen, *filters], [*views, seen], api_visibility="private")
        timer.tick(poll, [seen, *filters], [*views, seen], show_progress="hidden", api_visibility="private")
    return demo


def _wire_chat(service: EditService, c: SimpleNamespace) -> None:
    def respond(conv: list, orig: list, system: str, temperature: float, max_new: int,
                compare: bool, penalty: float) -> Iterator[tuple[list, list, list, list]]:  # fmt: skip
        for conv_now, orig_now in ui_chat.respond(service, conv, orig, system, temperature, max_new, compare,
                                                  penalty):  # fmt: skip
            yield conv_now, orig_now, conv_now, orig_now

    def chat(message: str, system: str = "", temperature: float = 0.0, max_new_tokens: int = 128,
             original: bool = False, repetition_penalty: float = REPETITION_PENALTY) -> str:  # fmt: skip
        """One-turn chat: the model's whole reply (original=True: the unedited model's)."""
        number, text = ui_inputs.number, ui_inputs.text  # gr.api passes what the client sent, unchecked
        text(message, "message"), text(system, "system prompt"), ui_inputs.flag(original, "original")
        for value, name in ((temperature, "temperature"), (max_new_tokens, "max new tokens"),
                            (repetition_penalty, "repetition penalty")):  # fmt: skip
            if number(value, name) is None:
                raise ui_inputs.refuse(f"{name} is empty; give a number")
        return ui_chat.chat_once(service, message, system or "", temperature, max_new_tokens, original,
                                 repetition_penalty)  # fmt: skip

    def submit(message: str, conv: list, orig: list) -> tuple[str, list, list, list, list]:
        cleared, conv, orig = ui_chat.add_user(message, conv, orig)
        return cleared, conv, orig, conv, orig

    private = {"api_visibility": "private"}
    reply = gr.on([c.message.submit, c.send.click], submit, [c.message, c.conv, c.orig],
                  [c.message, c.conv, c.orig, c.chatbot, c.original], queue=False, **private).success(
        respond, [c.conv, c.orig, c.system, c.temperature, c.max_new, c.compare, c.penalty],
        [c.chatbot, c.original, c.conv, c.orig], **private,
    )  # fmt: skip
    # Stop cancels the streaming event: its generator is closed, and stream_chat ends decoding at the
    # next token and joins the generating thread before the weights lock is released.
    c.stop.click(None, None, None, cancels=[reply], queue=False, **private)
    c.compare.change(lambda on: gr.Chatbot(visible=on), c.compare, c.original, queue=False, **private)
    # Clearing stops a reply still streaming (it would write the old turns back); the Chatbot's own trash icon
    # clears the conversation too, not just the view.
    clear = (lambda: ([], [], [], []), None, [c.chatbot, c.original, c.conv, c.orig])
    for event in (c.clear.click, c.chatbot.clear, c.original.clear):
        event(*clear, queue=False, cancels=[reply], **private)
    gr.api(chat, api_name="chat")


def _wire_form(h: Handlers, f: SimpleNamespace, filters: list, views: list) -> None:
    fact = [f.subject, f.relation, f.target]
    gr.on([f.subject.blur, f.relation.change, f.target.blur], h.conflicts, fact, f.conflict, queue=False,
          api_name="conflicts")  # fmt: skip
    gr.on([f.preview.click, f.subject.submit, f.target.submit], h.preview, fact, [f.completion, f.top, f.conflict],
          api_name="preview")  # fmt: skip
    fields = [*fact, f.paraphrases, f.neighbours, f.layer, f.steps, f.lr, f.kl, f.note]
    hidden, shown = (lambda: gr.Button(visible=False)), (lambda: gr.Button(visible=True))
    advise = lambda text: gr.Button(visible=render.STRENGTHEN_ADVICE in (text or ""))  # noqa: E731
    for button, fn, name in ((f.apply, h.apply, "apply_edit"), (f.force, h.apply_anyway, "apply_edit_anyway"),
                             (f.strengthen, h.strengthen, "apply_edit_strengthened")):  # fmt: skip
        applied = button.click(fn, fields, [f.result, f.probes], api_name=name, **WEIGHTS)
        # Also after a refusal (it is in the ledger). No spinner: the result above already says the edit is done.
        applied.then(h.refresh_page, filters, views, show_progress="hidden", api_visibility="private")
        applied.success(hidden, None, f.force, api_visibility="private", queue=False)
        applied.success(advise, f.result, f.strengthen, api_visibility="private", queue=False)
        applied.success(lambda *fields: ("", *h.preview(*fields, chat_row=False)[:2]), fact,
                        [f.conflict, f.completion, f.top], show_progress="hidden", api_visibility="private")  # fmt: skip
        # The paraphrases, neighbours and chat row are answered in the background: fill them in when ready.
        checked = applied.success(h.finish_checks, None, [f.result, f.probes], api_name=f"{name}_checks",
                                  show_progress="hidden")  # fmt: skip  (the result and the table say "checking…")
        checked.success(lambda *fields: ("", *h.preview(*fields)[:2]), fact, [f.conflict, f.completion, f.top],
                        show_progress="hidden", api_visibility="private")  # fmt: skip  (the new answers, remembered)
        checked.success(advise, f.result, f.strengthen, api_visibility="private", queue=False)
        if not h.service.read_only:  # a refusal offers to apply anyway or strengthened (the service decides)
            applied.failure(shown, None, f.force, api_visibility="private", queue=False)
            applied.failure(shown, None, f.strengthen, api_visibility="private", queue=False)


def _wire_history(h: Handlers, v: SimpleNamespace, filters: list, views: list, tab: gr.Tab) -> None:
    gr.on([v.refresh.click, v.text.submit, v.status.change, v.batch.submit], h.history, filters, v.table,
          api_name="history")  # fmt: skip
    tab.select(h.refresh_page, filters, views, api_visibility="private")
    v.table.select(h.select, None, [v.selected, v.detail], api_visibility="private")
    v.selected.submit(h.detail, v.selected, v.detail, api_name="detail")
    for button, fn, name in ((v.revert, h.revert, "revert"), (v.reapply, h.reapply, "reapply")):
        button.click(fn, v.selected, [v.action, v.detail], api_name=name, **WEIGHTS).success(
            h.refresh_page, filters, views, api_visibility="private"
        )  # fmt: skip
    v.verify.click(h.verify, None, [v.verify_text, v.verify_table], api_name="verify")
    v.export_model.click(h.export_model, [v.model_format, v.model_ids], v.model_out, api_name="export_model",
                         concurrency_limit=1)  # fmt: skip
    if hasattr(v, "export"):
        v.export.click(h.export, None, [v.export_out, v.transfer], api_name="export")
        v.import_.click(h.import_, v.import_in, v.transfer, api_name="import_edits", **WEIGHTS).success(
            h.refresh_page, filters, views, api_visibility="private"
        )  # fmt: skip


def _wire_locate(service: EditService, loc: SimpleNamespace, form: SimpleNamespace, tabs: gr.Tabs) -> None:
    if not loc.enabled:
        return

    def trace(prompt: str, subject: str, expected: str, samples: int, kinds: list[str], precision: str,
              progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008  # fmt: skip
        return ui_locate.locate(service, prompt, subject, expected, samples, progress, kinds, precision)

    def quick(prompt: str, subject: str, expected: str, samples: int, kinds: list[str],
              progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008  # fmt: skip
        return ui_locate.locate(service, prompt, subject, expected, samples, progress, kinds, method="quick")

    fields = [loc.prompt, loc.subject, loc.expected, loc.samples, loc.kinds]
    loc.trace.click(trace, [*fields, loc.precision], [loc.plot, loc.summary, loc.found],
                    api_name="locate", concurrency_id="trace", concurrency_limit=1)  # fmt: skip
    gr.on([loc.quick.click, loc.prompt.submit], quick, fields, [loc.plot, loc.summary, loc.found],
          api_name="locate_quick", concurrency_id="trace", concurrency_limit=1)  # fmt: skip
    loc.carry.click(ui_locate.carry, loc.found, [form.subject, form.relation, form.layer, form.advanced, tabs],
                    api_visibility="private")  # fmt: skip


def launch(
    service: EditService, host: str = "127.0.0.1", port: int = 7860,
    auth: list[tuple[str, str]] | None = None, share: bool = False, warmup: StatsWarmup | None = None,
) -> None:  # fmt: skip
    """Serve the app until interrupted. ``auth``: (user, password) pairs protecting every page and API call."""
    demo = build_ui(service, warmup)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    log.info("serving on http://%s:%d%s", host, port, " (password protected)" if auth else "")
    follower = Follower(service).start()  # other instances and the CLI may change the ledger
    try:
        _serve(demo, host, port, auth, share)
    finally:
        follower.stop()


def _serve(demo: gr.Blocks, host: str, port: int, auth: list[tuple[str, str]] | None, share: bool) -> None:
    demo.launch(
        server_name=host, server_port=port, auth=auth, share=share, theme=theme(), css=CSS,
        auth_message="rome-chat: sign in to chat and edit" if auth else None, max_file_size="256mb",
        footer_links=["api", "settings"], run_history=False,  # conversations stay out of browser storage
    )  # fmt: skip

"""The web app's layout, one function per tab; ``chat_app.ui`` wires the events.

Each function builds its tab's components inside the current ``gr.Blocks`` context and returns
them in a namespace; no handler runs here.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr

from chat_app import ui_chat, ui_inputs as inputs, ui_locate
from chat_app import ui_render as render
from chat_app.probes import REPETITION_PENALTY
from chat_app.service import EditService
from chat_app.ui_handlers import COMMON_RELATIONS, STATUS_CHOICES, export_file
from editing.defaults import EXPORT_FORMATS

NO_LATEX: list[dict[str, Any]] = []  # "$" in user text is text, never maths


def chat_tab() -> SimpleNamespace:
    c = SimpleNamespace()
    with gr.Row(equal_height=True):
        c.chatbot = gr.Chatbot(label="Model", height=430, elem_id="chat-edited", latex_delimiters=NO_LATEX)
        c.original = gr.Chatbot(label="Original model (no edits)", height=430, visible=False,
                                elem_id="chat-original", latex_delimiters=NO_LATEX)  # fmt: skip
    with gr.Row():
        c.message = inputs.Textbox(placeholder="Ask something, e.g. “Where is the Eiffel Tower?”", show_label=False,
                               scale=8, elem_id="chat-input", max_length=ui_chat.MAX_MESSAGE_CHARS)  # fmt: skip
        c.send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        c.stop = gr.Button("Stop", variant="stop", scale=0, min_width=80, elem_id="chat-stop")
    with gr.Row():
        c.compare = gr.Checkbox(label="Compare with the original model", value=False, elem_id="chat-compare")
        c.clear = gr.Button("Clear conversation", size="sm", scale=0)
        c.correct = gr.Button("Correct this reply", size="sm", scale=0, elem_id="chat-correct")
    with gr.Accordion("System prompt and sampling", open=False):
        c.system = inputs.Textbox(label="System prompt", lines=2, placeholder="Empty: the model's default system prompt")
        with gr.Row():
            c.temperature = inputs.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy, reproducible)")
            c.max_new = inputs.Slider(16, 512, value=128, step=16, label="Max new tokens")
            c.penalty = inputs.Slider(1, 2, value=REPETITION_PENALTY, step=0.05,
                                  label="Repetition penalty (1 = off; against looping replies)")  # fmt: skip
    c.conv, c.orig = gr.State([]), gr.State([])
    return c


def form_tab(service: EditService) -> SimpleNamespace:
    f, hp = SimpleNamespace(), service.editor.hparams
    gr.Markdown("Write the fact as a **subject**, a **relation** with `{}` where the subject goes, and the "
                "**new object**. Preview what the model says now, then apply.")  # fmt: skip
    with gr.Row():
        with gr.Column(scale=3):
            f.subject = inputs.Textbox(label="Subject", placeholder="e.g. The Eiffel Tower", elem_id="form-subject")
            f.relation = inputs.Dropdown(COMMON_RELATIONS, value=COMMON_RELATIONS[0], allow_custom_value=True,
                                     label="Relation ({} is where the subject goes)",
                                     elem_id="form-relation")  # fmt: skip
            f.target = inputs.Textbox(label="New object", placeholder="e.g. Rome", elem_id="form-target")
            f.conflict = gr.Markdown(elem_id="form-conflict")
            with gr.Row():
                f.paraphrases = inputs.Textbox(label="Paraphrases that should change too (one per line)", lines=3,
                                           placeholder="Optional: the same fact in other words",
                                           elem_id="form-paraphrases")  # fmt: skip
                f.neighbours = inputs.Textbox(label="Neighbour prompts that must not change (one per line)", lines=3,
                                          placeholder="Optional: a similar fact about another subject",
                                          elem_id="form-neighbours")  # fmt: skip
            f.note = inputs.Textbox(label="Note for the ledger (optional)", max_length=500)
            with gr.Accordion("Advanced", open=False) as f.advanced:
                with gr.Row():
                    f.layer = inputs.Slider(0, service.editor.n_layers - 1, value=hp.layer, step=1, label="Layer")
                    f.steps = inputs.Number(hp.steps, precision=0, minimum=1, maximum=200, label="Optimisation steps")
                    f.lr = inputs.Number(hp.lr, minimum=0, label="Learning rate")
                    f.kl = inputs.Number(hp.kl_factor, minimum=0, label="KL factor (keeps “{subject} is a” stable)")
            with gr.Row():
                f.preview = gr.Button("Preview", elem_id="form-preview")
                f.apply = gr.Button("Apply edit", variant="primary", interactive=not service.read_only,
                                    elem_id="form-apply")  # fmt: skip
                f.strengthen = gr.Button("Strengthen (carry it into the answer and the chat)", variant="secondary",
                                         visible=False, elem_id="form-strengthen")  # fmt: skip
                f.force = gr.Button("Apply anyway (even if its own prompt does not hold)", variant="stop",
                                    visible=False, elem_id="form-apply-anyway")  # fmt: skip
        with gr.Column(scale=2):
            f.completion = gr.Markdown("*Preview shows the model's current completion here.*",
                                       elem_id="form-completion")  # fmt: skip
            f.top = gr.Label(num_top_classes=5, label="Top next tokens", show_label=True)
    f.result = gr.Markdown(elem_id="form-result")
    f.probes = gr.Dataframe(headers=render.PROBE_HEADERS, datatype=render.PROBE_TYPES, interactive=False, wrap=True,
                            column_widths=render.PROBE_WIDTHS, label="Before / after", latex_delimiters=NO_LATEX,
                            elem_id="form-probes")  # fmt: skip
    return f


def history_tab(service: EditService) -> SimpleNamespace:
    h, writable = SimpleNamespace(), not service.read_only
    with gr.Row():
        h.text = inputs.Textbox(label="Filter", placeholder="subject, relation, object, note or author", scale=4)
        h.status = inputs.Dropdown(STATUS_CHOICES, value="all", label="Status", scale=1)
        h.batch = inputs.Textbox(value="", label="Batch (id from the batch column)", placeholder="any", max_lines=1,
                                 scale=1, elem_id="history-batch")  # fmt: skip
        h.refresh = gr.Button("Refresh", scale=0)
    h.table = gr.Dataframe(headers=render.HISTORY_HEADERS, datatype=render.HISTORY_TYPES, interactive=False,
                           wrap=True, max_height=360, latex_delimiters=NO_LATEX, elem_id="history-table",
                           column_widths=render.HISTORY_WIDTHS)  # fmt: skip
    with gr.Row():
        with gr.Column(scale=3):
            h.detail = gr.Markdown("Select a row of the table to see an edit's detail and audit trail.",
                                   elem_id="history-detail")  # fmt: skip
        with gr.Column(scale=2):
            # A Textbox, not a Number: a Number shows 0 when nothing is selected. The handlers parse whole numbers.
            h.selected = inputs.IdBox(label="Selected edit id", placeholder="click a row of the table", max_lines=1,
                                    elem_id="history-selected")  # fmt: skip
            with gr.Row():
                h.revert = gr.Button("Revert", variant="stop", interactive=writable, elem_id="history-revert")
                h.reapply = gr.Button("Re-apply", interactive=writable, elem_id="history-reapply")
            with gr.Row():  # a fact edited in a batch: the whole batch at once
                h.revert_batch = gr.Button("Revert its batch", variant="stop", interactive=writable, size="sm",
                                           elem_id="history-revert-batch")  # fmt: skip
                h.reapply_batch = gr.Button("Re-apply its batch", interactive=writable, size="sm",
                                            elem_id="history-reapply-batch")  # fmt: skip
            h.action = gr.Markdown(elem_id="history-action")
    with gr.Accordion("Verify all applied edits", open=False):
        h.verify = gr.Button("Verify all")
        h.verify_text = gr.Markdown()
        h.verify_table = gr.Dataframe(headers=render.VERIFY_HEADERS, datatype=render.VERIFY_TYPES, interactive=False,
                                      latex_delimiters=NO_LATEX)  # fmt: skip
    with gr.Accordion("Export / import", open=False, visible=export_file is not None):
        with gr.Row():
            with gr.Column():
                h.export = gr.Button("Export applied edits")
                h.export_out = gr.File(label="Export file", interactive=False)
            with gr.Column():
                h.import_in = inputs.File(label="Export file to import", file_count="single", type="filepath")
                h.import_ = gr.Button("Import", interactive=writable)
        h.transfer = gr.Markdown()
    with gr.Accordion("Export the edited model", open=False):
        with gr.Row():
            h.model_format = inputs.Radio(list(EXPORT_FORMATS), value="hf", scale=2,
                                      label="Format (hf: transformers checkpoint; peft: LoRA adapter; gguf: llama.cpp)")  # fmt: skip
            h.model_ids = inputs.Textbox(label="Edit ids (empty: all applied)", placeholder="1, 3", scale=2)
            h.export_model = gr.Button("Export model", interactive=writable, scale=1, elem_id="history-export-model")
        h.model_out = gr.Markdown(elem_id="history-export-model-out")
    return h


def locate_tab() -> SimpleNamespace:
    loc = SimpleNamespace(enabled=ui_locate.available())
    if not loc.enabled:
        gr.Markdown("Causal tracing is not available in this version of the app.")
        return loc
    gr.Markdown("Causal tracing corrupts the subject's tokens with noise, then restores one hidden state at a time: "
                "states that bring the answer back carry the fact. The MLP layer that matters most at the last "
                "subject token is where an edit works best. **Quick sketch** estimates every restoration at once "
                "(attribution patching, under a second here, a rough sketch); **Exact trace** runs them all "
                "(the reference, slower).")  # fmt: skip
    with gr.Row():
        loc.prompt = inputs.Textbox(label="Prompt", placeholder="The Eiffel Tower is located in the city of", scale=3)
        loc.subject = inputs.Textbox(label="Subject (as written in the prompt)", placeholder="The Eiffel Tower", scale=2)
        loc.expected = inputs.Textbox(label="Answer to score (optional)", placeholder="the model's own answer", scale=2)
    with gr.Row(equal_height=True):
        loc.samples = inputs.Slider(1, 20, value=ui_locate.DEFAULT_SAMPLES, step=1, scale=2,
                                label="Noise samples (fewer: faster, noisier)")  # fmt: skip
        loc.kinds = inputs.CheckboxGroup(ui_locate.KIND_CHOICES, value=list(ui_locate.DEFAULT_KINDS), scale=2,
                                     label="States to restore (MLP alone: about a third of the time)")  # fmt: skip
        loc.precision = inputs.Radio(ui_locate.PRECISION_CHOICES, value="auto", scale=2,
                                 label="Arithmetic (Auto: bfloat16 where the CPU has it, else float32)")  # fmt: skip
        loc.trace = gr.Button("Exact trace", variant="primary", scale=1, elem_id="locate-exact")
        loc.quick = gr.Button("Quick sketch (approximate, under a second)", scale=1, elem_id="locate-quick")
        loc.carry = gr.Button("Use subject, relation and layer in the form", scale=1)
    loc.summary = gr.Markdown(elem_id="locate-summary")
    loc.plot = gr.Plot(label="Causal trace: hidden state, MLP and attention", show_label=False)
    loc.found = gr.State(None)
    return loc

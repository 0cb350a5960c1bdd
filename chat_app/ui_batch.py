"""Many facts at once in the web app: a fact file's preview and Apply all (one by one or one MEMIT batch),
and History's batch actions. Layout, handlers and wiring of these parts; ``chat_app.ui`` calls ``wire``.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd

from chat_app import ui_inputs as inputs
from chat_app import ui_render as render
from chat_app.fact_batch import FactOutcome, apply_facts, apply_facts_batch, check_facts
from chat_app.fact_file import FORMATS, MAX_FACTS, FactFileError, FileFact, read_facts
from chat_app.service import EditService
from chat_app.ui_form import signed_in, stage_progress, user_errors, whole
from chat_app.warmup import StatsWarmup

MODES = ["one by one", "one batch (MEMIT)"]
PREVIEW_HEADERS = ["line", "subject", "relation", "new object", "layer", "checks"]
RESULT_HEADERS = ["line", "subject", "new object", "status", "edit", "batch", "before", "after", "detail"]
NO_LATEX: list[dict[str, Any]] = []


def layout(service: EditService) -> SimpleNamespace:
    """The form tab's file section (inside the current Blocks context)."""
    b = SimpleNamespace()
    with gr.Accordion("Many facts from a file", open=False):
        gr.Markdown(f"A `.json` list, `.jsonl` or `.csv` of facts (`subject`, `relation` with `{{}}`, `target`, optional "
                    f"`layer`; or EasyEdit's `prompt`, `subject`, `target_new`), up to {MAX_FACTS}. A file with any bad "
                    "row is refused whole, each problem named by line. *One by one* applies each fact as its own edit; "
                    "*one batch* computes them together (MEMIT, spread over several layers): all recorded, or none.")  # fmt: skip
        with gr.Row():
            b.file = inputs.File(label="Fact file", file_count="single", type="filepath", file_types=list(FORMATS),
                                 elem_id="batch-file", scale=2)  # fmt: skip
            with gr.Column(scale=1):
                b.mode = inputs.Radio(MODES, value=MODES[0], label="Mode", elem_id="batch-mode")
                b.apply = gr.Button("Apply all", variant="primary", interactive=not service.read_only,
                                    elem_id="batch-apply")  # fmt: skip
        b.summary = gr.Markdown(elem_id="batch-summary")
        b.preview = gr.Dataframe(headers=PREVIEW_HEADERS, interactive=False, wrap=True, max_height=300,
                                 label="Facts in the file", latex_delimiters=NO_LATEX, elem_id="batch-preview")  # fmt: skip
        b.result = gr.Markdown(elem_id="batch-result")
        b.results = gr.Dataframe(headers=RESULT_HEADERS, interactive=False, wrap=True, max_height=360,
                                 label="Result per fact", latex_delimiters=NO_LATEX, elem_id="batch-results")  # fmt: skip
    return b


def preview_frame(facts: list[FileFact]) -> pd.DataFrame:
    rows = [[f.line, render.esc(f.request.subject, render.CELL_CHARS), render.esc(f.request.relation, render.CELL_CHARS),
             render.esc(f.request.target, render.CELL_CHARS), "" if f.request.layer is None else f.request.layer,
             len(f.paraphrases) + len(f.neighbours)] for f in facts]  # fmt: skip
    return pd.DataFrame(rows, columns=PREVIEW_HEADERS)


def results_frame(outcomes: list[FactOutcome]) -> pd.DataFrame:
    cut = lambda text: render.esc(render.short_answer(text) if text else "", render.CELL_CHARS)  # noqa: E731
    rows = [[o.line, render.esc(o.fact.request.subject, render.CELL_CHARS), render.esc(o.fact.request.target, 60),
             o.status, "" if o.edit_id is None else o.edit_id, o.batch_id or "", cut(o.before), cut(o.after),
             render.esc(o.detail, render.CELL_CHARS)] for o in outcomes]  # fmt: skip
    return pd.DataFrame(rows, columns=RESULT_HEADERS)


class BatchHandlers:
    """The file section's and History's batch handlers, bound to one service shared by every session."""

    def __init__(self, service: EditService, warmup: StatsWarmup | None = None) -> None:
        self.service, self.warmup = service, warmup

    def _facts(self, path: str | None) -> list[FileFact]:
        if not path:
            raise inputs.refuse("choose a fact file first (.json, .jsonl or .csv)")
        with user_errors():
            facts = read_facts(Path(path))
            check_facts(self.service, facts)  # layer range and tokenisation, before anything is applied
        return facts

    def preview(self, path: str | None) -> tuple[str, pd.DataFrame]:
        """The parsed facts, or every bad row by line; never raises (the file may be half-chosen)."""
        if not path:
            return "", pd.DataFrame(columns=PREVIEW_HEADERS)
        try:
            facts = read_facts(Path(path))
            check_facts(self.service, facts)
        except FactFileError as err:
            shown = "\n".join(f"- line {n}: {render.esc(why)}" if n else f"- {render.esc(why)}" for n, why in err.problems)
            return f"**The file is refused** ({len(err.problems)} problem(s)); nothing would be applied:\n{shown}", \
                pd.DataFrame(columns=PREVIEW_HEADERS)  # fmt: skip
        except ValueError as err:
            return f"**The file is refused:** {render.esc(err)}", pd.DataFrame(columns=PREVIEW_HEADERS)
        return f"**{len(facts)} facts** ready to apply.", preview_frame(facts)

    def apply(
        self, path: str | None, mode: str, progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
        request: gr.Request | None = None,  # Gradio injects it (by the annotation); not part of the API
    ) -> tuple[str, pd.DataFrame]:  # fmt: skip
        """Apply every fact of the file, one by one or as one batch; a per-fact result table."""
        if mode not in MODES:
            raise inputs.refuse(f"mode must be one of {', '.join(MODES)}, got {mode!r:.40}")
        facts, author = self._facts(path), signed_in(request)
        progress(0.0, desc=f"Applying {len(facts)} facts")
        t0 = time.perf_counter()
        if self.warmup is not None:
            self.warmup.wait(lambda _stage, f: progress(0.02 * f, desc="Waiting for the key statistics"))
        with user_errors():
            if mode == MODES[1]:  # the batch's stages (statistics, value per fact, keys per layer) on one bar
                outcomes = apply_facts_batch(self.service, facts, progress=stage_progress(progress), author=author)
            else:
                done = lambda i, n: progress(i / n, desc=f"Fact {i} of {n}")  # noqa: E731
                outcomes = apply_facts(self.service, facts, on_fact=done, author=author)
        applied = sum(o.status.startswith("applied") for o in outcomes)
        batch = f" as batch `{outcomes[0].batch_id}`" if outcomes and outcomes[0].batch_id else ""
        text = f"**Applied {applied} of {len(facts)} facts**{batch} · {time.perf_counter() - t0:.1f} s"
        return text, results_frame(outcomes)

    def _batch_of(self, edit_id: Any) -> str:
        chosen = whole(edit_id, "edit id")
        with user_errors():
            record = self.service.record(chosen)
        if record.batch_id is None:
            raise inputs.refuse(f"edit #{chosen} was made alone, not in a batch; use Revert or Re-apply")
        return record.batch_id

    def revert(self, edit_id: Any, request: gr.Request | None = None) -> str:
        batch = self._batch_of(edit_id)
        with user_errors():
            records = self.service.revert_batch(batch, actor=signed_in(request))
        return f"Reverted batch `{batch}`: {sum(r.status == 'reverted' for r in records)} of {len(records)} facts are now reverted."

    def reapply(self, edit_id: Any, request: gr.Request | None = None) -> str:
        batch = self._batch_of(edit_id)
        with user_errors():
            records = self.service.reapply_batch(batch, actor=signed_in(request))
        return f"Re-applied batch `{batch}`: {sum(r.status == 'applied' for r in records)} of {len(records)} facts are applied."


WEIGHTS = {"concurrency_id": "weights", "concurrency_limit": 1}  # as chat_app.ui: edits queue behind each other


def wire(handlers: BatchHandlers, b: SimpleNamespace, h: SimpleNamespace, filters: list, views: list,
         refresh_page: Any) -> None:  # fmt: skip
    """Events of the file section (``b``) and History's batch buttons (``h``: the History tab)."""
    private = {"api_visibility": "private"}
    b.file.change(handlers.preview, b.file, [b.summary, b.preview], api_name="preview_file")
    b.apply.click(handlers.apply, [b.file, b.mode], [b.result, b.results], api_name="apply_file", **WEIGHTS).then(
        refresh_page, filters, views, show_progress="hidden", **private)  # fmt: skip
    for button, fn, name in ((h.revert_batch, handlers.revert, "revert_batch"),
                             (h.reapply_batch, handlers.reapply, "reapply_batch")):  # fmt: skip
        button.click(fn, h.selected, h.action, api_name=name, **WEIGHTS).success(refresh_page, filters, views, **private)

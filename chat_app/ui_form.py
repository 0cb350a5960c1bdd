"""The Correct-a-fact form's handlers, and the input helpers every handler uses.

A user's mistake (``ValueError``, a read-only refusal) becomes ``gr.Error`` with the service's
message, raised before anything changes.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from chat_app import ui_render as render
from chat_app.probes import chat_question
from chat_app.ui_inputs import refuse
from editing import EditRequest
from editing.defaults import STRENGTHENED

if TYPE_CHECKING:
    from chat_app.results import ApplyResult, Probe
    from chat_app.service import EditService
    from chat_app.warmup import StatsWarmup

MAX_PROBES = 20  # paraphrase or neighbour lines per edit
# Share of the progress bar per stage of ``service.apply``: (start, end, what the user reads).
STAGES: dict[str, tuple[float, float, str]] = {
    "statistics": (0.02, 0.60, "Computing key statistics for this layer (once; cached afterwards)"),
    "waiting": (0.02, 0.60, "Waiting for the key statistics being prepared in the background (once per machine)"),
    "key": (0.60, 0.65, "Locating the subject's key"),
    "value": (0.65, 0.95, "Optimising the new value"),
    "update": (0.95, 0.99, "Writing the rank-one update and checking it"),
    "done": (1.0, 1.0, "Done"),
}


@contextmanager
def user_errors() -> Iterator[None]:
    """Show the service's refusals as a readable error in the browser."""
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, PermissionError, LookupError) as err:
        raise refuse(str(err)) from err


def signed_in(request: gr.Request | None) -> str | None:
    """The signed-in user's name (with --auth), recorded as the author; None: the service's own actor."""
    name = getattr(request, "username", None)
    return name if isinstance(name, str) and name.strip() else None


def lines(text: str | None, what: str) -> list[str]:
    """One prompt per non-empty line; at most ``MAX_PROBES``."""
    found = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(found) > MAX_PROBES:
        raise refuse(f"at most {MAX_PROBES} {what} prompts, one per line; got {len(found)}")
    return found


def whole(value: Any, name: str) -> int:
    if value is None or value == "":
        raise refuse(f"{name} is empty; type a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise refuse(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise refuse(f"{name} must be a whole number, got {value}")
    return int(number)


def number(value: Any, name: str) -> float:
    if value is None or value == "":
        raise refuse(f"{name} is empty; type a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise refuse(f"{name} must be a number, got {value!r}") from None


def stage_progress(progress: Callable[..., Any]) -> Callable[[str, float], None]:
    """Map the service's ``(stage, fraction)`` calls onto one monotone bar."""
    shown = [0.0]

    def report(stage: str, fraction: float) -> None:
        start, end, desc = STAGES.get(stage, (shown[0], shown[0], stage))
        shown[0] = max(shown[0], start + (end - start) * min(max(fraction, 0.0), 1.0))
        progress(shown[0], desc=desc)

    return report


def _apply_with(doc: str, **how: Any) -> Callable[..., tuple[str, pd.DataFrame]]:
    """A form button's variant of ``Handlers.apply`` with ``how`` (its own endpoint, the same inputs)."""

    def variant(
        self: FormHandlers, subject: str, relation: str, target: str, paraphrases: str, neighbours: str,
        layer: Any, steps: Any, lr: Any, kl_factor: Any, note: str | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects the tracker through this default
        request: gr.Request | None = None,  # Gradio injects it (by the annotation); not part of the API
    ) -> tuple[str, pd.DataFrame]:  # fmt: skip
        return self.apply(subject, relation, target, paraphrases, neighbours, layer, steps, lr, kl_factor, note,
                          progress, request=request, **how)  # fmt: skip

    variant.__doc__ = doc
    return variant


def session(request: gr.Request | None) -> str | None:
    """Which browser tab (or API client) a call comes from."""
    return getattr(request, "session_hash", None)


def _result_text(result: ApplyResult, probes: tuple[Probe, ...], seconds: float, checked_s: float | None = None) -> str:
    """An applied edit's result; while some checks are still being answered (``checked_s`` None) it says so."""
    record = result.record
    waiting = result.pending if checked_s is None else ()
    applied = "applied, not holding" if record.not_holding else "applied"
    text = [f"**Edit #{result.edit_id} {applied}** at layer {record.layer}: "
            f"{render.fact_line(record.subject, record.relation, record.target)}",
            f"{render.checks_summary(probes, waiting).capitalize()} · applied in {seconds:.1f} s"]  # fmt: skip
    if checked_s is not None and result.pending:
        text[-1] += f", checked in {checked_s:.1f} s"
    if "target_prob" in result.stats:
        text[-1] += f" · target probability {result.stats['target_prob']:.2f}"
    if result.superseded:
        text.append("Superseded " + ", ".join(f"edit #{i}" for i in result.superseded)
                    + " (same subject and relation); re-apply it from History to go back.")  # fmt: skip
    if not render.shows_in_answers(probes):
        text.append(render.STRENGTHEN_ADVICE)
    return "\n\n".join(text)


class FormHandlers:
    """The form's handlers (a part of ``ui_handlers.Handlers``)."""

    service: EditService
    warmup: StatsWarmup | None
    _awaiting: dict[str | None, tuple[ApplyResult, float, float]]  # per session: the applied edit whose checks run

    def request(self, subject: str, relation: str, target: str, layer: Any = None) -> EditRequest:
        chosen = None if layer is None or layer == "" else whole(layer, "layer")
        if chosen == self.service.editor.hparams.layer:
            chosen = None  # the default layer: let the editor's hyperparameters decide
        with user_errors():
            request = EditRequest(subject or "", relation or "", target or "", chosen)
            request.check_layer(self.service.editor.n_layers)
        return request

    def overrides(self, steps: Any, lr: Any, kl_factor: Any) -> dict[str, Any]:
        """Advanced settings that differ from the model's defaults (validated by the editor)."""
        hp = self.service.editor.hparams
        wanted = {"steps": whole(steps, "steps"), "lr": number(lr, "learning rate"),
                  "kl_factor": number(kl_factor, "KL factor")}  # fmt: skip
        return {k: v for k, v in wanted.items() if v != getattr(hp, k)}

    def conflicts(self, subject: str, relation: str, target: str = "") -> str:
        """The warning shown while the user types: never raises (the fields may be half-filled)."""
        try:
            request = EditRequest(subject or "", relation or "", target or "_")
        except ValueError:
            return ""
        return render.conflict_notice(self.service.conflicts(request), target)

    def preview(self, subject: str, relation: str, target: str = "", chat_row: bool = True) -> tuple[str, dict[str, float], str]:
        """The model's current completion and top next tokens for the prompt; plus any conflict.

        The chat row's question is answered too (and remembered), so Apply reuses it as the "before"
        reply; ``chat_row=False`` leaves it out (right after Apply, while the checks answer it).
        """
        with user_errors():
            request = EditRequest(subject or "", relation or "", target or "_")
            question = chat_question(request.subject, request.relation) if chat_row else None
            completion, top = self.service.preview(request.prompt, question=question)
        text = f"{render.code(request.prompt)} → **{render.esc(completion) or '(nothing)'}**"
        return text, render.top_tokens(top), self.conflicts(subject, relation, target)

    def apply(
        self, subject: str, relation: str, target: str, paraphrases: str, neighbours: str,
        layer: Any, steps: Any, lr: Any, kl_factor: Any, note: str | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects the tracker through this default
        force: bool = False,
        request: gr.Request | None = None,  # Gradio injects it (by the annotation); not part of the API
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, pd.DataFrame]:  # fmt: skip
        """Apply the form's edit; ``force``: even if its own prompt does not hold after it ("Apply anyway");
        ``extra``: hyperparameters beyond the form's ("Strengthen")."""
        author = signed_in(request)
        fact = self.request(subject, relation, target, layer)
        overrides = {**self.overrides(steps, lr, kl_factor), **(extra or {})}
        checks = (lines(paraphrases, "paraphrase"), lines(neighbours, "neighbour"))
        progress(0.0, desc="Checking the request and the answers before the edit")
        t0 = time.perf_counter()
        report = stage_progress(progress)
        if self.warmup is not None:  # never compute the statistics twice, nor change weights under them
            self.warmup.wait(lambda _stage, fraction: report("waiting", fraction))
        with user_errors():
            result = self.service.apply(
                fact, paraphrases=checks[0], neighbours=checks[1], note=(note or "").strip() or None,
                author=author, progress=report, force=force, defer_checks=True, **overrides,
            )  # fmt: skip
        seconds = time.perf_counter() - t0
        self._awaiting[session(request)] = (result, seconds, t0)
        pending = [{"kind": p.kind, "prompt": p.prompt, "expected": p.expected or "its answer before",
                    "before": "checking…" if p.before is None else p.before, "after": "checking…", "holds": None}
                   for p in result.pending]  # fmt: skip
        return _result_text(result, result.probes, seconds), render.probes_frame([*result.probes, *pending])

    def finish_checks(self, request: gr.Request | None = None) -> tuple[str, pd.DataFrame]:
        """The last applied edit's result with every check answered (the paraphrases, neighbours and chat row
        are answered in the background after Apply returns)."""
        entry = self._awaiting.pop(session(request), None)
        if entry is None:
            raise gr.Error("No applied edit is waiting for its checks.")
        result, seconds, t0 = entry
        probes = self.service.checks(result.edit_id)
        text = _result_text(result, probes, seconds, checked_s=time.perf_counter() - t0)
        return text, render.probes_frame(probes)

    strengthen = _apply_with('"Strengthen": the form\'s edit with the settings that carry it into the greedy answer '
                             "and the chat reply.", extra=STRENGTHENED)  # fmt: skip
    apply_anyway = _apply_with('"Apply anyway": the form\'s edit even if its own prompt does not hold after it.',
                               force=True)  # fmt: skip

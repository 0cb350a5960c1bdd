"""Locate tab: causal tracing of a fact, and carrying its subject, relation and layer into the form.

Tracing reads the current weights, so it runs under the service's read lock (beside chats,
never beside a weight change). ``editing.tracing`` and ``editing.tracing.plot`` are imported
lazily: without them the tab shows a message and the rest of the app works.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

import gradio as gr

from chat_app import ui_render as render
from chat_app.ui_inputs import refuse
from chat_app.service import EditService

log = logging.getLogger(__name__)
MAX_PROMPT_CHARS = 300
DEFAULT_SAMPLES = 10  # noise samples per trace (the paper's choice); the tab lets the user trade it for speed
KIND_CHOICES = [("MLP", "mlp"), ("Hidden states", "hidden"), ("Attention", "attn")]  # (label, trace kind)
DEFAULT_KINDS = ("hidden", "mlp", "attn")  # all three heatmaps; MLP alone takes about a third of the time
QUICK_NOTE = ("**Quick approximation** (attribution patching: one clean, one corrupted and one backward pass give a "
              "linear estimate of every restoration). On this model it is a rough sketch: over 20 known facts its MLP "
              "map's rank correlation with the exact trace was 0.45 (median) and it suggested the same layer for 3; "
              "press **Exact trace** before relying on a layer.")  # fmt: skip
PRECISION_CHOICES = [("Auto", "auto"), ("bfloat16 (faster on CPUs that have it)", "bfloat16"),
                     ("float32 (exact)", "float32")]  # fmt: skip


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("editing.tracing", "editing.tracing.plot"))


def relation_of(prompt: str, subject: str) -> str:
    """``"The Eiffel Tower is in"``, ``"The Eiffel Tower"`` → ``"{} is in"``."""
    if subject not in prompt:
        raise ValueError(f"the subject {subject!r} does not occur in the prompt; copy it exactly (case matters)")
    return prompt.replace(subject, "{}", 1)


def trace_fact(service: EditService, prompt: str, subject: str, expected: str | None = None,
               samples: int = DEFAULT_SAMPLES, progress: Any = None, kinds: Any = DEFAULT_KINDS,
               precision: str = "auto", method: str = "exact") -> Any:  # fmt: skip
    """``editing.tracing.trace`` (``method="quick"``: ``editing.tracing.quick``) on the current model, under the read lock."""
    from editing.tracing import trace

    if method == "quick":
        from editing.tracing.quick import quick_trace

        with service.weights.read():
            return quick_trace(service.model, service.tok, prompt, subject, expected or None, samples=samples,
                               progress=progress, kinds=tuple(kinds))  # fmt: skip
    if method != "exact":
        raise ValueError(f"method must be 'quick' or 'exact', got {method!r}")
    with service.weights.read():
        return trace(service.model, service.tok, prompt, subject, expected or None, samples=samples,
                     progress=progress, kinds=tuple(kinds), precision=precision or "auto")  # fmt: skip


def chosen_kinds(kinds: Any) -> tuple[str, ...]:
    """The trace kinds ticked in the tab, in the paper's order; MLP is required (the suggested layer reads it)."""
    picked = set(kinds or ())
    if "mlp" not in picked:
        raise ValueError("keep MLP ticked: the suggested layer comes from the MLP trace")
    unknown = picked - set(DEFAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown states to restore: {sorted(unknown)}; choose from {list(DEFAULT_KINDS)}")
    return tuple(k for k in DEFAULT_KINDS if k in picked)


def locate(
    service: EditService, prompt: str, subject: str, expected: str | None = None, samples: Any = DEFAULT_SAMPLES,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects the tracker through this default
    kinds: Any = DEFAULT_KINDS, precision: str = "auto", method: str = "exact",
) -> tuple[Any, str, dict[str, Any] | None]:  # fmt: skip
    """Trace the fact (``method``: "exact" or "quick"); return the heatmaps figure, a summary and what the form takes."""
    if not available():
        raise refuse("causal tracing is not installed in this version (editing.tracing / editing.tracing.plot)")
    from editing.tracing.plot import plot_trace
    prompt, subject = (prompt or "").strip(), (subject or "").strip()
    if not prompt or not subject:
        raise refuse("type a prompt and the subject it mentions")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise refuse(f"the prompt is limited to {MAX_PROMPT_CHARS} characters")
    try:
        relation = relation_of(prompt, subject)
        picked = chosen_kinds(kinds)
        doing = "one clean, one corrupted and one backward pass" if method == "quick" else "restoring states one by one"
        progress(0.0, desc=f"Tracing: corrupting the subject, then {doing}")
        result = trace_fact(service, prompt, subject, (expected or "").strip() or None, int(samples),
                            lambda _stage, f: progress(f, desc=f"Tracing: {doing}"), picked, precision, method)  # fmt: skip
    except ValueError as err:
        raise refuse(str(err)) from err
    figure = plot_trace(result, model_name=result.model_name)
    layer, advice = layer_advice(result, service.editor.hparams.layer)
    summary = (
        f"The model answers {render.code(result.answer)} (p = {result.clean_prob:.3f}; "
        f"{result.corrupted_prob:.3f} with the subject corrupted). {advice}"
    )
    if method == "quick":
        figure.suptitle(figure._suptitle.get_text() + " · quick approximation", fontsize=10)  # noqa: SLF001
        summary += "\n\n" + QUICK_NOTE
    elif result.precision != "float32":
        summary += (f"\n\nComputed with {result.precision} matrix products: scores may differ from exact "
                    "float32 by about 0.01; choose float32 for exact figures.")  # fmt: skip
    return figure, summary, {"subject": subject, "relation": relation, "layer": layer}


def layer_advice(result: Any, default_layer: int) -> tuple[int, str]:
    """The layer to carry into the form, and why: the suggestion, or the default when the trace's signal is weak."""
    from editing.tracing import best_at_last_subject, strongest_mlp_site, suggestion_is_weak

    suggested, at_last = best_at_last_subject(result)
    if not suggestion_is_weak(result):
        return suggested, (
            f"**Suggested layer: {suggested}**: the MLP whose restoration at the last subject token brings "
            f"the answer back the most (indirect effect {at_last:.3f})."
        )
    token, layer, strongest = strongest_mlp_site(result)
    return default_layer, (
        f"The strongest MLP effect is at token {render.code(result.tokens[token])}, layer {layer} "
        f"({strongest:.3f}). At the last subject token, where ROME edits, it is weak "
        f"(at most {max(at_last, 0.0):.3f}, at layer {suggested}), so this trace does not choose a layer: "
        f"**use the model's default layer {default_layer}**, chosen by CounterFact measurements."
    )


def carry(located: dict[str, Any] | None) -> tuple[str, str, int, Any, Any]:
    """Fill the form from the last trace, open its advanced settings (the layer) and switch to it."""
    if not located:
        raise refuse("run a trace first")
    return (located["subject"], located["relation"], int(located["layer"]), gr.Accordion(open=True),
            gr.Tabs(selected="form"))  # fmt: skip

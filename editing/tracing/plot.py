"""Pictures of causal traces: heatmaps as in Meng et al. 2022, Figures 1 (e, f, g) and 2.

Figures are built on the Agg canvas directly (no pyplot, no display), so this works in
threads and on headless machines; save one with ``fig.savefig("trace.png")``.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from editing.tracing.result import TraceResult

_STYLE = {  # kind -> (colour map, panel title, x-axis label)
    "hidden": ("Purples", "restoring the hidden state", "single restored layer"),
    "mlp": ("Greens", "restoring MLP outputs", "centre of {window} restored MLP layers"),
    "attn": ("Reds", "restoring attention outputs", "centre of {window} restored attention layers"),
}


def _new_figure(n_panels: int, n_rows: int) -> Figure:
    fig = Figure(figsize=(max(4.6 * n_panels, 8.0), 1.8 + 0.32 * max(n_rows, 6)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_trace(result: TraceResult, model_name: str | None = None) -> Figure:
    """One panel per traced kind: tokens down (subject tokens marked ``*``), layers across, colour = p(answer)."""
    first, end = result.subject_range
    labels = [f"{t!r}*" if first <= i < end else repr(t) for i, t in enumerate(result.tokens)]
    fig = _new_figure(len(result.scores), len(labels))
    axes = fig.subplots(1, len(result.scores), squeeze=False)[0]
    for ax, (kind, scores) in zip(axes, result.scores.items()):
        cmap, title, xlabel = _STYLE[kind]
        image = ax.pcolormesh(
            scores.float().numpy(), cmap=cmap, vmin=min(result.corrupted_prob, float(scores.min())), shading="nearest"
        )
        ax.invert_yaxis()
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel.format(window=result.window))
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(f"p({result.answer!r})")
    headline = f"{model_name or result.model_name}: {result.prompt!r} → {result.answer!r}"
    fig.suptitle(
        textwrap.fill(headline, width=int(13 * fig.get_figwidth()))
        + f"\nclean p = {result.clean_prob:.3f}, corrupted p = {result.corrupted_prob:.3f}"
        + (f", matrix products in {result.precision}" if result.precision != "float32" else ""),
        fontsize=10,
    )
    return fig


def plot_average_effects(
    effects: dict[str, torch.Tensor], row_labels: Sequence[str], title: str, n_facts: int, window: int
) -> Figure:
    """Average indirect effect per (token position class, layer) for each kind, as in Figure 2."""
    fig = _new_figure(len(effects), len(row_labels))
    axes = fig.subplots(1, len(effects), squeeze=False)[0]
    for ax, (kind, effect) in zip(axes, effects.items()):
        cmap, panel, xlabel = _STYLE[kind]
        image = ax.pcolormesh(effect.float().numpy(), cmap=cmap, vmin=0.0, shading="nearest")
        ax.invert_yaxis()
        ax.set_yticks(range(len(row_labels)), list(row_labels), fontsize=8)
        ax.set_title(f"average effect of {panel[len('restoring ') :]}", fontsize=10)
        ax.set_xlabel(xlabel.format(window=window))
        fig.colorbar(image, ax=ax).set_label("average indirect effect")
    fig.suptitle(f"{title} (n = {n_facts} facts)", fontsize=10)
    return fig

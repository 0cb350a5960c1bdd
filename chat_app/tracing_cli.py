"""``python app.py trace``: a causal trace of one fact, saved as a PNG.

The model is built through the app's own start-up path (``build_service``: model, ledger, replay),
so the trace shows the model the chat serves, with every applied edit, as the Locate tab does.
"""
from __future__ import annotations

import logging
import sys

from chat_app.runtime import Settings, build_service

log = logging.getLogger(__name__)


def trace_to_png(settings: Settings, prompt: str, subject: str, out: str, precision: str = "auto") -> int:
    """Trace the served (edited) model; errors go to stderr with exit code 2."""
    from editing.tracing.plot import plot_trace
    from editing.tracing import strongest_mlp_site, suggest_layer, suggestion_is_weak, trace

    try:
        service, report = build_service(settings)
        with service.weights.read(long=True):
            result = trace(service.model, service.tok, prompt, subject, precision=precision)
        name = settings.model or "SmolLM2-135M-Instruct"
        plot_trace(result, model_name=name).savefig(out, dpi=120, bbox_inches="tight")
    except (ValueError, PermissionError, OSError) as err:  # LedgerError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    edits = f"{report.replayed} applied edits" if report.replayed else "no edits"
    print(f"answer {result.answer!r} (p={result.clean_prob:.3f}); suggested layer {suggest_layer(result)}; "
          f"{result.precision}; model with {edits}; saved {out}")  # fmt: skip
    if suggestion_is_weak(result):
        token, layer, effect = strongest_mlp_site(result)
        print(f"note: the MLP signal at the last subject token is weak; the strongest MLP effect is at token "
              f"{result.tokens[token]!r}, layer {layer} ({effect:.3f}), so prefer the model's default layer")  # fmt: skip
    return 0

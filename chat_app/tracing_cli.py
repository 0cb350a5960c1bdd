"""``python app.py trace``: a causal trace of one fact, saved as a PNG."""
from __future__ import annotations

import logging

from chat_app.runtime import Settings
from editing import load_model

log = logging.getLogger(__name__)


def trace_to_png(settings: Settings, prompt: str, subject: str, out: str, precision: str = "auto") -> int:
    from editing.tracing.plot import plot_trace
    from editing.tracing import strongest_mlp_site, suggest_layer, suggestion_is_weak, trace

    model, tok = load_model(settings.model, device=settings.device)
    try:
        result = trace(model, tok, prompt, subject, precision=precision)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    name = settings.model or "SmolLM2-135M-Instruct"
    plot_trace(result, model_name=name).savefig(out, dpi=120, bbox_inches="tight")
    print(f"answer {result.answer!r} (p={result.clean_prob:.3f}); suggested layer {suggest_layer(result)}; "
          f"{result.precision}; saved {out}")  # fmt: skip
    if suggestion_is_weak(result):
        token, layer, effect = strongest_mlp_site(result)
        print(f"note: the MLP signal at the last subject token is weak; the strongest MLP effect is at token "
              f"{result.tokens[token]!r}, layer {layer} ({effect:.3f}), so prefer the model's default layer")  # fmt: skip
    return 0

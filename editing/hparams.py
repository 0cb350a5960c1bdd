"""ROME hyperparameters: a frozen dataclass with per-family defaults."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from editing.arch import n_layers
from editing.defaults import PRECISIONS


KL_DIRECTIONS = ("original||edited", "edited||original")
BATCH_KEYS = ("mean", "exact", "prompt")  # compute_batch's key columns per fact (see ``batch_keys``)


@dataclass(frozen=True)
class RomeHyperParams:
    layer: int  # block whose MLP output projection is rewritten
    lr: float = 0.5  # Adam learning rate for the value delta
    steps: int = 20  # most optimisation steps
    early_stop_loss: float = 0.05  # stop once the target's mean NLL is below this
    kl_factor: float = 0.0625  # weight of the KL term on "{subject} is a"
    kl_direction: str = "original||edited"  # or "edited||original", the reference code's (README, "Value loss")
    norm_penalty: float = 0.5  # weight of ||delta|| / ||v0||^norm_power in the loss
    norm_power: int = 1  # 1: scale-free ||delta|| / ||v0||; 2: the reference code's ||delta|| / ||v0||^2
    early_stop_on: str = "nll"  # "nll": the target's NLL; "loss": the whole loss, as the reference code
    clamp_factor: float = 4.0  # ||delta|| is clamped to this times ||v0||
    kl_prompt: str = "{} is a"  # essence prompt kept stable by the KL term
    templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (tokens, count) of context prefixes
    value_templates: int = 21  # how many of the context prompts the value optimisation uses
    stats_samples: int = 1000  # corpus texts for C = E[k k^T] (measured: README)
    stats_max_tokens: int = 256  # each text is truncated to this many tokens
    stats_precision: str = "auto"  # the statistics' forward pass: "auto" (bfloat16 where the CPU has it), "float32", "bfloat16"
    seed: int = 0  # seeds template generation
    # Edits computed for chat (editing/chat_rows.py, editing/value_stop.py; measured: notes/README-chat.md)
    chat_values: int = 0  # chat-wrapped value prompts added (question in the user turn, answer in the assistant's)
    chat_keys: int = 0  # chat-wrapped contexts added to the key average
    stop_on: str = "mean"  # early stop when the "mean" or the "worst" value prompt's NLL is below early_stop_loss
    greedy_check: int = 0  # >0: also stop only once the greedy answer is the target; at most this many extra steps
    update: str = "r-rome"  # "r-rome" (C⁻¹-weighted) or "alphaedit" (null-space projected, with the key cache; in compute_batch: at every batch layer)
    null_space_threshold: float = 2e-2  # alphaedit: eigenvalues of C below this span the editable directions
    cache_l2: float = 1e-2  # alphaedit: α, the ridge term of the projected solve
    batch_layers: tuple[int, ...] = ()  # memit: layers a batch is spread over (empty: the 5 ending at ``layer``)
    mom2_weight: float = 1000.0  # memit: λ in ΔW = R Kᵀ (λ C + K_c K_cᵀ + K Kᵀ)⁻¹ (100 facts over layers 5–9: README)
    cache_weight: float = 1.0  # memit: weight of K_c, the keys of the edits already applied at the layer (0: off)
    exact_keys: int = 0  # 1: the update maps k*, the bare prompt's key and 2 chat keys each to the full delta
    # compute_batch: "mean", each fact's k*; "exact", also its bare prompt's and chat keys, sharing its
    # residual; "prompt", k* and the bare prompt's key only
    batch_keys: str = "mean"
    batch_key_weight: float = 1.0  # batch_keys="exact"|"prompt": the weight of those extra key columns in the least squares (1: as k*)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = {"int": int, "float": (int, float), "str": str}.get(str(field.type))
            if kind is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ValueError(f"{field.name} must be {str(field.type).replace('float', 'a number').replace('int', 'a whole number').replace('str', 'text')}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, got {value}")
        checks = [
            (0 < self.lr <= 10, "lr must be in (0, 10]"),
            (1 <= self.steps <= 200, "steps must be between 1 and 200"),
            (0 <= self.early_stop_loss < 10, "early_stop_loss must be in [0, 10)"),
            (0 <= self.kl_factor <= 100, "kl_factor must be in [0, 100]"),
            (0 <= self.norm_penalty <= 100, "norm_penalty must be in [0, 100]"),
            (self.kl_direction in KL_DIRECTIONS, f"kl_direction must be one of {', '.join(KL_DIRECTIONS)}"),
            (self.norm_power in (1, 2), "norm_power must be 1 (||delta|| / ||v0||) or 2 (||delta|| / ||v0||^2)"),
            (self.early_stop_on in ("nll", "loss"), "early_stop_on must be 'nll' or 'loss'"),
            (0 < self.clamp_factor <= 100, "clamp_factor must be in (0, 100]"),
            (self.kl_prompt.count("{}") == 1, "kl_prompt must contain exactly one {}"),
            (1 <= self.value_templates <= 1 + sum(n for _, n in self.templates), "value_templates out of range"),
            (1 <= self.stats_samples <= 10_000_000, "stats_samples must be positive"),
            (self.stats_precision in PRECISIONS, f"stats_precision must be one of {', '.join(PRECISIONS)}"),
            (self.layer >= 0, "layer must be non-negative"),
            (0 <= self.chat_values <= 8, "chat_values must be between 0 and 8"),
            (0 <= self.chat_keys <= 8, "chat_keys must be between 0 and 8"),
            (self.stop_on in ("mean", "worst"), "stop_on must be 'mean' or 'worst'"),
            (0 <= self.greedy_check <= 50, "greedy_check must be between 0 and 50 extra steps"),
            (self.update in ("r-rome", "alphaedit", "memit"), "update must be 'r-rome', 'alphaedit' or 'memit'"),
            (self.mom2_weight > 0, "mom2_weight must be positive"),
            (self.cache_weight >= 0, "cache_weight must be zero or positive"),
            (all(isinstance(x, int) and x >= 0 for x in self.batch_layers), "batch_layers must be layer numbers"),
            (self.null_space_threshold > 0, "null_space_threshold must be positive"),
            (self.cache_l2 > 0, "cache_l2 must be positive"),
            (self.exact_keys in (0, 1), "exact_keys must be 0 or 1"),
            (self.batch_keys in BATCH_KEYS, f"batch_keys must be one of {', '.join(map(repr, BATCH_KEYS))}"),
            (0 < self.batch_key_weight <= 1, "batch_key_weight must be above 0 and at most 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def replace(self, **changes: Any) -> RomeHyperParams:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RomeHyperParams:
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {k: v for k, v in data.items() if k in known}
        if "templates" in clean:
            clean["templates"] = tuple(tuple(t) for t in clean["templates"])
        if "batch_layers" in clean:
            clean["batch_layers"] = tuple(clean["batch_layers"])
        return cls(**clean)


# Default layer as a fraction of depth, per family; measured values override (see README).
_LAYER_FRACTION = {"gpt2": 0.35, "gptj": 0.18, "gpt_neox": 0.25}
_DEFAULT_LAYER_FRACTION = 0.25
# Measured on the default model (SmolLM2-135M-Instruct, 30 layers; README, "How the defaults were
# chosen"): 11 value prompts and lr 2.0 matched the reference settings' ES/PS/NS on 36 CounterFact
# development cases in about half the steps. Layer 9 over 5 and 14: layer 5 keeps neighbourhood
# specificity better (-4.1 points against -12.5) but its edits did not carry into the chat answer
# of the named Eiffel Tower test; layer 14 was worse on every score. exact_keys=1 against 0 on 48
# development cases: equal or better on every score, the greedy answer (GE 100 against 93.8) and the
# chat reply (CE 87.5 / CO 2.1 against 83.3 / 12.5) most (README, "What the chat shows after an edit").
# Unmeasured families keep the reference settings.
_MEASURED = {("llama", 30, 576): {"layer": 9, "lr": 2.0, "value_templates": 11, "exact_keys": 1}}


def default_hparams(model: nn.Module) -> RomeHyperParams:
    """Hyperparameters for ``model``'s family, with its default layer."""
    config = model.config
    depth = n_layers(model)
    key = (config.model_type, depth, getattr(config, "hidden_size", None))
    if key in _MEASURED:
        return RomeHyperParams(**_MEASURED[key])
    fraction = _LAYER_FRACTION.get(config.model_type, _DEFAULT_LAYER_FRACTION)
    return RomeHyperParams(layer=min(depth - 1, max(0, round(fraction * depth))))

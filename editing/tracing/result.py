"""What a trace returns, and the layer it suggests for ROME (the MLP at the last subject token)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

WEAK_SHARE = 0.5  # last subject token's MLP effect below this share of the strongest: no clear layer


@dataclass(frozen=True)
class TraceResult:
    """Scores of one traced fact; ``scores[kind]`` is (tokens, layers): the answer's probability when restored."""

    prompt: str
    subject: str
    tokens: list[str]  # decoded prompt tokens
    subject_range: tuple[int, int]  # (first subject token, last subject token + 1)
    answer: str
    answer_id: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, torch.Tensor]
    noise: float  # noise standard deviation used
    samples: int
    window: int
    seed: int
    model_name: str
    precision: str = "float32"  # arithmetic of the matrix products: "float32" (exact) or "bfloat16"

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """(tokens, layers): restored probability minus the corrupted baseline."""
        if kind not in self.scores:
            raise ValueError(f"kind {kind!r} was not traced; traced: {', '.join(self.scores)}")
        return self.scores[kind] - self.corrupted_prob

    @property
    def last_subject_token(self) -> int:
        return self.subject_range[1] - 1


def best_at_last_subject(result: TraceResult) -> tuple[int, float]:
    """``(layer, indirect effect)`` of the MLP window that restores the most at the last subject token."""
    effects = result.indirect_effect("mlp")[result.last_subject_token]
    layer = int(effects.argmax())
    return layer, float(effects[layer])


def suggest_layer(result: TraceResult) -> int:
    """The layer whose MLP window restores the most at the last subject token."""
    return best_at_last_subject(result)[0]


def strongest_mlp_site(result: TraceResult) -> tuple[int, int, float]:
    """``(token, layer, indirect effect)`` of the MLP window that restores the most anywhere in the prompt."""
    effect = result.indirect_effect("mlp")
    token, layer = divmod(int(effect.argmax()), effect.shape[1])
    return token, layer, float(effect[token, layer])


def suggestion_is_weak(result: TraceResult, share: float = WEAK_SHARE) -> bool:
    """True when the last subject token's best MLP effect is under ``share`` of the strongest MLP effect.

    ROME edits at the last subject token; when the fact sits elsewhere (e.g. a middle subject token,
    as for several facts in SmolLM2), ``suggest_layer`` follows noise rather than a site.
    """
    strongest = strongest_mlp_site(result)[2]
    return strongest <= 0 or best_at_last_subject(result)[1] < share * strongest

"""``RomeEditor``: compute, apply and revert rank-one edits on one model."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import get_module, is_transposed, mlp_out_param_name, n_layers, rank_one_delta
from editing.edit import RankOneEdit
from editing.fingerprint import model_fingerprint, tensor_checksum
from editing.nethook import replace_weights
from editing.hparams import RomeHyperParams, default_hparams
from editing.request import EditRequest
from editing.rome import Progress, compute_key, factor_cov, rank_one_factors
from editing.rows import Row, key_row, kl_row, rewrite_row
from editing.stats import second_moment
from editing.templates import context_templates
from editing.chat_rows import STYLES as CHAT_STYLES
from editing.chat_rows import chat_rows, exact_key_dir
from editing.value import optimise_value
from editing.value_stop import StopRule, greedy_check

log = logging.getLogger(__name__)
MAX_PROMPT_TOKENS = 128


class RomeEditor:
    """Owns the edits applied to ``model``. Not thread-safe: callers serialise changes.

    Invariant: every edited parameter equals its baseline plus the applied edits' factors,
    added in order (``_add``), so any revert is an exact rebuild.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        hparams: RomeHyperParams | None = None,
        *,
        corpus: Path | None = None,
        fingerprint: str | None = None,
        method: str = "fast",
    ) -> None:
        self.model, self.tok = model, tok
        self.hparams = hparams or default_hparams(model)
        self.fingerprint = fingerprint or model_fingerprint(model)
        self.corpus = corpus
        self.method = method
        self.n_layers = n_layers(model)
        self._baseline: dict[str, torch.Tensor] = {}
        self._applied: list[RankOneEdit] = []
        self._covs: dict[tuple[int, int], torch.Tensor] = {}
        self._lus: dict[tuple[int, int], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._templates: list[str] | None = None

    # ----- preparation -------------------------------------------------------------
    def hparams_for(self, request: EditRequest, **overrides: object) -> RomeHyperParams:
        """Hyperparameters for ``request`` (its layer wins), validated against this model."""
        request.check_layer(self.n_layers)
        hp = self.hparams.replace(**overrides) if overrides else self.hparams
        if request.layer is not None:
            hp = hp.replace(layer=request.layer)
        if not 0 <= hp.layer < self.n_layers:
            raise ValueError(f"layer {hp.layer} is out of range; this model has layers 0 to {self.n_layers - 1}")
        return hp

    def context_templates(self) -> list[str]:
        if self._templates is None:
            hp = self.hparams
            with self.original_weights():
                self._templates = context_templates(self.model, self.tok, self.fingerprint, hp.templates, hp.seed)
        return self._templates

    def cov(self, layer: int, n_samples: int | None = None, progress: Progress | None = None) -> torch.Tensor:
        """C = E[k kᵀ] at ``layer`` of the unedited model (float64, CPU)."""
        n = n_samples or self.hparams.stats_samples
        if (layer, n) not in self._covs:
            with self.original_weights():
                self._covs[(layer, n)] = second_moment(
                    self.model, self.tok, self.fingerprint, layer, n,
                    self.hparams.stats_max_tokens, self.corpus, progress,
                )  # fmt: skip
        return self._covs[(layer, n)]

    def _cov_lu(self, layer: int, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LU factors of ``cov(layer, n_samples)``, cached for as long as that matrix is the one in use."""
        cov = self.cov(layer, n_samples)
        cached = self._lus.get((layer, n_samples))
        if cached is None or cached[0] is not cov:
            cached = self._lus[(layer, n_samples)] = (cov, factor_cov(cov))
        return cached[1]

    def rows(self, request: EditRequest, hp: RomeHyperParams) -> tuple[list[Row], list[Row], Row]:
        """Key rows, value rows and the KL row; raises ``ValueError`` if the request does not tokenise."""
        templates = self.context_templates()
        keys = [key_row(self.tok, t, request) for t in templates] + chat_rows(self.tok, request, hp.chat_keys, key=True)
        values = [rewrite_row(self.tok, t, request) for t in templates[: hp.value_templates]]
        values += chat_rows(self.tok, request, hp.chat_values)
        if len(values[0].input_ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"the prompt and target are longer than {MAX_PROMPT_TOKENS} tokens")
        return keys, values, kl_row(self.tok, hp.kl_prompt, request.subject)

    def _stop_rule(self, request: EditRequest, hp: RomeHyperParams) -> StopRule | None:
        """The chat-aware stop (worst prompt, greedy check on the bare prompt and both chat styles), if asked for."""
        if hp.stop_on == "mean" and hp.greedy_check == 0:
            return None
        check = None
        if hp.greedy_check > 0:
            rows = [rewrite_row(self.tok, "{}", request)]
            if getattr(self.tok, "chat_template", None) is not None:
                rows += chat_rows(self.tok, request, len(CHAT_STYLES))
            check = greedy_check(self.model, hp.layer, rows, self.tok.pad_token_id)
        return StopRule(hp, check)

    def _exact_keys(self, request: EditRequest, hp: RomeHyperParams, key: torch.Tensor) -> torch.Tensor:
        """k*, the bare prompt's key and (with a chat template) each chat style's key, one per row."""
        rows = [key_row(self.tok, "{}", request)]
        if getattr(self.tok, "chat_template", None) is not None:
            rows += chat_rows(self.tok, request, len(CHAT_STYLES), key=True)
        pad = self.tok.pad_token_id
        return torch.stack([key, *(compute_key(self.model, hp.layer, [r], pad) for r in rows)])

    def validate(self, request: EditRequest, **overrides: object) -> RomeHyperParams:
        hp = self.hparams_for(request, **overrides)
        self.rows(request, hp)
        return hp

    # ----- computing ------------------------------------------------------------------
    def compute(self, request: EditRequest, progress: Progress | None = None, **overrides: object) -> RankOneEdit:
        """The edit for ``request`` on the current weights. The model's weights are unchanged on return."""
        hp = self.hparams_for(request, **overrides)
        key_rows, value_rows, kl = self.rows(request, hp)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cov = self.cov(hp.layer, hp.stats_samples, progress)
        timings["stats_s"] = time.perf_counter() - t0
        name = mlp_out_param_name(self.model, hp.layer)
        param = self.model.get_parameter(name)
        before = tensor_checksum(param)
        t0 = time.perf_counter()
        key = compute_key(self.model, hp.layer, key_rows, self.tok.pad_token_id)
        if progress is not None:
            progress("key", 1.0)
        timings["key_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = optimise_value(
            self.model, hp, key, value_rows, kl, self.tok.pad_token_id, self.method, progress, self._stop_rule(request, hp)
        )
        timings["value_s"] = time.perf_counter() - t0
        value_dir, key_dir = rank_one_factors(cov, key, result.delta, self._cov_lu(hp.layer, hp.stats_samples))
        if hp.exact_keys:
            key_dir = exact_key_dir(self._cov_lu(hp.layer, hp.stats_samples), self._exact_keys(request, hp, key))
        if not (torch.isfinite(value_dir).all() and torch.isfinite(key_dir).all()):
            raise FloatingPointError("the computed update has non-finite values")
        after = tensor_checksum(self._added(name, value_dir, key_dir))
        if progress is not None:
            progress("update", 1.0)
        stats = {
            **{k: round(v, 4) for k, v in timings.items()},
            "steps": result.steps,
            "losses": [round(x, 5) for x in result.losses],
            "target_prob": result.target_prob,
            "delta_norm": float(result.delta.norm()),
            "v0_norm": result.v0_norm,
            "update_norm": float(value_dir.norm() * key_dir.norm()),
        }
        return RankOneEdit(
            request=request, layer=hp.layer, param_name=name, value_dir=value_dir.cpu(), key_dir=key_dir.cpu(),
            hparams=hp.to_dict(), fingerprint=self.fingerprint, checksum_before=before, checksum_after=after,
            stats=stats,
        )  # fmt: skip

    # ----- weights ----------------------------------------------------------------------
    def _added(
        self, name: str, value_dir: torch.Tensor, key_dir: torch.Tensor, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``base`` (default: the parameter) plus ``value_dir ⊗ key_dir``, added in float32 and cast once (not in place)."""
        param = self.model.get_parameter(name) if base is None else base
        module = get_module(self.model, name.rsplit(".", 1)[0])
        delta = rank_one_delta(module, value_dir.to(param.device), key_dir.to(param.device))
        return (param.detach().float() + delta).to(param.dtype)

    def _check(self, edit: RankOneEdit) -> None:
        if edit.fingerprint != self.fingerprint:
            raise ValueError(
                f"this edit was made for another model (fingerprint {edit.fingerprint[:12]}…, "
                f"this model is {self.fingerprint[:12]}…)"
            )
        param = self.model.get_parameter(edit.param_name)
        shape = param.shape
        module = get_module(self.model, edit.param_name.rsplit(".", 1)[0])
        d_out, d_in = (shape[1], shape[0]) if is_transposed(module) else (shape[0], shape[1])
        if edit.value_dir.numel() != d_out or edit.key_dir.numel() != d_in:
            raise ValueError(f"edit factors do not fit {edit.param_name} {tuple(shape)}")

    @torch.no_grad()
    def apply(self, edit: RankOneEdit) -> str:
        """Add ``edit`` on top of the applied ones; return the parameter's new checksum."""
        self._check(edit)
        if any(e is edit for e in self._applied):
            raise ValueError("this edit is already applied")
        param = self.model.get_parameter(edit.param_name)
        self._baseline.setdefault(edit.param_name, param.detach().clone())
        param.copy_(self._added(edit.param_name, edit.value_dir, edit.key_dir))
        self._applied.append(edit)
        return tensor_checksum(param)

    @torch.no_grad()
    def revert(self, edit: RankOneEdit) -> str:
        """Remove ``edit``: rebuild its parameter from the baseline plus the remaining edits, in order."""
        if not any(e is edit for e in self._applied):
            raise ValueError("this edit is not applied")
        self._applied = [e for e in self._applied if e is not edit]
        return self._rebuild(edit.param_name)

    @torch.no_grad()
    def _rebuild(self, name: str) -> str:
        param = self.model.get_parameter(name)
        param.copy_(self._baseline[name])
        for edit in self._applied:
            if edit.param_name == name:
                param.copy_(self._added(name, edit.value_dir, edit.key_dir))
        return tensor_checksum(param)

    @torch.no_grad()
    def rebuild(self, edits: list[RankOneEdit]) -> None:
        """Make the weights exactly baseline + ``edits`` in this order (e.g. to match a ledger)."""
        for edit in edits:
            self._check(edit)
            param = self.model.get_parameter(edit.param_name)
            self._baseline.setdefault(edit.param_name, param.detach().clone())
        self._applied = list(edits)
        for name in self._baseline:
            self._rebuild(name)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unedited weights."""
        for name, base in self._baseline.items():
            self.model.get_parameter(name).copy_(base)
        self._applied = []

    @torch.no_grad()
    def sequence_checksums(self) -> list[str]:
        """For each applied edit, in order: its parameter's checksum right after it was added."""
        state = {name: base.clone() for name, base in self._baseline.items()}
        sums = []
        for edit in self._applied:
            state[edit.param_name] = self._added(edit.param_name, edit.value_dir, edit.key_dir, state[edit.param_name])
            sums.append(tensor_checksum(state[edit.param_name]))
        return sums

    @property
    def applied(self) -> tuple[RankOneEdit, ...]:
        return tuple(self._applied)

    @contextmanager
    def original_weights(self) -> Iterator[None]:
        """Forward passes in this thread see the unedited weights; the parameters are not touched."""
        with replace_weights(self.model, dict(self._baseline)):
            yield

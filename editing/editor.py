"""``RomeEditor``: compute, apply and revert rank-one edits on one model."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import get_module, is_transposed, mlp_out_param_name, n_layers
from editing.edit import RankOneEdit
from editing.fingerprint import identify_model, tensor_checksum
from editing.memit import BatchEdit, compute_batch
from editing.hparams import RomeHyperParams, default_hparams
from editing.placement import layer_weight
from editing.projection import Projection, null_space_projection, projected_key_dir, recover_key, reduced_gram, stack_keys
from editing.request import EditRequest
from editing.weights import EditedWeights
from editing.rome import Progress, factor_cov, rank_one_factors, row_keys
from editing.rows import Row, key_row, kl_row, rewrite_row
from editing.stats import second_moment
from editing.templates import context_templates
from editing.chat_rows import STYLES as CHAT_STYLES
from editing.chat_rows import chat_rows, exact_key_dir
from editing.value import optimise_value
from editing.value_stop import StopRule, greedy_check

log = logging.getLogger(__name__)
MAX_PROMPT_TOKENS = 128


def _template_key(hp: RomeHyperParams) -> tuple[tuple[tuple[int, int], ...], int]:
    """(templates, seed) as a hashable key; overrides from JSON arrive as lists."""
    return tuple((int(n), int(c)) for n, c in hp.templates), hp.seed


class RomeEditor(EditedWeights):
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
        self.fingerprint = fingerprint or identify_model(model)
        self.corpus = corpus
        self.method = method
        self.n_layers = n_layers(model)
        self._baseline: dict[str, torch.Tensor] = {}
        self._applied: list[RankOneEdit] = []
        self._covs: dict[tuple[int, int], torch.Tensor] = {}
        self._lus: dict[tuple[int, int], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._template_sets: dict[tuple[tuple[tuple[int, int], ...], int], list[str]] = {}  # (templates, seed) -> list
        self._local = threading.local()  # .view: this thread's parameter overrides (see ``view``)
        self._projections: dict[tuple[int, int, float], tuple[torch.Tensor, Projection]] = {}
        # layer -> (basis, the cached edits summed, their Gram, key count): see ``cache_gram``
        self._grams: dict[int, tuple[torch.Tensor | None, list[RankOneEdit], torch.Tensor, int]] = {}

    # ----- preparation -------------------------------------------------------------
    def hparams_for(self, request: EditRequest, **overrides: object) -> RomeHyperParams:
        """Hyperparameters for ``request`` (its layer wins), validated against this model."""
        request.check_layer(self.n_layers)
        hp = self.hparams.replace(**overrides) if overrides else self.hparams
        if request.layer is not None:
            hp = hp.replace(layer=request.layer)
        if not 0 <= hp.layer < self.n_layers:
            raise ValueError(f"layer {hp.layer} is out of range; this model has layers 0 to {self.n_layers - 1}")
        layer_weight(self.model, hp.layer)  # refuses a layer the device map offloaded
        return hp

    def context_templates(self, hp: RomeHyperParams | None = None) -> list[str]:
        """The context prefixes for ``hp``'s ``templates`` and ``seed`` (default: the editor's), from the unedited model."""
        key = _template_key(hp or self.hparams)
        if key not in self._template_sets:
            with self.original_weights():
                self._template_sets[key] = context_templates(self.model, self.tok, self.fingerprint, *key)
        return self._template_sets[key]

    @property
    def _templates(self) -> list[str] | None:
        """The default hyperparameters' templates (tests set them to skip generation)."""
        return self._template_sets.get(_template_key(self.hparams))

    @_templates.setter
    def _templates(self, templates: list[str]) -> None:
        self._template_sets[_template_key(self.hparams)] = templates

    def cov(self, layer: int, n_samples: int | None = None, progress: Progress | None = None) -> torch.Tensor:
        """C = E[k kᵀ] at ``layer`` of the unedited model (float64, CPU)."""
        n = n_samples or self.hparams.stats_samples
        key = (layer, n)  # one statistics precision per editor: the hparams it was made with
        if key not in self._covs:
            self._covs[key] = second_moment(
                self.model, self.tok, self.fingerprint, layer, n, self.hparams.stats_max_tokens, self.corpus,
                progress, precision=self.hparams.stats_precision, weights=dict(self._baseline),
            )  # fmt: skip
        return self._covs[key]

    def _cov_lu(self, layer: int, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LU factors of ``cov(layer, n_samples)``, cached for as long as that matrix is the one in use."""
        cov = self.cov(layer, n_samples)
        cached = self._lus.get((layer, n_samples))
        if cached is None or cached[0] is not cov:
            cached = self._lus[(layer, n_samples)] = (cov, factor_cov(cov))
        return cached[1]

    def projection(self, layer: int, n_samples: int, threshold: float) -> Projection:
        """AlphaEdit's P for ``cov(layer, n_samples)``, cached for as long as that matrix is the one in use."""
        cov = self.cov(layer, n_samples)
        cached = self._projections.get((layer, n_samples, threshold))
        if cached is None or cached[0] is not cov:
            cached = self._projections[(layer, n_samples, threshold)] = (cov, null_space_projection(cov, threshold))
        return cached[1]

    def _cached_edits(self, layer: int) -> list[RankOneEdit]:
        """The applied edits at ``layer``, in order (inside ``view(without=...)``, not those)."""
        name = mlp_out_param_name(self.model, layer)
        hidden = getattr(self._local, "without", ())
        return [e for e in self._applied if e.param_name == name and not any(e is w for w in hidden)]

    def _edit_keys(self, edit: RankOneEdit, layer: int) -> list[torch.Tensor]:
        """``edit``'s k*, then its ``extra_keys`` times √``batch_key_weight`` (the weight they were solved with).
        An edit stored without its key (made before keys were kept) is an r-ROME edit: its key is
        recovered from its factors and that layer's statistics."""
        if edit.key is None:
            samples = int(edit.hparams.get("stats_samples", self.hparams.stats_samples))
            keys = [recover_key(edit.value_dir, edit.key_dir, self.cov(layer, samples))]
        else:
            keys = [edit.key]
        if edit.extra_keys is None:
            return keys
        root_w = float(edit.hparams.get("batch_key_weight", 1.0)) ** 0.5
        return keys + list(edit.extra_keys if root_w == 1 else edit.extra_keys * root_w)

    def key_cache(self, layer: int) -> torch.Tensor:
        """(d_in, n): the keys k* of the edits applied at ``layer``, each followed by its ``extra_keys``, in order.

        Because it is derived, revert, re-apply, ``rebuild`` and ``reset`` keep it exact.
        """
        name = mlp_out_param_name(self.model, layer)
        keys = [k for edit in self._cached_edits(layer) for k in self._edit_keys(edit, layer)]
        return stack_keys(keys, self.model.get_parameter(name).shape[self._in_axis(name)])

    def cache_gram(self, layer: int, basis: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """``(G, m)``: G = Σ over the cached edits of (ÛᵀK_e)(ÛᵀK_e)ᵀ (float64), K_e an edit's keys, m all keys.

        With ``basis`` None, Û = I: G = K_c K_cᵀ of ``key_cache(layer)``. G is summed edit by edit in
        the applied order and remembered, so an edit on top of n others adds only its own keys instead
        of re-reading every cached key; any other change (a revert, a view without some edits) sums
        again from the first edit, in the same order, so both ways give the same bits.
        """
        edits = self._cached_edits(layer)
        memo = self._grams.get(layer)
        if memo is not None and memo[0] is basis and len(memo[1]) <= len(edits) and all(
            a is b for a, b in zip(memo[1], edits)
        ):
            _, done, gram, count = memo
        else:
            name = mlp_out_param_name(self.model, layer)
            d = self.model.get_parameter(name).shape[self._in_axis(name)] if basis is None else basis.shape[1]
            done, gram, count = [], torch.zeros((d, d), dtype=torch.float64), 0
        for edit in edits[len(done) :]:
            keys = self._edit_keys(edit, layer)
            gram = gram + reduced_gram(basis, stack_keys(keys, keys[0].numel()))
            count += len(keys)
        self._grams[layer] = (basis, edits, gram, count)
        return gram, count

    def _in_axis(self, name: str) -> int:
        return 0 if is_transposed(get_module(self.model, name.rsplit(".", 1)[0])) else 1

    def _key_dir(self, hp: RomeHyperParams, key: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """``(value_dir, key_dir, stats)`` by the update ``hp.update`` names."""
        if hp.update == "memit":
            raise ValueError("update 'memit' edits a batch of facts: use compute_batch")
        if hp.update == "r-rome":
            cov = self.cov(hp.layer, hp.stats_samples)
            value_dir, key_dir = rank_one_factors(cov, key, delta, self._cov_lu(hp.layer, hp.stats_samples))
            return value_dir, key_dir, {}
        projection = self.projection(hp.layer, hp.stats_samples, hp.null_space_threshold)
        gram, cached = self.cache_gram(hp.layer, projection.basis)
        key_dir = projected_key_dir(key, projection, None, hp.cache_l2, gram).to(key.device)
        stats = {"projection_dims": projection.dims, "cache_keys": cached}
        return delta.detach().float().clone(), key_dir, stats

    def rows(self, request: EditRequest, hp: RomeHyperParams) -> tuple[list[Row], list[Row], Row]:
        """Key rows, value rows and the KL row; raises ``ValueError`` if the request does not tokenise."""
        templates = self.context_templates(hp)
        keys = [key_row(self.tok, t, request) for t in templates] + chat_rows(self.tok, request, hp.chat_keys, key=True)
        values = [rewrite_row(self.tok, t, request) for t in templates[: hp.value_templates]]
        values += chat_rows(self.tok, request, hp.chat_values)
        if len(values[0].input_ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"the prompt and target are longer than {MAX_PROMPT_TOKENS} tokens")
        return keys, values, kl_row(self.tok, hp.kl_prompt, request.subject)

    def _stop_rule(self, request: EditRequest, hp: RomeHyperParams) -> StopRule | None:
        """The chat-aware stop (worst prompt; greedy check on the bare prompt and a restating chat answer), if asked for.

        The check leaves out the direct chat style (the target as the reply's first word): replies
        restate the fact first, so that check kept failing and its extra steps only shrank δ under
        the norm penalty (README, *When an edit does not show*).
        """
        if hp.stop_on == "mean" and hp.greedy_check == 0:
            return None
        check = None
        if hp.greedy_check > 0:
            rows = [rewrite_row(self.tok, "{}", request)]
            if getattr(self.tok, "chat_template", None) is not None:
                rows += chat_rows(self.tok, request, 1)  # the restating style
            check = greedy_check(self.model, hp.layer, rows, self.tok.pad_token_id)
        return StopRule(hp, check)

    def exact_rows(self, request: EditRequest) -> list[Row]:
        """The rows whose keys ``exact_keys`` maps to the full delta beside k*: the bare prompt and each chat style."""
        rows = [key_row(self.tok, "{}", request)]
        if getattr(self.tok, "chat_template", None) is not None:
            rows += chat_rows(self.tok, request, len(CHAT_STYLES), key=True)
        return rows

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
        self.cov(hp.layer, hp.stats_samples, progress)  # computed (or read from disk) before the clock below
        timings["stats_s"] = time.perf_counter() - t0
        name = mlp_out_param_name(self.model, hp.layer)
        param = self._current(name)
        before = tensor_checksum(param)
        t0 = time.perf_counter()
        exact = hp.exact_keys and hp.update == "r-rome"  # the bare prompt's and chat keys get the full delta too
        extra = self.exact_rows(request) if exact else []
        keys = row_keys(self.model, hp.layer, key_rows + extra, self.tok.pad_token_id)  # padded passes by length
        key = keys[: len(key_rows)].mean(0)
        if progress is not None:
            progress("key", 1.0)
        timings["key_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = optimise_value(
            self.model, hp, key, value_rows, kl, self.tok.pad_token_id, self.method, progress, self._stop_rule(request, hp)
        )
        timings["value_s"] = time.perf_counter() - t0
        value_dir, key_dir, update_stats = self._key_dir(hp, key, result.delta)
        if exact:
            key_dir = exact_key_dir(self._cov_lu(hp.layer, hp.stats_samples), torch.cat([key[None], keys[len(key_rows) :]]))
        if not (torch.isfinite(value_dir).all() and torch.isfinite(key_dir).all()):
            raise FloatingPointError("the computed update has non-finite values")
        after = tensor_checksum(self._added(name, value_dir, key_dir, param))
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
            **update_stats,
        }
        return RankOneEdit(
            request=request, layer=hp.layer, param_name=name, value_dir=value_dir.cpu(), key_dir=key_dir.cpu(),
            hparams=hp.to_dict(), fingerprint=self.fingerprint, checksum_before=before, checksum_after=after,
            stats=stats, key=key.detach().float().cpu(),
            extra_keys=keys[len(key_rows) :].detach().float().cpu().clone() if exact else None,
        )  # fmt: skip

    def compute_batch(
        self, requests: list[EditRequest], progress: Progress | None = None, **overrides: object
    ) -> BatchEdit:
        """MEMIT: the facts' update spread over ``batch_layers(hp)``; each fact's share its own factors."""
        return compute_batch(self, requests, progress, **overrides)

    def batch_layers(self, hp: RomeHyperParams) -> tuple[int, ...]:
        layers = hp.batch_layers or tuple(range(max(0, hp.layer - 4), hp.layer + 1))
        if any(not 0 <= x < self.n_layers for x in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"batch_layers must be distinct, ascending layers from 0 to {self.n_layers - 1}; got {layers}")
        for layer in layers:
            layer_weight(self.model, layer)  # refuses a layer the device map offloaded
        return tuple(layers)

    def param_name(self, layer: int) -> str:
        return mlp_out_param_name(self.model, layer)

    @torch.no_grad()
    def with_checksums(self, batch: BatchEdit) -> BatchEdit:
        """``batch`` with each share's checksums: its parameter before the batch, and after adding it in ``edits`` order."""
        state = {e.param_name: self.model.get_parameter(e.param_name).detach().clone() for e in batch.edits}
        before = {name: tensor_checksum(t) for name, t in state.items()}
        facts = []
        for shares in batch.facts:
            done = []
            for e in shares:
                state[e.param_name] = self._added(e.param_name, e.value_dir, e.key_dir, state[e.param_name])
                done.append(dataclasses.replace(e, checksum_before=before[e.param_name],
                                                checksum_after=tensor_checksum(state[e.param_name])))  # fmt: skip
            facts.append(tuple(done))
        return dataclasses.replace(batch, facts=tuple(facts))

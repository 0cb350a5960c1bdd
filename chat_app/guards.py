"""What the service refuses before anything changes: probe prompts, unsafe updates, edits made elsewhere."""
from __future__ import annotations

import logging
import math
import statistics
from typing import Any

from db import Ledger, LedgerError
from editing import EditRequest, RankOneEdit, RomeEditor
from editing.arch import mlp_out_param_name
from editing.fact_payload import Applied, shares

log = logging.getLogger(__name__)
OUTLIER_FACTOR = 20.0  # an update norm this many times the median of applied ones needs an override
MIN_TARGET_PROB = 0.05  # below this after optimisation the edit did not take: refused
MAX_NOTE_CHARS = 500  # as the form's note box; the API and the CLI are held to it here


class EditGuards:
    """Mixed into ``EditService``: the state it declares is set up by the service."""

    editor: RomeEditor
    ledger: Ledger
    min_target_prob: float
    model: Any

    def _probe_prompts(self, request: EditRequest, paraphrases: list[str], neighbours: list[str]) -> list[tuple[str, str]]:
        prompts = [(request.prompt, "edited")]
        prompts += [(p.strip(), "paraphrase") for p in paraphrases if p.strip()]
        prompts += [(p.strip(), "neighbour") for p in neighbours if p.strip()]
        for prompt, _ in prompts:
            if len(prompt) > 500:
                raise ValueError("probe prompts are limited to 500 characters")
        return prompts

    def _guard(self, edit: RankOneEdit, allow_outlier: bool) -> str | None:
        """Why ``edit`` must be refused, or None."""
        reason = self._unsafe(edit, allow_outlier)
        if reason is None and edit.stats.get("target_prob", 1.0) < self.min_target_prob:
            return f"the optimisation did not reach the target (probability {edit.stats['target_prob']:.3f})"
        return reason

    def _unsafe(self, edit: Applied, allow_outlier: bool) -> str | None:
        """Why adding ``edit``'s update (each share of a batch fact) to the weights is unsafe (non-finite, or an outlier), or None."""
        norms = [e.update_norm for e in self.editor.applied]
        for share in shares(edit):
            if not math.isfinite(share.update_norm):
                return "the update has non-finite values (its norm overflows float32)"
            if len(norms) >= 3 and not allow_outlier:
                median = statistics.median(norms)
                if share.update_norm > OUTLIER_FACTOR * median:
                    return (f"update norm {share.update_norm:.3g} is over {OUTLIER_FACTOR:g}× the median of applied "
                            f"edits ({median:.3g}); apply with the override if this is intended")  # fmt: skip
        return None

    def _misfit(self, edit: Applied) -> str | None:
        """Why an edit from elsewhere (a file) does not describe this model's parameters, or None."""
        for share in shares(edit):
            if not 0 <= share.layer < self.editor.n_layers:
                return f"layer {share.layer} is out of range; this model has layers 0 to {self.editor.n_layers - 1}"
            if share.param_name != mlp_out_param_name(self.model, share.layer):
                return f"it names layer {share.layer} but rewrites {share.param_name}"
        return None

    def _refuse(self, request: EditRequest, reason: str, actor: str, answer_before: str) -> None:
        meta = {"subject": request.subject, "relation": request.relation, "target": request.target,
                "layer": request.layer if request.layer is not None else self.editor.hparams.layer,
                "param_name": "", "fingerprint": self.editor.fingerprint, "hparams": self.editor.hparams.to_dict()}  # fmt: skip
        try:
            self.ledger.record_refused(meta, reason, None, author=actor, answer_before=answer_before)
        except (LedgerError, ValueError) as err:
            log.warning("could not record the refused edit: %s", err)

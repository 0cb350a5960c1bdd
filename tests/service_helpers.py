"""Build an EditService over a tiny model and a temporary ledger; restart it from the ledger alone."""
from __future__ import annotations

from pathlib import Path

import torch

from chat_app.service import EditService
from chat_app.startup import replay
from db import Ledger
from tests.tiny import tiny_editor, tiny_llama, tiny_tokenizer

LAYER = 2


def start(ledger_path: Path, seed: int = 0, **hp: object) -> EditService:
    """A fresh process's view: base weights, then the ledger replayed."""
    tok = tiny_tokenizer()
    editor = tiny_editor(tiny_llama(seed), tok, layer=LAYER, **hp)
    service = EditService(editor, Ledger.open(ledger_path))
    service.min_target_prob = 0.0  # tiny random models cannot become confident; tested separately
    replay(service)
    return service


def state(service: EditService) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in service.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

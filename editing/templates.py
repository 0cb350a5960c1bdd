"""ROME's context templates: short prefixes written by the model itself.

The key k* is averaged over the subject in these contexts and the value is optimised
across them, so the edit holds beyond the bare prompt.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.loading import cache_dir
from editing.placement import input_device, model_devices

log = logging.getLogger(__name__)


# Opening words for the sampled prefixes: small instruct models write noise after a bare
# document-start token, but continue ordinary openings into ordinary sentences.
OPENINGS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    lengths: tuple[tuple[int, int], ...],
    seed: int,
) -> list[str]:
    """``["{}"]`` plus, per ``(tokens, count)``, ``count`` sampled prefixes of that length, each ``"<text>. {}"``."""
    device = input_device(model)
    templates = ["{}"]
    gpus = [d for d in model_devices(model) if d.type == "cuda"]  # every GPU the model samples on
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        for length, count in lengths:
            openings = [OPENINGS[i % len(OPENINGS)] for i in range(count)]
            enc = tok(openings, return_tensors="pt", padding=True, padding_side="left").to(device)
            out = model.generate(
                **enc,
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=tok.pad_token_id,
            )
            for row in out:
                text = tok.decode(row, skip_special_tokens=True)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                templates.append(f"{text}. {{}}")
    return templates


def context_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    fingerprint: str,
    lengths: tuple[tuple[int, int], ...],
    seed: int,
) -> list[str]:
    """Templates for this model, from the on-disk cache when present (same model and seed give the same list)."""
    spec = "-".join(f"{n}x{c}" for n, c in lengths)
    path = cache_dir() / "templates" / f"{fingerprint[:16]}-{spec}-s{seed}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, list) and all(isinstance(t, str) and t.count("{}") == 1 for t in cached):
                return cached
        except (OSError, ValueError):
            pass
        log.warning("ignoring unreadable template cache %s", path)
    templates = generate_templates(model, tok, lengths, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # instances sharing the cache may write it at once
    tmp.write_text(json.dumps(templates, ensure_ascii=False, indent=1))
    tmp.replace(path)
    return templates

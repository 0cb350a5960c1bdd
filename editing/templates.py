"""ROME's context templates: short prefixes written by the model itself.

The key k* is averaged over the subject in these contexts and the value is optimised
across them, so the edit holds beyond the bare prompt.
"""
from __future__ import annotations

import json
import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.loading import cache_dir

log = logging.getLogger(__name__)


def _start_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """A document-start token: ``<|endoftext|>`` where the vocabulary has it (chat BOS tokens give odd text)."""
    vocab = tok.get_vocab()
    for token in ("<|endoftext|>", tok.bos_token, tok.eos_token):
        if token is not None and token in vocab:
            return [vocab[token]]
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start generation from")


@torch.no_grad()
def generate_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    lengths: tuple[tuple[int, int], ...],
    seed: int,
) -> list[str]:
    """``["{}"]`` plus, per ``(tokens, count)``, ``count`` sampled prefixes of that length, each ``"<text>. {}"``."""
    device = next(model.parameters()).device
    templates = ["{}"]
    start = torch.tensor([_start_ids(tok)], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, count in lengths:
            out = model.generate(
                start.expand(count, -1),
                attention_mask=torch.ones(count, start.shape[1], dtype=torch.long, device=device),
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=tok.pad_token_id,
            )
            for row in out[:, start.shape[1] :]:
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(templates, ensure_ascii=False, indent=1))
    tmp.replace(path)
    return templates

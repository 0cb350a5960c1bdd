"""How much of an edit's update reaches other subjects' keys, for each rule of the key direction.

    python bench/key_leak.py --n 60 --seed 3 --start-weights 0.02 0.1 0.3

For N CounterFact development facts at the default layer: k* (the context-averaged key) and the
exact keys (the bare prompt's and the chat contexts'). For each rule, the rank-one direction
u = C⁻¹K (KᵀC⁻¹K)⁻¹ 1 (K = [k*] for r-ROME, [k*, exact keys] for ``exact_keys``), so the edit moves a
key k by δ (u·k); printed: the share the fact's own bare prompt receives, the mean |u·k| over the
other facts' bare-prompt keys and k*, over held-out text-start keys (positions 1–6 of 1,000 corpus
texts the statistics did not read), and the C-norm of u. With ``--start-weights`` a, C is replaced
by (1 − a) C + a C_start, C_start the second moment of other text-start keys: does a C that knows
text starts better protect bare prompts?
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sweep import DATA  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402
from editing.arch import layer_name  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.nethook import capture_input, run_until  # noqa: E402
from editing.rome import row_keys  # noqa: E402
from editing.stats import SAMPLE_SEED, read_corpus, shuffled  # noqa: E402


@torch.no_grad()
def text_start_keys(editor: RomeEditor, texts: list[str]) -> torch.Tensor:
    """The layer's keys at positions 1–6 of each text. (6 × len(texts), d_in) float64."""
    name, found = layer_name(editor.model, editor.hparams.layer, "mlp_out"), []
    for i in range(0, len(texts), 50):
        enc = editor.tok(texts[i : i + 50], return_tensors="pt", padding=True, padding_side="right",
                         truncation=True, max_length=8)  # fmt: skip
        with capture_input(editor.model, name, stop=True) as box:
            run_until(editor.model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        found.append(box["input"][:, 1:7].reshape(-1, box["input"].shape[-1]).double())
    return torch.cat(found)


def directions(cov: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
    """u = C⁻¹K (KᵀC⁻¹K)⁻¹ 1 for each fact's key set K (m, d_in): u·k = 1 for every key listed. (F, d_in)."""
    out = []
    for k in keys:
        ci = torch.linalg.solve(cov, k.T)
        out.append(ci @ torch.linalg.solve(k @ ci, torch.ones(len(k), dtype=torch.float64)))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--start-weights", type=float, nargs="*", default=[0.02, 0.1, 0.3])
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    hp, pad = editor.hparams, tok.pad_token_id
    cov = editor.cov(hp.layer, hp.stats_samples).double()
    star, exact = [], []
    for case in sample_cases(load_cases(DATA)[0], args.n, args.seed):
        request = case.request()
        key_rows, _, _ = editor.rows(request, hp)
        keys = row_keys(model, hp.layer, key_rows + editor.exact_rows(request), pad).double().cpu()
        star.append(keys[: len(key_rows)].mean(0))
        exact.append(keys[len(key_rows) :])
    texts = shuffled(read_corpus(), SAMPLE_SEED)[hp.stats_samples : hp.stats_samples + 2000]  # C read the ones before
    fit, held = text_start_keys(editor, texts[:1000]), text_start_keys(editor, texts[1000:])
    start_cov = fit.T @ fit / len(fit)
    bare, stars = torch.stack([e[0] for e in exact]), torch.stack(star)
    off = ~torch.eye(len(star), dtype=torch.bool)
    rules = [("k* / C", cov, False), ("exact / C", cov, True)]
    rules += [(f"exact / (1-{a})C + {a} C_start", (1 - a) * cov + a * start_cov, True) for a in args.start_weights]
    print(f"{args.n} facts, layer {hp.layer}; mean |u·k| over other facts' keys and held-out text starts")
    print("rule | own bare prompt u·k | other bare prompts | other k* | text starts | sqrt(uᵀCu)")
    for label, c, use_exact in rules:
        u = directions(c, [torch.cat([s[None], e]) if use_exact else s[None] for s, e in zip(star, exact)])
        print(f"{label} | {float((u * bare).sum(1).mean()):.3f} | {float((u @ bare.T)[off].abs().mean()):.4f} | "
              f"{float((u @ stars.T)[off].abs().mean()):.4f} | {float((u @ held.T).abs().mean()):.4f} | "
              f"{float(torch.sqrt((u @ cov * u).sum(1)).mean()):.4f}", flush=True)


if __name__ == "__main__":
    main()

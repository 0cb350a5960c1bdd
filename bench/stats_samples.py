"""How many statistics tokens an edit needs: C from cheaper samples against a large reference, on facts' keys.

    python bench/stats_samples.py --layer 9 --reference 4000:256 --candidates 250:256 500:256 1000:256 1000:128 2000:64

Each ``N:T`` is N corpus texts (the seeded random sample the app uses) truncated to T tokens. For
the keys k* of CounterFact development facts (the app's own key rows), prints per candidate the
tokens it reads, the seconds it took (when not cached), and the cosine between its update
direction C⁻¹k* and the reference's (the r-ROME update depends on C only through that direction).
The candidate ``1000:256`` is the default before this measurement: a cheaper sample whose cosines
are at least as high can replace it without changing edits more than the default's own sampling does.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.rome import compute_key  # noqa: E402
from editing.stats import SAMPLE_SEED, read_corpus, second_moment, shuffled  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"


def tokens_read(tok: object, texts: list[str], max_tokens: int) -> int:
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_tokens)["input_ids"]]  # type: ignore[operator]
    return sum(lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=9)
    ap.add_argument("--reference", default="4000:256")
    ap.add_argument("--candidates", nargs="+", default=["250:256", "500:256", "1000:256", "1000:128", "2000:64"])
    ap.add_argument("--facts", type=int, default=60)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    keys = []
    for case in sample_cases(load_cases(DATA)[0], args.facts, args.seed):
        rows, _, _ = editor.rows(case.request(), editor.hparams_for(case.request(), layer=args.layer))
        keys.append(compute_key(model, args.layer, rows, tok.pad_token_id).double().cpu())
    keys_t = torch.stack(keys, 1)  # (d_in, facts)
    texts = shuffled(read_corpus(), SAMPLE_SEED)

    def cov(spec: str) -> tuple[torch.Tensor, float]:
        n, t = (int(x) for x in spec.split(":"))
        t0 = time.perf_counter()
        c = second_moment(model, tok, editor.fingerprint, args.layer, n, t, precision=editor.hparams.stats_precision)
        return c, time.perf_counter() - t0

    reference, seconds = cov(args.reference)
    ref_dirs = torch.linalg.solve(reference, keys_t)
    print(f"reference {args.reference}: {tokens_read(tok, texts[: int(args.reference.split(':')[0])], int(args.reference.split(':')[1]))} tokens, {seconds:.1f} s")
    for spec in args.candidates:
        c, seconds = cov(spec)
        n, t = (int(x) for x in spec.split(":"))
        dirs = torch.linalg.solve(c, keys_t)
        cos = torch.nn.functional.cosine_similarity(dirs, ref_dirs, dim=0).tolist()
        print(f"{spec:>9}: {tokens_read(tok, texts[:n], t):7d} tokens, {seconds:6.1f} s (0 = cached), "
              f"cos(C⁻¹k*, reference) min {min(cos):.4f} median {statistics.median(cos):.4f} over {len(cos)} facts",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

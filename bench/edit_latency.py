"""Edit latency on the default model: median compute+apply time over CounterFact development cases.

    python bench/edit_latency.py --n 50 --baseline-n 5

Statistics and context templates are cached before timing (they are computed once per model
and layer). Prints the median for each method, in the same process:
  plain   the original procedure: 21 prompts, up to 20 steps, whole model every step
  prefix  + the tokens before the subject's last token computed once (KV cache), logits only where needed
  fast    + the blocks below the edited layer run once (the app's default)
and the ratio of each against plain, plus the peak resident memory. Last, the arithmetic of the
app's method: the floating-point operations of its matrix products over the timed edits (counted by
``torch.utils.flop_counter``), against this CPU's rate for one large matrix product measured in the
same process, which bounds how fast an edit with these prompts and steps can be here.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"


def time_edits(editor: RomeEditor, cases: list, **overrides: object) -> tuple[list[float], list[int], dict[str, list[float]]]:  # type: ignore[type-arg]
    """Seconds per edit (computed and applied), steps, and the phases each edit records (key, value)."""
    times, steps, phases = [], [], {"key_s": [], "value_s": []}
    for case in cases:
        t0 = time.perf_counter()
        edit = editor.compute(case.request(), **overrides)
        editor.apply(edit)
        times.append(time.perf_counter() - t0)
        steps.append(edit.stats["steps"])
        for name, values in phases.items():
            values.append(edit.stats[name])
        editor.revert(edit)
    return times, steps, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="cases for the app's method")
    ap.add_argument("--baseline-n", type=int, default=5, help="cases for the slow reference methods")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not DATA.is_file():
        sys.exit(f"needs {DATA}")
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    editor.context_templates()
    editor.cov(editor.hparams.layer)
    print(f"model SmolLM2-135M-Instruct, layer {editor.hparams.layer}, device {model.device}", flush=True)
    results = {}
    reference = {"value_templates": 21, "steps": 20, "lr": 0.5}
    for method, n in (("plain", args.baseline_n), ("prefix", args.baseline_n), ("fast", args.n)):
        editor.method = method
        overrides = reference if method != "fast" else {}
        times, steps, phases = time_edits(editor, cases[:n], **overrides)
        results[method] = statistics.median(times)
        print(f"{method:7s} n={n:3d} median {results[method]:6.2f} s  mean {statistics.mean(times):6.2f} s  "
              f"mean steps {statistics.mean(steps):4.1f}  median key pass {statistics.median(phases['key_s']):.2f} s, "
              f"value {statistics.median(phases['value_s']):.2f} s", flush=True)  # fmt: skip
    same_cases = cases[: args.baseline_n]
    editor.method = "fast"
    fast_same = statistics.median(time_edits(editor, same_cases, **reference)[0])
    print(f"fast with the reference settings (21 prompts, 20 steps, lr 0.5) on the baseline cases: {fast_same:.2f} s")
    for method in ("prefix", "fast"):
        print(f"speed-up {method} vs plain: {results['plain'] / results[method]:.1f}x")
    print(f"speed-up fast (reference settings) vs plain, same cases: {results['plain'] / fast_same:.1f}x")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    arithmetic_bound(editor, cases[: min(args.n, 8)], results["fast"])


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of one large float32 matrix product on this machine (its best case: big, square, cached)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - t0)


def arithmetic_bound(editor: RomeEditor, cases: list, median_s: float) -> None:  # type: ignore[type-arg]
    """Print the matrix-product FLOPs per edit of the app's method and the time they need at this CPU's peak rate."""
    flops, seconds = [], []
    for case in cases:
        with FlopCounterMode(display=False) as counter:
            t0 = time.perf_counter()
            editor.compute(case.request())
            seconds.append(time.perf_counter() - t0)
        flops.append(counter.get_total_flops())
    rate = matmul_rate()
    per_edit = statistics.median(flops)
    print(f"arithmetic: median {per_edit / 1e9:.1f} GFLOP per edit ({len(cases)} edits, counted; the counter's "
          f"own overhead makes those runs {statistics.median(seconds):.2f} s); one 2048² matrix product runs at "
          f"{rate / 1e9:.0f} GFLOP/s here, so an edit needs at least {per_edit / rate:.2f} s of arithmetic: "
          f"the measured median {median_s:.2f} s runs at {per_edit / median_s / 1e9:.0f} GFLOP/s "
          f"({100 * per_edit / median_s / rate:.0f} % of that rate)")  # fmt: skip


if __name__ == "__main__":
    main()

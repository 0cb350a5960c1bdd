"""Average causal trace over facts the default model knows (Meng et al. 2022, Figure 2).

    python -m bench.trace_known_facts --n 50 --out bench/out/known_facts.png

Reads ``../shared/data/known_1000.json``, keeps the facts whose clean top token agrees with the
first token of the recorded attribute, traces them, and averages the indirect effect by layer
at six token positions: first, middle and last subject token, first subsequent token, further
tokens, last token.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from editing.loading import load_model
from editing.tracing.plot import plot_average_effects
from editing.tracing import KINDS, TraceResult, embedding_std, trace

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "known_1000.json"
POSITIONS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
log = logging.getLogger("trace_known_facts")


def position_rows(result: TraceResult) -> list[list[int]]:
    """Token indices of each of ``POSITIONS`` for one fact (a class may be empty)."""
    first, end = result.subject_range
    last_token = len(result.tokens) - 1
    after = [i for i in range(end, last_token)]
    return [[first], list(range(first + 1, end - 1)), [end - 1], after[:1], after[1:], [last_token]]


@torch.no_grad()
def knows(model, tok, record: dict) -> bool:
    """The clean top token's text matches the attribute's first token, stripped, case-insensitively."""
    ids = tok(record["prompt"], return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    top = tok.decode([int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())]).strip().lower()
    attribute = tok(" " + record["attribute"].strip(), add_special_tokens=False)["input_ids"]
    return bool(top) and bool(attribute) and top == tok.decode(attribute[:1]).strip().lower()


def traced_facts(
    model, tok, records: list[dict], n: int, samples: int, noise: float, seed: int
) -> Iterator[tuple[int, TraceResult]]:
    """``(records checked so far, trace)`` for the first ``n`` records the model knows, with a progress bar."""
    with tqdm(total=n, desc="tracing known facts", unit="fact") as bar:
        for checked, record in enumerate(records, start=1):
            if bar.n >= n:
                return
            if not knows(model, tok, record):
                continue
            try:
                result = trace(model, tok, record["prompt"], record["subject"], samples=samples, noise=noise, seed=seed)
            except ValueError as err:
                log.warning("skipping %r: %s", record["prompt"], err)
                continue
            bar.update()
            yield checked, result


def average_effects(results: list[TraceResult], n_layers: int) -> dict[str, torch.Tensor]:
    """Per kind, (positions, layers): the indirect effect averaged over the facts that have each position."""
    sums = {k: torch.zeros(len(POSITIONS), n_layers, dtype=torch.float64) for k in KINDS}
    counts = torch.zeros(len(POSITIONS), 1, dtype=torch.float64)
    for result in results:
        for row, tokens in enumerate(position_rows(result)):
            if tokens:
                counts[row] += 1
                for kind in KINDS:
                    sums[kind][row] += result.indirect_effect(kind)[tokens].double().mean(0)
    return {k: sums[k] / counts.clamp(min=1) for k in KINDS}


def report(effects: dict[str, torch.Tensor], results: list[TraceResult], checked: int) -> None:
    last = POSITIONS.index("last subject token")
    n = len(results)
    print(f"facts traced: {n} (known among the first {checked} records)")
    clean, corrupted = sum(r.clean_prob for r in results) / n, sum(r.corrupted_prob for r in results) / n
    print(f"mean p(answer): clean {clean:.3f}, corrupted {corrupted:.3f}")
    for kind in KINDS:
        row = effects[kind][last]
        layer, value = int(row.argmax()), float(row.max())
        print(f"{kind:>6}: largest average effect at the last subject token: layer {layer} ({value:.4f})")
    print("MLP average indirect effect at the last subject token, by layer (centre of a 10-layer window):")
    mlp = effects["mlp"][last]
    scale = 40 / max(float(mlp.max()), 1e-9)
    for layer, value in enumerate(mlp.tolist()):
        print(f"  layer {layer:>2}  {value:+.4f}  {'#' * max(0, round(value * scale))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="facts to trace (default 100)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/known_facts.png"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (it ships in the project's shared/ folder)", file=sys.stderr)
        return
    records = json.loads(args.data.read_text())
    model, tok = load_model(None)
    noise = 3 * embedding_std(model, tok)
    traced = list(traced_facts(model, tok, records, args.n, args.samples, noise, args.seed))
    if not traced:
        print("no known fact found", file=sys.stderr)
        return
    results = [result for _, result in traced]
    effects = average_effects(results, model.config.num_hidden_layers)
    report(effects, results, checked=traced[-1][0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = f"SmolLM2-135M-Instruct, average indirect effect, {args.samples} noise samples"
    plot_average_effects(effects, POSITIONS, title, len(results), window=10).savefig(args.out, dpi=120)
    print(f"picture: {args.out}")


if __name__ == "__main__":
    main()

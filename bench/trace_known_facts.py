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
from pathlib import Path

import torch
from tqdm import tqdm

from editing.loading import load_model
from editing.trace_plot import plot_average_effects
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
    n_layers = model.config.num_hidden_layers
    sums = {k: torch.zeros(len(POSITIONS), n_layers, dtype=torch.float64) for k in KINDS}
    counts = torch.zeros(len(POSITIONS), 1, dtype=torch.float64)
    used = checked = 0
    clean_probs, corrupted_probs = [], []
    bar = tqdm(total=args.n, desc="tracing known facts", unit="fact")
    for record in records:
        if used >= args.n:
            break
        checked += 1
        if not knows(model, tok, record):
            continue
        try:
            result = trace(model, tok, record["prompt"], record["subject"], samples=args.samples, noise=noise, seed=args.seed)
        except ValueError as err:
            log.warning("skipping %r: %s", record["prompt"], err)
            continue
        for row, tokens in enumerate(position_rows(result)):
            if tokens:
                counts[row] += 1
                for kind in KINDS:
                    sums[kind][row] += result.indirect_effect(kind)[tokens].double().mean(0)
        clean_probs.append(result.clean_prob)
        corrupted_probs.append(result.corrupted_prob)
        used += 1
        bar.update()
    bar.close()
    if used == 0:
        print("no known fact found", file=sys.stderr)
        return
    effects = {k: sums[k] / counts.clamp(min=1) for k in KINDS}
    report(effects, used, checked, clean_probs, corrupted_probs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = f"SmolLM2-135M-Instruct, average indirect effect, {args.samples} noise samples"
    fig = plot_average_effects(effects, POSITIONS, title, used, window=10)
    fig.savefig(args.out, dpi=120)
    print(f"picture: {args.out}")


def report(effects: dict[str, torch.Tensor], used: int, checked: int, clean: list[float], corrupted: list[float]) -> None:
    last = POSITIONS.index("last subject token")
    print(f"facts traced: {used} (known among the first {checked} records)")
    print(f"mean p(answer): clean {sum(clean) / used:.3f}, corrupted {sum(corrupted) / used:.3f}")
    for kind in KINDS:
        row = effects[kind][last]
        print(f"{kind:>6}: largest average effect at the last subject token at layer {int(row.argmax())} ({float(row.max()):.4f})")
    print("MLP average indirect effect at the last subject token, by layer (centre of a 10-layer window):")
    for layer, value in enumerate(effects["mlp"][last].tolist()):
        print(f"  layer {layer:>2}  {value:+.4f}  {'#' * max(0, round(value * 400))}")


if __name__ == "__main__":
    main()

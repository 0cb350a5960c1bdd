"""Start-up replay: time to rebuild the default model from a ledger of N stored edits.

    python bench/replay.py --n 1000

Writes N synthetic rank-one edits (random factors of realistic size, spread over a few layers)
into a temporary ledger through the service's import path, then times a fresh start-up's
replay, which re-adds every stored factor in order and checks every stored checksum.
Also times the weight updates alone (adding each stored factor pair and hashing) in the same process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_app.service import EditService  # noqa: E402
from chat_app.startup import replay  # noqa: E402
from db import Ledger  # noqa: E402
from editing import EditRequest, RankOneEdit, RomeEditor, load_model  # noqa: E402
from editing.arch import get_module, mlp_out_param_name  # noqa: E402
from editing.fingerprint import tensor_checksum  # noqa: E402


def synthetic(editor: RomeEditor, i: int, layers: list[int]) -> RankOneEdit:
    layer = layers[i % len(layers)]
    name = mlp_out_param_name(editor.model, layer)
    weight = get_module(editor.model, name.rsplit(".", 1)[0]).weight
    gen = torch.Generator().manual_seed(i)
    value = torch.randn(weight.shape[0], generator=gen) * 1e-2
    key = torch.randn(weight.shape[1], generator=gen) * 1e-2
    request = EditRequest(f"Subject number {i}", "{} is located in the city of", f"City {i}")
    zero = "0" * 64
    return RankOneEdit(request, layer, name, value, key, editor.hparams.to_dict(), editor.fingerprint, zero, zero)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    with tempfile.TemporaryDirectory() as tmp:
        ledger_path = Path(tmp) / "ledger.db"
        service = EditService(editor, Ledger.open(ledger_path))
        replay(service)
        edits = [synthetic(editor, i, [editor.hparams.layer - 1, editor.hparams.layer, editor.hparams.layer + 1]) for i in range(args.n)]
        t0 = time.perf_counter()
        service.import_edits([(*e.to_payload(), [], None, None, None, None, e) for e in edits])
        print(f"wrote {args.n} edits in {time.perf_counter() - t0:.2f} s")
        expected = {n: tensor_checksum(p) for n, p in model.named_parameters()}
        editor.reset()
        fresh = EditService(editor, Ledger.open(ledger_path))
        report = replay(fresh)
        same = all(tensor_checksum(p) == expected[n] for n, p in model.named_parameters())
        print(f"replayed {report.replayed} edits in {report.seconds:.2f} s "
              f"({1000 * report.seconds / max(report.replayed, 1):.2f} ms per edit); "
              f"checksum mismatches: {len(report.mismatches)}; weights equal the live ones: {same}")  # fmt: skip
        # Where the time goes, in the same process: the weights alone (add each stored factor pair, hash).
        stored = list(fresh.editor.applied)
        editor.reset()
        t0 = time.perf_counter()
        sums = [editor.apply(e) for e in stored]
        weights_s = time.perf_counter() - t0
        print(f"of which adding the factors and hashing each state: {weights_s:.2f} s (same checksums: "
              f"{sums == editor.sequence_checksums()}); reading the ledger and decoding: {report.seconds - weights_s:.2f} s")
        print(f"target 5 s: {'met' if report.seconds <= 5 else 'missed'}")
        # Baseline: rebuilding by recomputing each edit instead of re-adding its stored factors.
        editor.reset()
        times = []
        for e in [e for e in stored if e.layer == editor.hparams.layer][:3]:
            t0 = time.perf_counter()
            editor.compute(e.request)
            times.append(time.perf_counter() - t0)
        per_edit = sorted(times)[1]
        print(f"baseline, recomputing instead: median {per_edit:.2f} s per edit (3 timed), about "
              f"{per_edit * len(stored):.0f} s for {len(stored)}; replay is {per_edit * len(stored) / report.seconds:.0f}x faster")


if __name__ == "__main__":
    main()

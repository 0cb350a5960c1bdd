"""Concurrent chat generation with and without sharing the cores among generations (``chat_app.threads``).

    python bench/threads.py --chats 1 4 --tokens 32

For each number of concurrent chats, runs that many greedy replies at once through
``chat_app.probes.stream_chat`` on the default model, first with every generation on torch's
default thread count (all cores each), then with ``generation_threads`` (cores // running).
Prints the wall time of the whole batch and the tokens per second over all chats.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import chat_app.probes as probes  # noqa: E402
from chat_app.threads import generation_threads  # noqa: E402
from editing import load_model  # noqa: E402

QUESTION = [{"role": "user", "content": "Tell me about the Eiffel Tower."}]


def batch(model, tok, chats: int, tokens: int) -> float:  # type: ignore[no-untyped-def]
    def one() -> None:
        for _ in probes.stream_chat(model, tok, QUESTION, 0.0, tokens):
            pass

    threads = [threading.Thread(target=one) for _ in range(chats)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    model, tok = load_model()
    batch(model, tok, 1, 4)  # warm-up
    print(f"torch default: {torch.get_num_threads()} intra-op threads per calling thread", flush=True)
    for chats in args.chats:
        probes.generation_threads = nullcontext  # type: ignore[assignment]  # torch's default: every chat on all cores
        plain = batch(model, tok, chats, args.tokens)
        probes.generation_threads = generation_threads  # type: ignore[assignment]
        shared = batch(model, tok, chats, args.tokens)
        total = chats * args.tokens
        print(f"{chats} chats × {args.tokens} tokens: all cores each {plain:6.2f} s ({total / plain:5.1f} tok/s); "
              f"shared {shared:6.2f} s ({total / shared:5.1f} tok/s); ratio {plain / shared:4.2f}", flush=True)


if __name__ == "__main__":
    main()

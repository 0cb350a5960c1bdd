"""Export check on the default model: N CounterFact edits, then hf, peft and gguf exports compared with the app.

    nice -n 10 python bench/export_check.py --n 10 --out /tmp/export-check

An ``--out`` folder that already holds a ledger keeps its applied edits (only the missing ones are made).

- hf: loaded in a separate process with plain transformers (no project code); max |Δ logits| against
  the app's edited model on the edited prompts, and whether the greedy answers match.
- peft: the adapter loaded on the base it names (the GGUF file, dequantised by transformers), merged;
  max |Δ weight| against the hf export, and max |Δ logits| of the unmerged adapter against the app.
- gguf: read back with transformers' GGUF loader; max |Δ logits| against the app.
- the running model's state and the ledger's event count before and after the exports.
Prints the figures; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_app.runtime import Settings, build_service  # noqa: E402
from editing import EditRequest  # noqa: E402
from editing.fingerprint import tensor_checksum  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"
PLAIN_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path)
logits, answers = [], []
with torch.no_grad():
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        logits.append(model(**enc).logits[0])
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
torch.save({"logits": logits, "answers": answers, "modules": sorted(k for k in sys.modules if k.split(".")[0]
            in ("chat_app", "editing", "db"))}, sys.argv[3])
"""


def requests(n: int) -> list[EditRequest]:
    found = []
    for case in json.loads(DATA.read_text()):
        if case["subject"] in case["prompt"] and len(found) < 4 * n:
            try:
                found.append(EditRequest(case["subject"], case["prompt"].replace(case["subject"], "{}", 1),
                                         case["target_new"]))  # fmt: skip
            except ValueError:  # a case the app's form would refuse too
                continue
    return found


def logits_of(model: torch.nn.Module, tok, prompts: list[str]) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in prompts]


def greedy(model: torch.nn.Module, tok, prompt: str) -> str:  # type: ignore[no-untyped-def]
    """The same 8-token greedy generation as ``PLAIN_LOAD`` runs on the export."""
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="export-check-"))
    out.mkdir(parents=True, exist_ok=True)
    service, _ = build_service(Settings(db=str(out / "ledger.db")))
    applied = [EditRequest(r.subject, r.relation, r.target) for r in service.ledger.applied()]  # an earlier run's
    refused = 0
    for request in requests(args.n):
        if len(applied) >= args.n:
            break
        try:
            service.apply(request)
            applied.append(request)
        except ValueError as err:
            refused += 1
            print(f"refused: {request.prompt!r} -> {request.target!r}: {err}")
    prompts = [r.prompt for r in applied]
    print(f"{len(applied)} edits applied ({refused} refused) on {service.source}")
    state = {k: tensor_checksum(v) for k, v in service.model.state_dict().items()}
    events = len(service.events())
    app_logits = logits_of(service.model, service.tok, prompts)
    app_answers = [greedy(service.model, service.tok, p) for p in prompts]
    timings = {}
    for fmt in ("hf", "peft", "gguf"):
        t0 = time.perf_counter()
        done = service.export_model(out / fmt, fmt)
        timings[fmt] = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in done.path.iterdir()) / 2**20
        print(f"export {fmt}: {timings[fmt]:.2f} s, {size:.1f} MiB, files {', '.join(done.files)}")
    unchanged = state == {k: tensor_checksum(v) for k, v in service.model.state_dict().items()}
    print(f"running model unchanged: {unchanged}; ledger events unchanged: {len(service.events()) == events}")
    check_hf(out, prompts, app_logits, app_answers)
    check_peft(service, out, prompts, app_logits)
    check_gguf(service, out, prompts, app_logits)


def check_hf(out: Path, prompts: list[str], app_logits: list[torch.Tensor], app_answers: list[str]) -> None:
    result = out / "hf-plain.pt"
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out / "hf"), json.dumps(prompts), str(result)],
                   check=True, cwd=tempfile.gettempdir())  # fmt: skip
    plain = torch.load(result)
    answers = plain["answers"]
    same = sum(a == b for a, b in zip(answers, app_answers))
    print(f"hf (plain transformers, project modules imported: {plain['modules'] or 'none'}): "
          f"max |Δ logits| {max_diff(plain['logits'], app_logits):.3g}; greedy answers matching the app: "
          f"{same}/{len(prompts)}")  # fmt: skip
    for prompt, mine, theirs in zip(prompts, app_answers, answers):
        print(f"  {prompt!r}: app {mine!r} | export {theirs!r}")


def check_peft(service, out: Path, prompts: list[str], app_logits: list[torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    source = Path(config["base_model_name_or_path"])
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    print(f"peft base loaded from {source.name} with transformers' GGUF loader in {time.perf_counter() - t0:.1f} s; "
          f"ranks: r={config['r']}, rank_pattern={config['rank_pattern']}")  # fmt: skip
    adapted = PeftModel.from_pretrained(base, out / "peft").eval()
    print(f"peft unmerged: max |Δ logits| against the app {max_diff(logits_of(adapted, service.tok, prompts), app_logits):.3g}")
    merged = adapted.merge_and_unload().state_dict()
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).state_dict()
    diff = max(float((merged[k] - hf[k]).abs().max()) for k in hf)
    print(f"peft merge_and_unload against the hf export: max |Δ weight| {diff:.3g} over {len(hf)} tensors")


def check_gguf(service, out: Path, prompts: list[str], app_logits: list[torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    name = next(p.name for p in (out / "gguf").glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file=name, dtype=torch.float32).eval()
    print(f"gguf ({name}) via transformers: max |Δ logits| {max_diff(logits_of(model, service.tok, prompts), app_logits):.3g}")


if __name__ == "__main__":
    main()

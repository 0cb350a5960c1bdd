"""The model card (``README.md``) of an exported model: every edit it holds and how it was made."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from db import EditRecord

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f|`<>\\*_\[\]]")

_LOAD = {
    "hf": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{dir}")
tok = AutoTokenizer.from_pretrained("{dir}")
```""",
    "peft": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = {base_load}
model = PeftModel.from_pretrained(base, "{dir}")   # adds the edits exactly (LoRA scaling 1)
merged = model.merge_and_unload()                 # the same weights as an hf export of these edits
```
`adapter_config.json` names the base as `base_model_name_or_path`. A GGUF base must be passed as above
(`AutoPeftModelForCausalLM` cannot open a GGUF file by name); `app.py export-model BASE_DIR --ids` (no ids)
writes that base as a plain transformers checkpoint, which any PEFT loader can take.""",
    "gguf": """```bash
llama-cli -m "{dir}/{file}"      # or any llama.cpp-based tool (Ollama, LM Studio, llama-cpp-python)
```
In Python, transformers reads it too: `AutoModelForCausalLM.from_pretrained("{dir}", gguf_file="{file}")`.""",
}


def cell(text: object) -> str:
    """Ledger text made safe for a Markdown table cell (no pipes, markup or control characters)."""
    return _UNSAFE.sub(lambda m: f"&#{ord(m.group())};", str(text))


def code(text: object) -> str:
    """Text for inside a code span, where entities are not decoded: backticks and control characters removed."""
    return re.sub(r"[`\x00-\x1f\x7f-\x9f]", "", str(text))


def method_of(record: EditRecord) -> str:
    method = record.meta.get("method") or record.hparams.get("method") or "ROME (r-ROME)"
    hp = record.hparams
    detail = ", ".join(f"{k} {hp[k]}" for k in ("lr", "steps", "kl_factor", "value_templates") if k in hp)
    return f"{method}; {detail}" if detail else str(method)


def _base_load(source: str) -> str:
    if source.endswith(".gguf"):
        path = Path(source)
        return f'AutoModelForCausalLM.from_pretrained("{path.parent}", gguf_file="{path.name}")'
    return f'AutoModelForCausalLM.from_pretrained("{source}")'


def model_card(service: Any, records: list[EditRecord], fmt: str, stamp: datetime) -> str:
    """Markdown for ``README.md``: provenance, the edits table, and how to load the files."""
    source, editor = str(service.source), service.editor
    rows = "\n".join(
        f"| {r.id} | {cell(r.subject)} | {cell(r.relation)} | {cell(r.target)} | {r.layer_label} | {cell(method_of(r))} "
        f"| {r.created_at:%Y-%m-%d %H:%M} UTC | {r.fingerprint[:16]} | {(r.factors_sha256 or '')[:16]} |"
        for r in records
    )
    table = ("| id | subject | relation | new object | layer | method | date | model fingerprint | factors SHA-256 |\n"
             "|---|---|---|---|---|---|---|---|---|\n" + rows) if records else "*No edits: this is the base model.*"  # fmt: skip
    gguf_file = f"{Path(source).stem}-edited.gguf"
    load = _LOAD[fmt].format(dir="THIS_FOLDER", base_load=_base_load(source), file=gguf_file)
    model_type = getattr(editor.model.config, "model_type", "?")
    return f"""---
tags: [rome-chat, model-editing, rome]
library_name: {"peft" if fmt == "peft" else "transformers"}
---
# {cell(Path(source).name)} with {len(records)} ROME edit{"s" if len(records) != 1 else ""}

Exported by rome-chat on {stamp:%Y-%m-%d %H:%M} UTC as **{fmt}**, from the ledger `{code(service.ledger.where)}`.

- Base model: `{code(source)}` ({model_type}); its weights' fingerprint (SHA-256 over every parameter,
  as rome-chat computes it): `{editor.fingerprint}`.
- The ledger is bound to model fingerprint `{service.ledger.model_fingerprint or editor.fingerprint}`;
  every edit below names the fingerprint it was made for.

## How it was made

Each edit rewrites one fact with ROME (rank-one model editing; Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", with the r-ROME fix of Gupta et al. 2024): the weight W of one layer's MLP
output projection becomes W + v kᵀ, where k is the subject's key (C⁻¹k* / (k*ᵀC⁻¹k*), C the key
statistics of that layer) and v the value change that makes the model say the new object. The ledger
stores each edit's factors v and k. This export adds the stored factors of the edits below to the
base weights in ledger order, in float32, cast once to the model's dtype: the weights the app serves
with exactly these edits applied. {_how(fmt)}

## Edits ({len(records)}, in the order they were added)

{table}

## Loading

{load}
"""


def _how(fmt: str) -> str:
    if fmt == "peft":
        return ("Here the edits are a LoRA adapter: the n edits of one matrix are its rank-n product B A, with "
                "B the stacked v and A the stacked k, and lora_alpha = r so the scaling is 1. It loads on the base "
                "model named above (for a GGUF base, transformers dequantises it the same way the app does).")  # fmt: skip
    if fmt == "gguf":
        return ("Here the source GGUF file is copied, metadata and tensors byte for byte, and only the edited "
                "matrices are replaced, as F32 (each was checked first to hold the base weights in the same layout).")  # fmt: skip
    return "Here the result is a full transformers checkpoint (safetensors), tokenizer and generation config included."

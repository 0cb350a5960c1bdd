"""Write an edited model back as GGUF: a copy of its source file with the edited tensors replaced (F32).

Every other tensor and every metadata key is copied byte for byte, so llama.cpp-family tools see the
original model except for the rewritten matrices. A tensor is replaced only when the source file's
copy, dequantised, equals the model's unedited parameter in the same layout: then writing the edited
parameter there means the same to any reader. Anything else (another family's layout, a tensor the
name map does not know, a model that was not loaded from this file) is refused, never guessed.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def _gguf_module():  # type: ignore[no-untyped-def]
    import gguf  # imported here: only this export needs it

    return gguf


def tensor_names(reader, hf_names: list[str]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """HF parameter name -> GGUF tensor name, through gguf's own name map for the file's architecture."""
    gguf = _gguf_module()
    arch_name = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    block_field = reader.get_field(f"{arch_name}.block_count")
    if arch is None or block_field is None:
        raise ValueError(f"cannot write GGUF for architecture {arch_name!r}: gguf's name map does not know it")
    name_map = gguf.get_tensor_name_map(arch, int(block_field.contents()))
    names = {}
    for hf_name in hf_names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"cannot write GGUF: no GGUF tensor name for {hf_name} in architecture {arch_name!r}")
        names[hf_name] = gguf_name
    return names


def check_layout(tensor, baseline: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Refuse unless the file's tensor, dequantised, is exactly ``baseline`` in the same (numpy) layout."""
    gguf = _gguf_module()
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    base = baseline.detach().float().cpu().numpy()
    if stored.shape != base.shape or not np.array_equal(stored.astype(np.float32), base):
        raise ValueError(
            f"cannot write GGUF: the source file's {tensor.name} {tuple(stored.shape)} does not hold the model's "
            f"unedited weights {tuple(base.shape)} in the same layout, so a replacement could be misread; "
            "export hf instead and convert it with llama.cpp's convert_hf_to_gguf.py"
        )


def write_gguf(source: Path, dest: Path, weights: Mapping[str, torch.Tensor],
               baselines: Mapping[str, torch.Tensor]) -> list[str]:  # fmt: skip
    """Copy GGUF ``source`` to ``dest`` with each of ``weights`` (HF name -> tensor) written as F32.

    ``baselines``: the same names' unedited values, which the source file must hold (``check_layout``).
    Returns the GGUF names replaced. Raises ``ValueError`` before writing anything it cannot write exactly.
    """
    gguf = _gguf_module()
    reader = gguf.GGUFReader(source, "r")
    names = tensor_names(reader, sorted(weights))
    by_name = {t.name: t for t in reader.tensors}
    replaced: dict[str, np.ndarray] = {}
    for hf_name, gguf_name in names.items():
        if gguf_name not in by_name:
            raise ValueError(f"cannot write GGUF: {source.name} has no tensor {gguf_name} for {hf_name}")
        check_layout(by_name[gguf_name], baselines[hf_name])
        replaced[gguf_name] = np.ascontiguousarray(weights[hf_name].detach().float().cpu().numpy())
    arch_name = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dest, arch_name, endianess=reader.endianess)
    try:
        _copy_metadata(reader, writer)
        for tensor in reader.tensors:
            new = replaced.get(tensor.name)
            if new is None:
                writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                       tensor.tensor_type)  # fmt: skip
            else:
                writer.add_tensor_info(tensor.name, new.shape, new.dtype, new.nbytes, gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            new = replaced.get(tensor.name)
            writer.write_tensor_data(tensor.data if new is None else new, tensor_endianess=reader.endianess)
    finally:
        writer.close()
    log.info("wrote %s with %d tensors replaced (F32): %s", dest.name, len(replaced), ", ".join(sorted(replaced)))
    return sorted(replaced)


def _copy_metadata(reader, writer) -> None:  # type: ignore[no-untyped-def]
    """Every key/value but the header counts and the architecture, which the writer sets itself."""
    gguf = _gguf_module()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)

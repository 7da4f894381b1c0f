"""Write a merged model as a GGUF file, streamed: the plan first, then one tensor at a time.

Every tensor is declared (GGUF name, type, shape) before any data exists, the header, metadata and
tensor infos are written, then each tensor is produced by the merge, converted and written, and
dropped before the next one: memory stays bounded by the largest tensor, as for the other formats.
gguf-py (``gguf.GGUFWriter``) lays out the file and, past ``max_shard_size``, the split files with
the keys ``llama-gguf-split`` writes; ``gguf.quants`` converts to F16 / BF16 / Q8_0 with the
numpy implementation llama.cpp's own converter uses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ...dtypes import DType
from ...errors import MergeHooksError
from ...tensors import TensorSource, TensorSpec
from .families import Family, Transform, family_for, params_for, POOLING_LAST, POOLING_MEAN, POOLING_CLS
from .vocab import add_vocab, export_vocab

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
#: llama_ftype values (include/llama.h) written as general.file_type.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
QUANTIZATION_VERSION = 2

_ST_POOLING = {
    "pooling_mode_mean_tokens": POOLING_MEAN,
    "pooling_mode_cls_token": POOLING_CLS,
    "pooling_mode_lasttoken": POOLING_LAST,
}


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    transform: Optional[Transform]
    nbytes: int


def default_gguf_type(specs) -> str:
    """``bf16`` when the written weights are bfloat16, else ``f16`` (llama.cpp's converter default)."""
    floating = [s.dtype.name for s in specs if s.dtype.is_floating_point and len(s.shape) > 1]
    return "bf16" if floating and all(name == "bfloat16" for name in floating) else "f16"


def gguf_file_name(output_name: str, gguf_type: str) -> str:
    """llama.cpp's naming: ``merged`` + ``q8_0`` -> ``merged-Q8_0.gguf``."""
    return f"{output_name}-{gguf_type.upper()}.gguf"


def pooling_type(family: Family, model_dir: Path) -> int:
    """The pooling the sentence-transformers files name, else the family's (CLS for bge, last token for LLMs)."""
    if family.pooling not in (POOLING_CLS, POOLING_MEAN, POOLING_LAST):
        return family.pooling
    modules_path = model_dir / "modules.json"
    if modules_path.is_file():
        for module in json.loads(modules_path.read_text(encoding="utf-8")):
            if module.get("type", "").endswith("Pooling"):
                config_path = model_dir / module.get("path", "") / "config.json"
                config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
                for key, value in _ST_POOLING.items():
                    if config.get(key):
                        return value
                raise MergeHooksError(
                    f"cannot write GGUF: {config_path} names a pooling llama.cpp does not have "
                    "(supported: mean, cls, lasttoken)"
                )
    return family.pooling


def _tensor_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str, family: Family):
    """llama.cpp's converter rules: 1-D tensors, norms and the listed tables stay F32; rows that do not
    fill whole Q8_0 blocks fall back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if gguf_type == "f32" or len(shape) <= 1 or gguf_name in family.f32 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        logger.info("%s: rows of %d do not fill %d-wide blocks, written as F16", gguf_name, shape[-1], block_size)
        return Q.F16
    return qtype


def plan_tensors(specs, family: Family, config: dict, gguf_type: str) -> list[PlannedTensor]:
    """The GGUF tensors for ``specs`` in source order; a :class:`MergeHooksError` names tensors no rule covers."""
    from gguf import quant_shape_to_byte_shape

    planned, unknown = [], []
    for spec in specs:
        try:
            name, transform = family.map_name(spec.name)
        except KeyError:
            unknown.append(spec.name)
            continue
        if name is None:
            continue
        shape = tuple(transform.shape(spec.shape, config)) if transform else tuple(spec.shape)
        qtype = _tensor_type(name, shape, gguf_type, family)
        nbytes = 1
        for d in quant_shape_to_byte_shape(shape, qtype):  # bytes per row times the rows
            nbytes *= d
        planned.append(PlannedTensor(spec.name, name, shape, qtype, transform, nbytes))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise MergeHooksError(f"cannot write GGUF for this {family.name}: no llama.cpp tensor for {shown}")
    return planned


def _as_numpy(value, dtype: DType):
    """A merged tensor as numpy in its own dtype (bfloat16 as its uint16 bits), whether torch or numpy."""
    if hasattr(value, "detach"):
        import torch

        value = value.detach()
        # numpy has no bfloat16: its bits, as the array path holds them.
        return value.view(torch.int16).numpy().view(dtype.storage) if dtype.name == "bfloat16" else value.numpy()
    return value


def _as_float32(array, dtype: DType):
    import numpy as np

    if dtype.name == "bfloat16":
        bits = array.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return array.astype(np.float32, copy=False)


# Stored dtype -> the GGUF type whose bytes are the same: such tensors are written as they come.
_SAME_BYTES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _tensor_bytes(value, spec: TensorSpec, tensor: PlannedTensor, config: dict):
    """The bytes of one GGUF tensor: the merged values as they are when the type matches, else converted."""
    import gguf

    array = _as_numpy(value, spec.dtype)
    if tensor.transform is None and _SAME_BYTES.get(spec.dtype.name) == tensor.qtype.name:
        return array
    array = _as_float32(array, spec.dtype)
    if tensor.transform is not None:
        array = tensor.transform.apply(array, config)
    return gguf.quants.quantize(array, tensor.qtype)


def _metadata(writer, family: Family, config: dict, *, gguf_type: str, name: str,
              base_models: list[str], pooling: int) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    if base_models:
        writer.add_base_model_count(len(base_models))
        for i, base in enumerate(base_models):
            writer.add_base_model_name(i, base)
    for key, value in params_for(family, config).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_key_value(key, int(value), gguf.GGUFValueType.UINT32)
    writer.add_pooling_type(gguf.PoolingType(pooling))
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(QUANTIZATION_VERSION)


def write_gguf(
    source: TensorSource,
    directory: Path,
    *,
    model_dir: Path,
    config: dict,
    output_name: str,
    gguf_type: Optional[str] = None,
    max_shard_size: int = 0,
    base_models: Optional[list[str]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> list[Path]:
    """Write ``source`` as ``directory/<output_name>-<TYPE>.gguf`` (or its splits) and return the paths.

    ``model_dir`` holds the tokenizer and sentence-transformers files; ``config`` is its config.json.

    Example:
        >>> write_gguf(source, Path("out"), model_dir=Path("bge-base"), config=config, output_name="merged")
        [PosixPath('out/merged-F16.gguf')]
    """
    import gguf
    import numpy as np

    family = family_for(config)
    gguf_type = gguf_type or default_gguf_type(source.specs)
    if gguf_type not in GGUF_TYPES:
        raise MergeHooksError(f"unknown gguf_type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    planned = plan_tensors(source.specs, family, config, gguf_type)
    embedding = next(p for p in planned if p.name == "token_embd.weight")
    vocab = export_vocab(model_dir, vocab_size=embedding.shape[0],
                         token_type_count=None if family.decoder else config.get("type_vocab_size", 1))
    path = Path(directory) / gguf_file_name(output_name, gguf_type)
    writer = gguf.GGUFWriter(path, family.arch, split_max_size=max_shard_size)
    try:
        _metadata(writer, family, config, gguf_type=gguf_type, name=output_name,
                  base_models=base_models or [], pooling=pooling_type(family, model_dir))
        add_vocab(writer, vocab, model_dir)
        for tensor in planned:
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
        paths = writer.format_shard_names(path)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        specs = {s.name: s for s in source.specs}
        for tensor in planned:
            spec: TensorSpec = specs[tensor.hf_name]
            data = _tensor_bytes(source.get(tensor.hf_name), spec, tensor, config)
            if data.nbytes != tensor.nbytes:
                raise AssertionError(f"{tensor.name}: {data.nbytes} bytes, {tensor.nbytes} declared")
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(spec.nbytes)
    finally:
        writer.close()
    return paths

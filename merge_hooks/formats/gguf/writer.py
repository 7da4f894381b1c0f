"""Write a merged model as a GGUF file, streamed: the plan first, then one row block at a time.

Every tensor is declared (GGUF name, type, shape) before any data exists; gguf-py's
``gguf.GGUFWriter`` lays out the header, metadata and tensor infos and, past ``max_shard_size``, the
split files with the keys ``llama-gguf-split`` writes. Then each tensor's row blocks come from the
merge (:meth:`~merge_hooks.tensors.TensorSource.blocks`), go through the family's transform, are
converted (:mod:`.quants`: the bytes gguf-py's ``gguf.quants`` gives, which llama.cpp's own
converter uses) and are written at their place in the file, padded as gguf-py pads them. Memory
stays at a block or two whatever the size of the largest tensor, as for the other formats.
"""

from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
    """A merged block as numpy in its own dtype (bfloat16 as its uint16 bits), whether torch or numpy."""
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


def written_rows(blocks: Iterator[Any], transform: Optional[Transform], *, shape: tuple[int, ...], dtype: DType,
                 config: dict) -> Iterator[Any]:
    """The row blocks of one tensor as they are written: ``transform`` applied to the merged ``blocks``
    (numpy arrays of the tensor of ``shape`` and ``dtype``, in row order).

    Leading rows are dropped across block boundaries; rows that a reordering needs together (a head)
    are held back until the rest of their group arrives, so at most one block plus one group is held.
    Blocks are never modified in place (writers may share them). With a ``values`` transform the
    blocks come out as float32.

    Example:
        >>> rows = written_rows(iter(blocks), PERMUTE_K, shape=(256, 2048), dtype=bfloat16, config=config)
        >>> np.array_equal(np.concatenate(list(rows)), PERMUTE_K.apply(np.concatenate(blocks), config))
        True
    """
    import numpy as np

    if transform is None:
        yield from blocks
        return
    skip = transform.skip(config)
    group = transform.group(shape, config) if transform.reorder is not None else 1
    held = None  # fewer than ``group`` rows, waiting for the rest of their group
    for block in blocks:
        if skip:
            dropped = min(skip, block.shape[0])
            block, skip = block[dropped:], skip - dropped
        if group > 1:
            if held is not None:
                block, held = np.concatenate([held, block]), None
            whole = block.shape[0] // group * group
            if whole < block.shape[0]:
                held = block[whole:].copy()
                block = block[:whole]
            if whole:
                block = transform.reorder(block, group)
        if block.shape[0]:
            yield transform.values(_as_float32(block, dtype)) if transform.values is not None else block
    if held is not None:
        raise AssertionError(f"{held.shape[0]} rows left over: the tensor's rows are not whole groups of {group}")


def _align(f, alignment: int) -> None:
    """Zeros up to the next multiple of ``alignment``, as gguf-py's ``write_padding`` puts around tensor data."""
    pad = -f.tell() % alignment
    if pad:
        f.write(bytes(pad))


def _write_tensor(source: TensorSource, spec: TensorSpec, tensor: PlannedTensor, f, encoders: dict,
                  config: dict, *, alignment: int, behind,
                  progress: Optional[Callable[[int], None]] = None) -> None:
    """One tensor's data at the end of ``f`` (aligned, padded), block by block; each block is converted and
    written by the executor ``behind`` while the merge computes the next one."""
    import numpy as np

    from .quants import SAME_BYTES, Encoder

    def merged() -> Iterator[Any]:
        for _, block in source.blocks(spec):
            array = np.ascontiguousarray(_as_numpy(block, spec.dtype))
            yield array
            if progress is not None:
                progress(array.nbytes)

    # Values written as they come when nothing changes them; else converted (a values transform gives float32).
    stored = "float32" if tensor.transform is not None and tensor.transform.values is not None else spec.dtype.name
    as_is = tensor.transform is None and SAME_BYTES.get(stored) == tensor.qtype.name
    key = (stored, tensor.qtype.name)
    if not as_is and key not in encoders:
        encoders[key] = Encoder(*key)  # its scratch arrays serve every tensor of the same kind

    def write(rows) -> None:
        for piece in [rows] if as_is else encoders[key].pieces(rows):
            f.write(np.ascontiguousarray(piece).data)

    _align(f, alignment)
    start = f.tell()
    writing = None
    for rows in written_rows(merged(), tensor.transform, shape=spec.shape, dtype=spec.dtype, config=config):
        if writing is not None:
            writing.result()  # one block in flight: memory stays at a block or two
        # The merge makes a new array for every block it hands out (the tee keeps blocks too), so this one
        # stays as it is while the next is computed.
        writing = behind.submit(write, rows)
    if writing is not None:
        writing.result()
    written = f.tell() - start
    if written != tensor.nbytes:
        raise AssertionError(f"{tensor.name}: {written} bytes written, {tensor.nbytes} declared")
    _align(f, alignment)


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
    digests: Optional[dict[Path, str]] = None,
) -> list[Path]:
    """Write ``source`` as ``directory/<output_name>-<TYPE>.gguf`` (or its splits) and return the paths.

    ``model_dir`` holds the tokenizer and sentence-transformers files; ``config`` is its config.json.
    ``base_models`` are named as ``general.base_model.*``. With ``digests``, each file is hashed while it
    is written and its digest recorded there by path.

    Example:
        >>> write_gguf(source, Path("out"), model_dir=Path("bge-base"), config=config, output_name="merged")
        [PosixPath('out/merged-F16.gguf')]
    """
    import gguf
    import numpy as np

    from ...io.hashing import WeightFile

    family = family_for(config)
    gguf_type = gguf_type or default_gguf_type(source.specs)
    if gguf_type not in GGUF_TYPES:
        raise MergeHooksError(f"unknown gguf_type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    planned = plan_tensors(source.specs, family, config, gguf_type)
    embedding = next(p for p in planned if p.name == "token_embd.weight")
    vocab = export_vocab(model_dir, vocab_size=embedding.shape[0],
                         token_type_count=None if family.decoder else config.get("type_vocab_size", 1))
    path = Path(directory) / gguf_file_name(output_name, gguf_type)
    # gguf-py warns that a model "fails split requirements" when it fits in one file: ask for splits only when needed.
    split = max_shard_size if max_shard_size and sum(p.nbytes for p in planned) > max_shard_size else 0
    writer = gguf.GGUFWriter(path, family.arch, split_max_size=split)
    try:
        _metadata(writer, family, config, gguf_type=gguf_type, name=output_name,
                  base_models=base_models or [], pooling=pooling_type(family, model_dir))
        add_vocab(writer, vocab, model_dir)
        for tensor in planned:
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
        paths = writer.format_shard_names(path)
        # gguf-py writes the header, metadata and tensor infos of every split; the data follows here, each
        # tensor in the split gguf-py planned it in (writer.tensors: one dict per split, in order).
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        split_of = {name: i for i, tensors in enumerate(writer.tensors) for name in tensors}
        specs = {s.name: s for s in source.specs}
        encoders: dict = {}
        with contextlib.ExitStack() as stack:
            # The converted pieces live in reused scratch arrays: each is hashed before the next is made.
            files = ([stack.enter_context(WeightFile(f, reuses_buffers=True)) for f in writer.fout]
                     if digests is not None else list(writer.fout))
            # numpy lets go of the GIL in its loops: converting one block in this thread overlaps merging the next.
            behind = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-hooks-gguf"))
            for tensor in planned:
                split = split_of[tensor.name]
                _write_tensor(source, specs[tensor.hf_name], tensor, files[split], encoders, config,
                              alignment=writer.data_alignment, behind=behind, progress=progress)
            if digests is not None:
                digests.update((split_path, f.hexdigest()) for split_path, f in zip(paths, files))
    finally:
        writer.close()
    return paths

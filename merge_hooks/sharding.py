"""Shared by every format: split tensors into shards by ``max_shard_size`` and write the index file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from .tensors import TensorSource


def index_name(weights_name: str) -> str:
    """``model.safetensors`` -> ``model.safetensors.index.json`` (the names transformers looks for)."""
    return f"{weights_name}.index.json"


def plan_shards(source: TensorSource, *, weights_name: str, max_shard_size: int) -> dict[str, list[str]]:
    """File name -> tensor names, in the layout transformers and huggingface_hub use.

    A single file keeps ``weights_name``; several become ``stem-00001-of-0000N.ext``.

    Written by hand to the rules of huggingface_hub's ``split_state_dict_into_shards_factory`` (the
    same shards, in the same order; a test compares them), because importing huggingface_hub pulls in
    its HTTP stack (requests, urllib3), a noticeable part of a small merge's start-up. Tensors fill
    a shard in order until the next would pass ``max_shard_size``; a tensor larger than that gets a
    shard of its own, placed before the shard being filled.

    Example:
        >>> plan_shards(source, weights_name="pytorch_model.bin", max_shard_size=10**9)
        {'pytorch_model.bin': ['embeddings.word_embeddings.weight', ...]}
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for spec in source.specs:
        if spec.nbytes > max_shard_size:
            shards.append([spec.name])
            continue
        if current_size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(spec.name)
        current_size += spec.nbytes
    if current:
        shards.append(current)
    stem, ext = weights_name.rsplit(".", 1)
    if len(shards) == 1:
        return {weights_name: [spec.name for spec in source.specs]}
    return {f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}": names for i, names in enumerate(shards)}


def write_sharded(
    source: TensorSource,
    directory: Path,
    *,
    weights_name: str,
    max_shard_size: int,
    write_file: Callable[[Path, TensorSource, bool], Optional[str]],
    digests: Optional[dict[Path, str]] = None,
) -> list[Path]:
    """Write ``source`` as one file or as shards plus an index; return the paths written.

    ``write_file(path, shard, digest)`` writes one file and, when ``digest`` is true, returns its hex
    digest (:data:`~merge_hooks.io.hashing.ALGORITHM`), which is recorded in ``digests`` (when given).
    """
    plan = plan_shards(source, weights_name=weights_name, max_shard_size=max_shard_size)
    written = []
    for filename, names in plan.items():
        path = directory / filename
        digest = write_file(path, source.subset(names), digests is not None)
        if digests is not None:
            digests[path] = digest
        written.append(path)
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": source.total_bytes},
            "weight_map": {name: filename for filename, names in plan.items() for name in names},
        }
        index_path = directory / index_name(weights_name)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_path)
    return written

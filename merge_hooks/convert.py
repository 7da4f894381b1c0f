"""Re-save an existing model folder in another format or dtype, streaming tensor by tensor."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import ValidationError

from .card import INFO_NAME, MANIFEST_NAME, README_NAME, RECIPE_NAME, MergeInfo, hash_files, render_card, write_manifest
from .checkpoint import Checkpoint, is_weight_file
from .engines import output_dtype, written_dtype
from .errors import MergeHooksError
from .formats import (
    PreflightContext,
    WriteOptions,
    expand_formats,
    finish_formats,
    output_size,
    preflight_formats,
    write_formats,
)
from .paths import check_tree, read_json
from .pipeline import MergeResult, folder_listing
from .preflight import check_disk_space, check_output, read_config, resolve_model_path
from .progress import byte_progress
from .recipe import load_recipe
from .sidecar import write_config
from .staging import claimed_output, staged_output
from .tensors import TensorSource, TensorSpec
from .recipe import OutputOptions, describe_validation_error

logger = logging.getLogger(__name__)


def _refresh_provenance(
    directory: Path,
    *,
    location: Path,
    save_format: str,
    max_shard_size: Union[int, str],
    dtype_name: Optional[str],
    written: list[Path],
    digests: dict[Path, str],
) -> None:
    """A converted merge output describes what convert wrote: merge info, recipe, card and manifest.

    The recipe's output becomes ``location`` with the new format and dtype, so ``verify --against`` on
    the converted folder recomputes what it holds. ``digests`` holds the digests of the ``written``
    weight files the format hashed while writing them.
    """
    info_path = directory / INFO_NAME
    if info_path.is_file():
        info = read_json(directory, INFO_NAME)
        info.update(save_format=save_format, dtype=dtype_name)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    recipe_path = directory / RECIPE_NAME
    if recipe_path.is_file():
        output = {"path": str(location), "save_format": save_format, "max_shard_size": max_shard_size,
                  "dtype": dtype_name or "keep"}
        recipe = load_recipe(recipe_path, overrides={f"output.{key}": value for key, value in output.items()})
        recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
        info = MergeInfo.read(directory)
        if info is not None and (directory / README_NAME).is_file():
            (directory / README_NAME).write_text(render_card(info, recipe, location=str(location)), encoding="utf-8")
    if (directory / MANIFEST_NAME).is_file():
        write_manifest(directory, hashed=hash_files(written, root=directory, known=digests))


def convert(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    save_format: Union[str, list[str]],
    max_shard_size: Union[int, str] = "5GB",
    dtype: str = "keep",
    overwrite: bool = False,
    force: bool = False,
    quiet: bool = False,
    **format_options: Any,
) -> MergeResult:
    """Write the model in ``src`` to ``dst`` in ``save_format``, with every non-weight file copied along.

    ``format_options`` are the formats' own output options (``gguf_type="q8_0"``), as in a recipe's ``output``.
    ``dst`` follows the rules of :func:`merge_hooks.paths.check_output_location` (never ``src`` or a folder
    around or inside it; ``overwrite`` replaces merge-hooks outputs, ``force`` with it any folder).

    Example:
        >>> convert("merged-safetensors", "merged-bin", save_format="bin")
    """
    if dtype not in ("keep", "float32", "float16", "bfloat16"):
        raise MergeHooksError(f"unknown dtype {dtype!r}; use keep, float32, float16 or bfloat16")
    try:
        output = OutputOptions(path=Path(dst), save_format=save_format, max_shard_size=max_shard_size, dtype=dtype,
                               **format_options)
    except ValidationError as exc:
        raise MergeHooksError(describe_validation_error(exc, "convert")) from None
    formats = expand_formats(output.formats)
    format_names = tuple(fmt.name for fmt in formats)
    shard_bytes = output.max_shard_bytes
    source_dir = resolve_model_path(str(src))
    config = read_config(source_dir, str(src))
    target = check_output(dst, overwrite=overwrite, force=force, inputs=(source_dir,))
    context = PreflightContext(model_dir=source_dir, config=config, model_type=None, output=output, formats=format_names)
    preflight_formats(formats, context)
    with claimed_output(target) as claim, Checkpoint(source_dir) as checkpoint:
        check_output(target, overwrite=overwrite, force=force, inputs=(source_dir,))
        extras = [entry.name for entry in source_dir.iterdir()
                  if entry.name != "config.json" and not is_weight_file(entry.name)]
        for name in extras:
            check_tree(source_dir, name, what="file")
        out = output_dtype(dtype, checkpoint.dtype)
        specs = [TensorSpec(s.name, written_dtype(s.dtype, out), s.shape) for s in checkpoint.specs.values()]
        out_dtypes = {s.name: s.dtype for s in specs}
        tensors = TensorSource(
            specs=specs,
            get=lambda name: checkpoint.get(name).to(out_dtypes[name].torch),
            # Row blocks, for the formats that write in blocks: memory stays at one block, not one tensor.
            rows=lambda name, start, stop: checkpoint.get(name, rows=(start, stop)).to(out_dtypes[name].torch),
        )
        check_disk_space(target.parent, output_size(formats, context, specs))
        with staged_output(target, claim=claim) as staging:
            digests: dict[Path, str] = {}
            writing = sum(fmt.size_factor for fmt in formats if fmt.write is not None)
            with byte_progress(tensors.total_bytes * writing, "converting", quiet=quiet) as advance:
                options = WriteOptions(shard_bytes, progress=advance, digests=digests, formats=format_names,
                                       model_dir=source_dir, config=config, output_name=target.name, output=output)
                written = write_formats(tensors, staging, formats, options)
            for entry in (source_dir / name for name in extras):
                if entry.is_dir():
                    shutil.copytree(entry, staging / entry.name)
                else:
                    shutil.copy2(entry, staging / entry.name)
            dtype_name = out.name if out is not None else None
            write_config(source_dir, staging, dtype_name=dtype_name)
            written += finish_formats(staging, formats, options)
            written = [path for path in written if path.is_file()]
            _refresh_provenance(staging, location=target, save_format=output.save_format,
                                max_shard_size=max_shard_size, dtype_name=dtype_name, written=written, digests=digests)
    files = folder_listing(target)
    return MergeResult(output=target, files=files, weights=[], engine="convert", save_format=",".join(format_names),
                       dtype=dtype_name)

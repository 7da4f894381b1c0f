"""One merge from recipe to committed folder.

preflight -> engine -> output format -> sidecars and bge-m3 heads -> provenance (card, recipe, manifest)
-> optional verification -> commit.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .adapters import adapter_folders, adapter_provenance, adapter_requests, write_adapter_sidecars
from .card import MergeInfo, hash_files, recorded_recipe, write_manifest, write_provenance
from .engines import EngineResult, output_dtype, written_dtype
from .errors import MergeHooksError
from .formats import (
    OutputFormat,
    PreflightContext,
    WriteOptions,
    expand_formats,
    finish_formats,
    output_size,
    preflight_formats,
    write_formats,
)
from .heads import heads_present, merge_heads, write_heads
from .preflight import InputModel, check_disk_space, check_output, load_inputs
from .progress import byte_progress
from .recipe import Recipe
from .sidecar import copy_code_files, write_sidecars
from .staging import Claim, claimed_output, staged_output
from .tensors import TensorSpec
from .units import format_size

logger = logging.getLogger(__name__)

# mix_models_with_data scores every example with every model: far fewer than this is already slow.
MAX_EXAMPLES_BYTES = 1 << 30
# Room for config, tokenizer and other sidecar files on top of the weights.
SIDECAR_ALLOWANCE = 64 * 10**6


@dataclass
class MergeResult:
    """What a merge wrote."""

    output: Path
    files: list[tuple[str, int]]
    weights: list[float]
    engine: str
    save_format: str
    dtype: Optional[str]
    model: Any = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def folder_listing(folder: Path) -> list[tuple[str, int]]:
    """Every file under ``folder`` as (relative name, size in bytes), sorted."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def _read_examples_text(path: Path) -> str:
    """The examples file's text; only a regular file of at most MAX_EXAMPLES_BYTES is read.

    Opened non-blocking and checked on the open descriptor, so a named pipe or device is refused
    instead of hanging or filling memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise MergeHooksError(f"cannot read examples file {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MergeHooksError(f"examples file {path} is not a regular file; give a JSON lines file")
    if st.st_size > MAX_EXAMPLES_BYTES:
        os.close(fd)
        raise MergeHooksError(
            f"examples file {path} has {format_size(st.st_size)}, more than the {format_size(MAX_EXAMPLES_BYTES)} "
            "merge-hooks reads; a few hundred examples are enough to choose weights"
        )
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_EXAMPLES_BYTES + 1)
    if len(data) > MAX_EXAMPLES_BYTES:
        raise MergeHooksError(f"examples file {path} grew past {format_size(MAX_EXAMPLES_BYTES)} while being read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MergeHooksError(f"examples file {path} is not UTF-8 text: {exc}") from None


def _read_examples(path: Path) -> list:
    text = _read_examples_text(path)
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise MergeHooksError(f"{path} is not JSON lines: {exc}") from None


def load_examples(source: Union[Path, list[dict]], model_type: str, *, neg_number: int) -> list[dict]:
    """``mix_models_with_data`` examples, checked: a list of LM_Cocktail's example dicts as it is, or read
    from a file of JSON lines (or one JSON list)."""
    examples, name = (source, "examples") if isinstance(source, list) else (_read_examples(Path(source)), str(source))
    required = ("input", "output") if model_type == "decoder" else ("query", "pos", "neg")
    if not isinstance(examples, list) or not examples:
        raise MergeHooksError(f"{name} holds no examples")
    for i, example in enumerate(examples, 1):
        if not isinstance(example, dict) or any(key not in example for key in required):
            raise MergeHooksError(f"{name}: example {i} needs the keys {', '.join(required)} for a {model_type} merge")
        if model_type == "encoder" and not isinstance(example["neg"], list):
            raise MergeHooksError(f"{name}: example {i} needs 'neg' to be a list of texts")
        if model_type == "encoder" and len(example["neg"]) < neg_number:
            raise MergeHooksError(
                f"{name}: example {i} has {len(example['neg'])} negatives, fewer than neg_number={neg_number}"
            )
    return examples


def cocktail_options(recipe: Recipe, examples: Optional[list[dict]]) -> dict[str, Any]:
    """The keyword arguments of :func:`~merge_hooks.engines.cocktail.run_cocktail` for this recipe."""
    return {
        "weights": None if examples is not None else recipe.weights,
        "examples": examples,
        "temperature": recipe.temperature,
        "batch_size": recipe.batch_size,
        "max_input_length": recipe.max_input_length,
        "neg_number": recipe.neg_number,
        "seed": recipe.seed,
        "trust_remote_code": recipe.trust_remote_code,
    }


def choose_engine(recipe: Recipe, models: list[InputModel]) -> str:
    """``auto`` streams unless a model brings custom code, whose weights only its own classes know."""
    if recipe.engine != "auto":
        return recipe.engine
    if any(m.adapters for m in recipe.models):
        return "stream"  # only the stream engine merges adapters; a model with custom code streams too
    if any("auto_map" in m.config for m in models):
        return "cocktail"
    return "stream"


def _merge(
    recipe: Recipe, models: list[InputModel], engine: str, examples: Optional[list[dict]], dtype, *, arrays: bool,
    quiet: bool,
) -> EngineResult:
    paths = [m.path for m in models]
    if engine == "cocktail":
        from .engines.cocktail import cocktail_merge

        return cocktail_merge(
            recipe.method, [str(p) for p in paths], recipe.model_type, dtype=dtype, quiet=quiet,
            **cocktail_options(recipe, examples),
        )
    from .engines.stream import stream_merge

    if examples is not None:
        from .engines import collecting_garbage
        from .engines.weights import compute_weights, seeded

        with collecting_garbage(), seeded(recipe.seed):
            weights = compute_weights(
                paths,
                recipe.model_type,
                examples,
                temperature=recipe.temperature,
                batch_size=recipe.batch_size,
                max_input_length=recipe.max_input_length,
                neg_number=recipe.neg_number,
                trust_remote_code=recipe.trust_remote_code,
                quiet=quiet,
            )
        logger.info("weights from the examples: %s", ", ".join(f"{w:.6f}" for w in weights))
    else:
        weights = recipe.weights
    return stream_merge(models, weights, dtype=dtype, arrays=arrays)


def merge_tensors(recipe: Recipe, models: list[InputModel], *, dtype, quiet: bool = True) -> EngineResult:
    """Merge ``models`` as ``recipe`` says into floating tensors of ``dtype``, writing nothing.

    This is the Python API's ``output_path=None``; the caller closes the result.
    """
    examples = None
    if recipe.method == "mix_models_with_data":
        examples = load_examples(recipe.examples, recipe.model_type, neg_number=recipe.neg_number)
    engine = choose_engine(recipe, models)
    return _merge(recipe, models, engine, examples, dtype, arrays=False, quiet=quiet)


def _verify_staging(staging: Path, *, trust_remote_code: bool) -> None:
    """Check the staged folder before it is committed; its manifest was just written from the same bytes."""
    from .verify import verify_folder

    report = verify_folder(staging, hashes=False, trust_remote_code=trust_remote_code)
    if report.problems:
        raise MergeHooksError(
            "the merged output failed verification, nothing was written: " + "; ".join(report.problems)
        )


def _dtype_name(dtype) -> Optional[str]:
    return dtype.name if dtype is not None else None


def run_recipe(
    recipe: Recipe, *, overwrite: bool = False, force: bool = False, quiet: bool = False, verify: bool = False
) -> MergeResult:
    """Run a whole merge and write the result atomically to ``recipe.output.path``.

    All checks run before any model is merged; on any error nothing is written. ``overwrite`` replaces
    an earlier merge-hooks output, ``force`` (with ``overwrite``) any other non-empty folder; an output that
    is, holds or lies inside an input is always refused (see :mod:`merge_hooks.paths`). With ``verify``, the
    written folder is checked (complete, loads with transformers and the other loaders that apply, see
    :func:`merge_hooks.verify.verify_folder`) before it replaces anything; a failed check is a
    :class:`MergeHooksError` and nothing is written.

    Example:
        >>> result = run_recipe(load_recipe("configs/encoder-mix_models.yaml"), overwrite=True)
        >>> result.files
        [('config.json', 712), ('pytorch_model.bin', 438012345), ...]
    """
    if not isinstance(recipe, Recipe):
        raise MergeHooksError(f"run_recipe needs a Recipe (see load_recipe, recipe_from_dict), got {type(recipe).__name__}")
    formats = expand_formats(recipe.output.formats)
    local = tuple(Path(p).expanduser() for p in recipe.model_paths if Path(p).expanduser().exists())
    target = check_output(recipe.output.path, overwrite=overwrite, force=force, inputs=local)
    with claimed_output(target) as claim:
        return _run_claimed(recipe, formats, claim, overwrite=overwrite, force=force, quiet=quiet, verify=verify)


def _run_claimed(
    recipe: Recipe, formats: list[OutputFormat], claim: Claim, *, overwrite: bool, force: bool, quiet: bool, verify: bool
) -> MergeResult:
    target = claim.target
    format_names = tuple(fmt.name for fmt in formats)
    models = load_inputs(recipe.model_paths, trust_remote_code=recipe.trust_remote_code,
                         adapters=adapter_requests(recipe), revisions=recipe.revisions)
    try:
        # Again now that the inputs are resolved and the target is locked: what it holds now is what may be replaced.
        check_output(target, overwrite=overwrite, force=force, inputs=(*[m.path for m in models], *adapter_folders(models)))
        first = models[0]
        context = PreflightContext(model_dir=first.path, config=first.config, model_type=recipe.model_type,
                                   output=recipe.output, formats=format_names)
        preflight_formats(formats, context)
        examples = None
        if recipe.method == "mix_models_with_data":
            examples = load_examples(recipe.examples, recipe.model_type, neg_number=recipe.neg_number)
        dtype = output_dtype(recipe.output.dtype, first.checkpoint.dtype)
        written_specs = [TensorSpec(s.name, written_dtype(s.dtype, dtype), s.shape) for s in first.checkpoint.specs.values()]
        check_disk_space(target.parent, output_size(formats, context, written_specs) + SIDECAR_ALLOWANCE)
        m3_heads = bool(heads_present(first.path))  # preflight made sure every model has them, or none

        engine = choose_engine(recipe, models)
        logger.info("merging %d models with the %s engine", len(models), engine)
        arrays = all(fmt.takes_arrays for fmt in formats if fmt.write is not None)
        result = _merge(recipe, models, engine, examples, dtype, arrays=arrays, quiet=quiet)
        try:
            # LM_Cocktail never merges bge-m3's heads, whichever engine ran.
            heads = merge_heads([m.path for m in models], result.weights, dtype=result.dtype) if m3_heads else None
            recorded = recorded_recipe(recipe, models, output=target)
            info = MergeInfo(
                model_type=recipe.model_type,
                method=recipe.method,
                engine=result.engine,
                models=recorded.model_paths,
                weights=list(result.weights),
                save_format=",".join(format_names),
                dtype=_dtype_name(result.dtype),
                m3_heads=m3_heads,
                adapters=adapter_provenance(models),
                seed=recipe.seed,
            )
            with staged_output(target, claim=claim) as staging:
                digests: dict[Path, str] = {}
                writing = sum(fmt.size_factor for fmt in formats if fmt.write is not None)
                with byte_progress(result.source.total_bytes * writing, "writing", quiet=quiet) as advance:
                    options = WriteOptions(
                        recipe.output.max_shard_bytes, progress=advance, digests=digests, formats=format_names,
                        model_dir=first.path, config=first.config, model_type=recipe.model_type,
                        output_name=target.name, output=recipe.output, models=tuple(recipe.model_paths),
                    )
                    written = write_formats(result.source, staging, formats, options)
                # Files the formats did not hash while writing them are hashed now, while still in the page cache.
                hashed = hash_files(written, root=staging, known=digests)
                write_sidecars(
                    first.path,
                    staging,
                    model_type=recipe.model_type,
                    config=first.config,
                    dtype_name=_dtype_name(result.dtype),
                    architectures=result.architectures,
                )
                write_adapter_sidecars(first.checkpoint, staging)
                if recipe.trust_remote_code:
                    copy_code_files(first.path, staging)
                if heads is not None:
                    write_heads(staging, heads)
                finished = finish_formats(staging, formats, options)
                hashed = {name: d for name, d in hashed.items() if (staging / name).is_file()}
                hashed.update(hash_files(finished, root=staging))
                write_provenance(staging, info, recorded, location=str(target))
                write_manifest(staging, hashed=hashed)
                if verify:
                    _verify_staging(staging, trust_remote_code=recipe.trust_remote_code)
        finally:
            result.close()
    finally:
        for model in models:
            model.checkpoint.close()
    files = folder_listing(target)
    return MergeResult(
        output=target,
        files=files,
        weights=result.weights,
        engine=result.engine,
        save_format=",".join(format_names),
        dtype=_dtype_name(result.dtype),
        model=result.model,
    )

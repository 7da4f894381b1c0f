"""The Python API: LM_Cocktail's three merge functions with an output stage, and ``save`` for any model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from .errors import MergeHooksError
from .recipe import DEFAULT_MAX_SHARD_SIZE, Recipe, recipe_from_dict

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def _output_options(output_path, save_format, max_shard_size, dtype) -> dict:
    return {
        "path": None if output_path is None else str(output_path),
        "save_format": save_format,
        "max_shard_size": max_shard_size,
        "dtype": dtype,
    }


def _run(recipe: Recipe, *, overwrite: bool, quiet: bool):
    """Merge; write through the output stage when the recipe has an output path; return the model."""
    from .pipeline import run_recipe

    if recipe.output.path is not None:
        return run_recipe(recipe, overwrite=overwrite, quiet=quiet).model
    from .engines.cocktail import run_cocktail
    from .pipeline import cocktail_options, load_examples
    from .preflight import load_inputs

    models = load_inputs(recipe.model_paths, trust_remote_code=recipe.trust_remote_code)
    for model in models:
        model.checkpoint.close()
    examples = None
    if recipe.examples is not None:
        examples = load_examples(recipe.examples, recipe.model_type, neg_number=recipe.neg_number)
    merged, _weights = run_cocktail(
        recipe.method, [str(m.path) for m in models], recipe.model_type, **cocktail_options(recipe, examples)
    )
    return merged


def _recipe(method: str, paths, model_type: str, weights, *, output: dict, engine: str, trust_remote_code: bool, **extra) -> Recipe:
    models = [{"path": str(p)} if weights is None else {"path": str(p), "weight": w} for p, w in zip(paths, weights or [None] * len(paths))]
    if weights is not None and len(weights) != len(paths):
        raise MergeHooksError(f"got {len(paths)} models but {len(weights)} weights; give one weight per model")
    data = {"model_type": model_type, "method": method, "engine": engine, "models": models, "output": output,
            "trust_remote_code": trust_remote_code, **extra}
    return recipe_from_dict(data, source=method)


def mix_models(
    model_names_or_paths: list[PathLike],
    model_type: str,
    weights: list[float],
    output_path: Optional[PathLike] = None,
    *,
    save_format: str = "safetensors",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    dtype: str = "keep",
    engine: str = "cocktail",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
) -> Any:
    """LM_Cocktail's ``mix_models``, writing the result through merge-hooks' output stage.

    Returns the merged model as LM_Cocktail does (``None`` with ``engine="stream"``, which never holds it).

    Example:
        >>> model = mix_models(["bge-ft", "BAAI/bge-base-en-v1.5"], "encoder", [0.5, 0.5], "merged", save_format="bin")
    """
    recipe = _recipe("mix_models", model_names_or_paths, model_type, weights, engine=engine,
                     trust_remote_code=trust_remote_code,
                     output=_output_options(output_path, save_format, max_shard_size, dtype))
    return _run(recipe, overwrite=overwrite, quiet=quiet)


def mix_models_by_layers(
    model_names_or_paths: list[PathLike],
    model_type: str,
    weights: list[float],
    output_path: Optional[PathLike] = None,
    *,
    save_format: str = "safetensors",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    dtype: str = "keep",
    engine: str = "cocktail",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
) -> Any:
    """LM_Cocktail's ``mix_models_by_layers`` with merge-hooks' output stage (see :func:`mix_models`)."""
    recipe = _recipe("mix_models_by_layers", model_names_or_paths, model_type, weights, engine=engine,
                     trust_remote_code=trust_remote_code,
                     output=_output_options(output_path, save_format, max_shard_size, dtype))
    return _run(recipe, overwrite=overwrite, quiet=quiet)


def mix_models_with_data(
    model_names_or_paths: list[PathLike],
    model_type: str,
    examples: PathLike,
    temperature: float = 5.0,
    batch_size: int = 2,
    max_input_length: int = 2048,
    neg_number: int = 7,
    output_path: Optional[PathLike] = None,
    *,
    save_format: str = "safetensors",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    dtype: str = "keep",
    engine: str = "cocktail",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
) -> Any:
    """LM_Cocktail's ``mix_models_with_data`` with merge-hooks' output stage.

    ``examples`` is a JSON lines file of LM_Cocktail example dicts (``query``/``pos``/``neg`` for
    encoders, ``input``/``output`` for decoders).

    Example:
        >>> model = mix_models_with_data(["bge-ft", "bge-base"], "encoder", "examples.jsonl", output_path="merged")
    """
    recipe = _recipe("mix_models_with_data", model_names_or_paths, model_type, None, engine=engine,
                     trust_remote_code=trust_remote_code,
                     output=_output_options(output_path, save_format, max_shard_size, dtype),
                     examples=str(examples), temperature=temperature, batch_size=batch_size,
                     max_input_length=max_input_length, neg_number=neg_number)
    return _run(recipe, overwrite=overwrite, quiet=quiet)


def save(
    model: Any,
    path: PathLike,
    *,
    save_format: str = "safetensors",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    dtype: str = "keep",
    source: Optional[PathLike] = None,
    tokenizer: Any = None,
    model_type: Optional[str] = None,
    overwrite: bool = False,
    quiet: bool = True,
) -> list[tuple[str, int]]:
    """Write any Hugging Face model already in memory through the output stage, atomically.

    Args:
        model: a transformers ``PreTrainedModel``.
        path: output folder.
        source: a model folder to take tokenizer, generation config and sentence-transformers files from
            (usually the first model of the merge).
        tokenizer: a tokenizer object to save instead, when there is no ``source``.
        model_type: ``encoder`` also writes sentence-transformers files (copied from ``source``, else CLS + Normalize).

    Returns:
        The files written, as (relative name, size in bytes).

    Example:
        >>> save(model, "merged", save_format="bin", source="bge-base-finetuned", model_type="encoder")
    """
    import json

    from . import dtypes
    from .engines.cocktail import model_source
    from .formats import WriteOptions, expand_formats, finish_formats, write_formats
    from .pipeline import folder_listing
    from .preflight import check_disk_space, check_output
    from .progress import byte_progress
    from .recipe import OutputOptions
    from .sidecar import (
        copy_sentence_transformers_files,
        copy_tokenizer_and_generation_files,
        max_seq_length,
        write_default_sentence_transformers_files,
    )
    from .staging import staged_output

    try:
        options = OutputOptions(path=Path(path), save_format=save_format, max_shard_size=max_shard_size, dtype=dtype)
    except ValueError as exc:
        raise MergeHooksError(str(exc)) from None
    formats = expand_formats(options.formats)
    target = check_output(options.path, overwrite=overwrite)
    out_dtype = dtypes.of(model.dtype if dtype == "keep" else dtype)
    tensors = model_source(model, dtype=out_dtype)
    check_disk_space(target.parent, tensors.total_bytes * sum(fmt.size_factor for fmt in formats))
    source_dir = Path(source) if source is not None else None
    config = model.config.to_dict()
    with staged_output(target) as staging:
        writing = sum(fmt.size_factor for fmt in formats if fmt.write is not None)
        with byte_progress(tensors.total_bytes * writing, "writing", quiet=quiet) as advance:
            write_options = WriteOptions(
                options.max_shard_bytes, progress=advance, formats=tuple(fmt.name for fmt in formats),
                model_dir=source_dir, config=config, model_type=model_type, output_name=target.name, output=options,
            )
            write_formats(tensors, staging, formats, write_options)
        dtype_name = out_dtype.name
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype_name
        config["architectures"] = [type(model).__name__]
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if source_dir is not None:
            copy_tokenizer_and_generation_files(source_dir, staging)
        else:
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None and model.can_generate():
                generation_config.save_pretrained(staging)
        if model_type == "encoder" and not (source_dir and copy_sentence_transformers_files(source_dir, staging)):
            write_default_sentence_transformers_files(
                staging,
                hidden_size=int(config.get("hidden_size", 0)),
                max_seq_length=max_seq_length(source_dir, config) if source_dir else int(config.get("max_position_embeddings", 512)),
            )
        finish_formats(staging, formats, write_options)
    return folder_listing(target)

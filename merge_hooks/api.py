"""The Python API: LM_Cocktail's three merge functions with an output stage, and ``save`` for any model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from . import dtypes
from .errors import MergeHooksError
from .recipe import DEFAULT_MAX_SHARD_SIZE, Recipe, recipe_from_dict

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


Examples = Union[PathLike, list[dict]]

# LM_Cocktail's loaders, by model_type: what its functions return, and what the stream engine's result is loaded as.
_AUTO_CLASSES = {"encoder": "AutoModel", "reranker": "AutoModelForSequenceClassification", "decoder": "AutoModelForCausalLM"}


def _output_options(output_path, save_format, max_shard_size, dtype, extra: dict) -> dict:
    return {
        "path": None if output_path is None else str(output_path),
        "save_format": save_format,
        "max_shard_size": max_shard_size,
        "dtype": dtype,
        **extra,
    }


def _load_model(path: Path, model_type: str, *, trust_remote_code: bool) -> Any:
    """A model folder loaded as LM_Cocktail loads its inputs (its Auto class, transformers' default dtype)."""
    import transformers

    from .progress import loader_progress_bars

    with loader_progress_bars(enabled=False):
        return getattr(transformers, _AUTO_CLASSES[model_type]).from_pretrained(
            str(Path(path).absolute()), local_files_only=True, trust_remote_code=trust_remote_code
        )


def _merge_in_memory(recipe: Recipe, *, quiet: bool) -> Any:
    """Merge without writing anything; return the model LM_Cocktail would return."""
    import torch

    from .pipeline import choose_engine, merge_tensors
    from .preflight import load_inputs, prefix_map

    models = load_inputs(recipe.model_paths, trust_remote_code=recipe.trust_remote_code, revisions=recipe.revisions)
    try:
        if choose_engine(recipe, models) == "cocktail":
            result = merge_tensors(recipe, models, dtype=None, quiet=quiet)
            result.close()
            return result.model
        # The merged tensors go into the first model loaded as LM_Cocktail loads it, cast to its dtype
        # as LM_Cocktail's load_state_dict casts them.
        model = _load_model(models[0].path, recipe.model_type, trust_remote_code=recipe.trust_remote_code)
        result = merge_tensors(recipe, models, dtype=dtypes.of(model.dtype), quiet=quiet)
    finally:
        for m in models:
            m.checkpoint.close()
    try:
        state = model.state_dict()
        merged = {spec.name for spec in result.source.specs}
        names = {name: name for name in state if name in merged}
        if len(names) < len(merged):
            names = prefix_map(set(state), merged) or names
        with torch.no_grad():
            for name, source_name in names.items():
                state[name].copy_(result.source.get(source_name))
        return model
    finally:
        result.close()


def _run(recipe: Recipe, *, overwrite: bool, force: bool, quiet: bool, return_model: bool):
    """Merge; write through the output stage when the recipe has an output path; return the model."""
    from .pipeline import run_recipe

    if recipe.output.path is None:
        return _merge_in_memory(recipe, quiet=quiet)
    result = run_recipe(recipe, overwrite=overwrite, force=force, quiet=quiet)
    if not return_model:
        return None
    if result.model is not None:
        return result.model
    return _load_model(result.output, recipe.model_type, trust_remote_code=recipe.trust_remote_code)


def _recipe(method: str, paths, model_type: str, weights, *, output: dict, engine: str, trust_remote_code: bool, **extra) -> Recipe:
    if isinstance(paths, (str, Path)):
        raise MergeHooksError(f"model_names_or_paths must be a list of models, got the single path {str(paths)!r}")
    paths = list(paths)
    if weights is not None and len(weights) != len(paths):
        raise MergeHooksError(f"got {len(paths)} models but {len(weights)} weights; give one weight per model")
    models = [{"path": str(p)} if weights is None else {"path": str(p), "weight": w} for p, w in zip(paths, weights or [None] * len(paths))]
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
    engine: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
    return_model: bool = True,
    **output_options: Any,
) -> Any:
    """LM_Cocktail's ``mix_models`` (same arguments), writing the result through merge-hooks' output stage.

    Returns the merged model as LM_Cocktail does, whichever engine merged: the stream engine's output
    is loaded back with the Auto class of ``model_type`` (``return_model=False`` skips that and returns
    None). With ``output_path=None`` nothing is written. ``overwrite`` replaces an earlier merge-hooks
    output, ``force`` (with it) any other folder; ``output_options`` are the other keys of a recipe's
    ``output`` (``gguf_type="q8_0"``, ``onnx_quantize="qint8"``).

    Example:
        >>> model = mix_models(["bge-ft", "BAAI/bge-base-en-v1.5"], "encoder", [0.5, 0.5], "merged", save_format="bin")
    """
    recipe = _recipe("mix_models", model_names_or_paths, model_type, weights, engine=engine,
                     trust_remote_code=trust_remote_code,
                     output=_output_options(output_path, save_format, max_shard_size, dtype, output_options))
    return _run(recipe, overwrite=overwrite, force=force, quiet=quiet, return_model=return_model)


def mix_models_by_layers(
    model_names_or_paths: list[PathLike],
    model_type: str,
    weights: list[float],
    output_path: Optional[PathLike] = None,
    *,
    save_format: str = "safetensors",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    dtype: str = "keep",
    engine: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
    return_model: bool = True,
    **output_options: Any,
) -> Any:
    """LM_Cocktail's ``mix_models_by_layers`` with merge-hooks' output stage (see :func:`mix_models`).

    Example:
        >>> model = mix_models_by_layers(["llama-chat", "llama-news"], "decoder", [0.7, 0.3], "mixed_llm")
    """
    recipe = _recipe("mix_models_by_layers", model_names_or_paths, model_type, weights, engine=engine,
                     trust_remote_code=trust_remote_code,
                     output=_output_options(output_path, save_format, max_shard_size, dtype, output_options))
    return _run(recipe, overwrite=overwrite, force=force, quiet=quiet, return_model=return_model)


def mix_models_with_data(
    model_names_or_paths: list[PathLike],
    model_type: str,
    example_ata: Optional[Examples] = None,
    temperature: float = 5.0,
    batch_size: int = 2,
    max_input_length: int = 2048,
    neg_number: int = 7,
    output_path: Optional[PathLike] = None,
    *,
    examples: Optional[Examples] = None,
    seed: Optional[int] = None,
    save_format: str = "safetensors",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    dtype: str = "keep",
    engine: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
    return_model: bool = True,
    **output_options: Any,
) -> Any:
    """LM_Cocktail's ``mix_models_with_data`` (same arguments) with merge-hooks' output stage.

    The examples (``example_ata``, LM_Cocktail 0.0.4's spelling, or ``examples``) are a list of
    LM_Cocktail's example dicts (``query``/``pos``/``neg`` for encoders, ``input``/``output`` for
    decoders) or a JSON lines file of them. ``seed`` fixes LM_Cocktail's sampling of negatives, so
    the weights are the same on every run. Returns the model as :func:`mix_models` does.

    Example:
        >>> model = mix_models_with_data(["bge-ft", "bge-base"], "encoder", example_ata=examples, neg_number=2, seed=0)
    """
    if example_ata is not None and examples is not None:
        raise MergeHooksError("give the examples once: example_ata (LM_Cocktail's name) or examples, not both")
    data = example_ata if example_ata is not None else examples
    if data is None:
        raise MergeHooksError("mix_models_with_data needs examples: a list of example dicts or a JSON lines file")
    recipe = _recipe("mix_models_with_data", model_names_or_paths, model_type, None, engine=engine,
                     trust_remote_code=trust_remote_code,
                     output=_output_options(output_path, save_format, max_shard_size, dtype, output_options),
                     examples=list(data) if isinstance(data, (list, tuple)) else str(data),
                     temperature=temperature, batch_size=batch_size,
                     max_input_length=max_input_length, neg_number=neg_number, seed=seed)
    return _run(recipe, overwrite=overwrite, force=force, quiet=quiet, return_model=return_model)


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
    force: bool = False,
    quiet: bool = True,
    **output_options: Any,
) -> list[tuple[str, int]]:
    """Write any Hugging Face model already in memory through the output stage, atomically.

    Args:
        model: a transformers ``PreTrainedModel``.
        path: output folder.
        source: a model folder to take tokenizer, generation config and sentence-transformers files from
            (usually the first model of the merge).
        tokenizer: a tokenizer object to save instead, when there is no ``source``.
        model_type: ``encoder`` also writes sentence-transformers files (copied from ``source``, else CLS + Normalize).
        overwrite: replace an earlier merge-hooks output (``force`` too: any non-empty folder).
        output_options: other keys of a recipe's ``output`` (``gguf_type="q8_0"``, ``onnx_quantize="qint8"``).

    Returns:
        The files written, as (relative name, size in bytes).

    Example:
        >>> save(model, "merged", save_format="bin", source="bge-base-finetuned", model_type="encoder")
    """
    import json

    from .card import write_manifest
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
        options = OutputOptions(path=str(path), save_format=save_format, max_shard_size=max_shard_size, dtype=dtype,
                                **output_options)
    except ValueError as exc:
        raise MergeHooksError(str(exc)) from None
    formats = expand_formats(options.formats)
    target = check_output(options.path, overwrite=overwrite, force=force)
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
        # The manifest marks the folder as merge-hooks output, which a later save(..., overwrite=True) may replace.
        write_manifest(staging)
    return folder_listing(target)

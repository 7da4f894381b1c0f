"""YAML merge recipes: the pydantic model that is the single source of truth for a merge.

Example recipe::

    model_type: encoder
    method: mix_models
    models:
      - path: ./bge-base-finetuned
        weight: 0.6
      - path: BAAI/bge-base-en-v1.5
        weight: 0.4
    output:
      path: ./merged
      save_format: bin
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MergeHooksError
from .units import parse_size

ModelType = Literal["encoder", "reranker", "decoder"]
Method = Literal["mix_models", "mix_models_with_data", "mix_models_by_layers"]
Engine = Literal["auto", "stream", "cocktail"]
DType = Literal["keep", "float32", "float16", "bfloat16"]

WEIGHT_SUM_TOLERANCE = 1e-6
DEFAULT_MAX_SHARD_SIZE = "5GB"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelEntry(_Strict):
    """One input model: a local folder or a hub id found in the local Hugging Face cache.

    ``adapter``: a peft LoRA adapter folder (or a list, merged in order) to merge into the model first;
    ``allow_base_mismatch``: only warn when the adapter records a different base model.
    """

    path: str = Field(min_length=1)
    weight: Optional[float] = None
    adapter: Optional[Union[str, list[str]]] = None
    # None rather than False, so that recipes without adapters are written back without the key.
    allow_base_mismatch: Optional[bool] = None

    @field_validator("adapter")
    @classmethod
    def _adapter_paths(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        if value is not None and (value == [] or any(not a for a in ([value] if isinstance(value, str) else value))):
            raise ValueError("adapter must be a folder or a non-empty list of folders")
        return value

    @property
    def adapters(self) -> list[str]:
        """The adapter folders, in the order they are merged."""
        if self.adapter is None:
            return []
        return [self.adapter] if isinstance(self.adapter, str) else list(self.adapter)

    @field_validator("weight")
    @classmethod
    def _weight_is_a_share(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and (math.isnan(value) or value < 0):
            raise ValueError(f"weight must be >= 0, got {value}")
        return value


class OutputOptions(_Strict):
    """Where and how the merged model is written."""

    path: Optional[Path] = None
    #: One format name, several as a list or a comma-separated string (``safetensors,gguf``).
    save_format: Union[str, list[str]] = "safetensors"
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE
    dtype: DType = "keep"

    @field_validator("save_format")
    @classmethod
    def _known_formats(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        from .formats import format_names

        try:
            format_names(value)
        except MergeHooksError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(value, str) and "," in value:
            value = [name.strip() for name in value.split(",")]
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        return value

    @property
    def formats(self) -> list[str]:
        """The format names to write, aliases (``both``) expanded, in order."""
        from .formats import format_names

        return format_names(self.save_format)

    @field_validator("max_shard_size")
    @classmethod
    def _valid_size(cls, value: Union[int, str]) -> Union[int, str]:
        parse_size(value)
        return value

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


class Recipe(_Strict):
    """A whole merge: which models, how, and where the result goes."""

    model_type: ModelType
    method: Method = "mix_models"
    engine: Engine = "auto"
    models: list[ModelEntry]
    examples: Optional[Path] = None
    temperature: float = Field(5.0, gt=0)
    batch_size: int = Field(2, ge=1)
    max_input_length: int = Field(2048, ge=1)
    neg_number: int = Field(7, ge=0)
    output: OutputOptions = Field(default_factory=OutputOptions)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        adapted = any(m.adapter is not None for m in self.models)
        if len(self.models) < 2 and not (len(self.models) == 1 and adapted):
            raise ValueError(
                f"a merge needs at least two models, got {len(self.models)} (one model is allowed with an adapter)"
            )
        if adapted and self.engine == "cocktail":
            raise ValueError("adapters are merged by the stream engine; use engine auto or stream")
        if adapted and self.method == "mix_models_with_data":
            raise ValueError("adapters are not supported with mix_models_with_data; merge the adapter first")
        weights = [m.weight for m in self.models]
        if self.method == "mix_models_with_data":
            if self.model_type == "reranker":
                raise ValueError("mix_models_with_data supports model_type encoder or decoder, not reranker")
            if self.examples is None:
                raise ValueError("mix_models_with_data needs 'examples': a JSON lines file of examples")
            if any(w is not None for w in weights):
                raise ValueError("mix_models_with_data computes the weights from the examples; remove 'weight' from models")
        else:
            if self.examples is not None:
                raise ValueError(f"'examples' is only used by mix_models_with_data, not {self.method}")
            missing = [i for i, w in enumerate(weights) if w is None]
            if missing:
                raise ValueError(f"models.{missing[0]}.weight is missing: {self.method} needs a weight for every model")
            total = sum(weights)
            if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
                raise ValueError(f"weights must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}), they sum to {total:.9g}")
        return self

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.models]  # type: ignore[misc]

    @property
    def model_paths(self) -> list[str]:
        return [m.path for m in self.models]

    def to_yaml(self) -> str:
        """The recipe as YAML, as written beside the merged model."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def model_entry_from_arg(spec: str) -> dict[str, Any]:
    """A model entry from a command-line model: ``BASE`` or ``BASE+ADAPTER[+ADAPTER...]`` (mergekit's convention).

    Example:
        >>> model_entry_from_arg("./base+./lora-out")
        {'path': './base', 'adapter': './lora-out'}
    """
    from .adapters import split_model_spec

    base, adapters = split_model_spec(spec)
    if not adapters:
        return {"path": base}
    return {"path": base, "adapter": adapters[0] if len(adapters) == 1 else adapters}


def describe_validation_error(error: ValidationError, source: str) -> str:
    """pydantic's errors as one readable line: ``source: key: problem; ...``."""
    problems = []
    for err in error.errors():
        where = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{where}'")
            continue
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return f"{source}: " + "; ".join(problems)


def recipe_from_dict(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict, turning pydantic's errors into one readable line."""
    if not isinstance(data, dict):
        raise MergeHooksError(f"{source}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise MergeHooksError(describe_validation_error(error, source)) from None


def load_recipe(path: Union[str, Path], *, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """Read and validate a YAML recipe (with ``yaml.safe_load``).

    ``overrides`` are dotted keys applied before validation, e.g. ``{"output.save_format": "bin"}``,
    which is how CLI flags take precedence over the file.

    Example:
        >>> recipe = load_recipe("configs/encoder-mix_models.yaml", overrides={"output.save_format": "bin"})
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeHooksError(f"recipe {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeHooksError(f"cannot read recipe {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise MergeHooksError(f"{path}: YAML syntax error at{where}: {problem}") from None
    if data is None:
        raise MergeHooksError(f"{path}: the recipe is empty")
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or {})
    return recipe_from_dict(data, source=str(path))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``output.save_format``) in a copy of ``data``; ``None`` values are skipped."""
    data = dict(data)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return data

"""merge-hooks: merge FlagEmbedding models with LM_Cocktail and write them the way your loader needs.

Importing the package is cheap: torch, transformers and LM_Cocktail load only when a merge runs.

Example:
    >>> import merge_hooks
    >>> merge_hooks.mix_models(["bge-ft", "bge-base"], "encoder", [0.5, 0.5], "merged", save_format="bin")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import MergeHooksError

__version__ = "0.1.0"

_LAZY = {
    "mix_models": "api",
    "mix_models_with_data": "api",
    "mix_models_by_layers": "api",
    "save": "api",
    "run_recipe": "pipeline",
    "MergeResult": "pipeline",
    "load_recipe": "recipe",
    "Recipe": "recipe",
}

__all__ = ["MergeHooksError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

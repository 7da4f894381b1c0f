"""The streaming engine: LM_Cocktail's weighted sum, one tensor at a time, straight from the checkpoint files.

Memory stays near three copies of the largest tensor (the running sum, the tensor being read and
its weighted copy), whatever the number and size of the models. Nothing here imports transformers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from ..preflight import InputModel
from ..tensors import TensorSource, TensorSpec
from . import EngineResult, accumulate

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def stream_merge(models: list[InputModel], weights: list[float], *, dtype: Optional["torch.dtype"]) -> EngineResult:
    """Plan the merged tensors of ``models`` with ``weights``; each is computed when the writer asks for it.

    Tensor names, order and (with ``dtype=None``) dtypes follow the first model's checkpoint.

    Example:
        >>> result = stream_merge(load_inputs(["a", "b"], trust_remote_code=False), [0.5, 0.5], dtype=None)
        >>> merged = result.source.get("embeddings.word_embeddings.weight")
    """
    first = models[0].checkpoint
    out_dtypes = {
        name: dtype if (dtype is not None and spec.dtype.is_floating_point) else spec.dtype
        for name, spec in first.specs.items()
    }
    specs = [TensorSpec(name, out_dtypes[name], spec.shape) for name, spec in first.specs.items()]

    def get(name: str):
        acc = None
        for weight, model in zip(weights, models):
            acc = accumulate(acc, weight, model.checkpoint.get(model.tensor_name(name)))
        return acc.to(out_dtypes[name])

    def close() -> None:
        for model in models:
            model.checkpoint.close()

    return EngineResult(
        source=TensorSource(specs=specs, get=get),
        weights=list(weights),
        dtype=dtype or first.dtype,
        engine="stream",
        close=close,
    )

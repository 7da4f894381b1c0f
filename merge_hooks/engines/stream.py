"""The streaming engine: LM_Cocktail's weighted sum, one tensor at a time, straight from the checkpoint files.

Memory stays near three copies of the largest tensor (counted in float32), whatever the number and size
of the models. Nothing here imports transformers.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Optional

from ..preflight import InputModel
from ..tensors import TensorSource, TensorSpec
from . import EngineResult, written_dtype

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class _Buffers:
    """Work buffers reused from one tensor to the next.

    A fresh large tensor is mapped afresh by the allocator and each of its pages faults in zeroed;
    with N reads and N products per output tensor, that page faulting dominated the merge. Reads and
    products go into these buffers instead; only the sum handed to the writer is a new tensor.
    """

    def __init__(self) -> None:
        self._raw: dict[str, "torch.Tensor"] = {}

    def get(self, slot: str, dtype: "torch.dtype", shape: tuple[int, ...]) -> "torch.Tensor":
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        raw = self._raw.get(slot)
        if raw is None or raw.numel() < nbytes:
            self._raw[slot] = raw = torch.empty(nbytes, dtype=torch.uint8)
        return raw[:nbytes].view(dtype).view(shape)


def _is_half(dtype: "torch.dtype") -> bool:
    import torch

    return dtype in (torch.float16, torch.bfloat16)


def stream_merge(models: list[InputModel], weights: list[float], *, dtype: Optional["torch.dtype"]) -> EngineResult:
    """Plan the merged tensors of ``models`` with ``weights``; each is computed when the writer asks for it.

    The arithmetic is LM_Cocktail's ``merge_param`` in its order (``w1*p1``, then ``+= w2*p2``, ...; in-place
    products give the same bits), so fp32 results are bit-identical to LM_Cocktail's. Half-precision inputs
    are summed in float32. Integer tensors are the last model's, as in LM_Cocktail. Tensor names, order
    and (with ``dtype=None``) dtypes follow the first model's checkpoint.

    Example:
        >>> result = stream_merge(load_inputs(["a", "b"], trust_remote_code=False), [0.5, 0.5], dtype=None)
        >>> merged = result.source.get("embeddings.word_embeddings.weight")
    """
    import torch

    first = models[0].checkpoint
    out_dtypes = {name: written_dtype(spec.dtype, dtype) for name, spec in first.specs.items()}
    specs = [TensorSpec(name, out_dtypes[name], spec.shape) for name, spec in first.specs.items()]
    buffers = _Buffers()

    def read(model: InputModel, name: str, slot: Optional[str]) -> "torch.Tensor":
        """The model's tensor as float32 (or its own wider dtype), in a reused buffer unless ``slot`` is None."""
        checkpoint, source_name = model.checkpoint, model.tensor_name(name)
        spec = checkpoint.specs[source_name]
        if _is_half(spec.dtype):
            raw = checkpoint.get(source_name, out=buffers.get("half", spec.dtype, spec.shape))
            wide = torch.empty(spec.shape) if slot is None else buffers.get(slot, torch.float32, spec.shape)
            return wide.copy_(raw)
        return checkpoint.get(source_name, out=None if slot is None else buffers.get(slot, spec.dtype, spec.shape))

    def get(name: str) -> "torch.Tensor":
        acc = None
        for weight, model in zip(weights, models):
            if not model.checkpoint.specs[model.tensor_name(name)].dtype.is_floating_point:
                acc = model.checkpoint.get(model.tensor_name(name))
            elif acc is None:
                acc = read(model, name, None).mul_(weight)
            else:
                acc.add_(read(model, name, "term").mul_(weight))
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

"""The streaming engine: LM_Cocktail's weighted sum, one tensor at a time, straight from the checkpoint files.

Memory stays near three copies of the largest tensor (counted in float32), whatever the number and size
of the models. Nothing here imports transformers. The arithmetic runs on torch tensors, or on numpy
arrays when every input is safetensors in float32, float16 or bfloat16 and the output format takes
arrays: the result is the same bits, and the merge skips importing torch (about a second).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from .. import dtypes
from ..dtypes import DType
from ..preflight import InputModel
from ..tensors import TensorSource, TensorSpec
from . import EngineResult, written_dtype

logger = logging.getLogger(__name__)

# The dtypes the numpy arithmetic handles (float64 and float8 inputs take the torch path).
ARRAY_DTYPES = (dtypes.float32, dtypes.float16, dtypes.bfloat16)


class _Buffers:
    """Work buffers reused from one tensor to the next.

    A fresh large tensor is mapped afresh by the allocator and each of its pages faults in zeroed;
    with N reads and N products per output tensor, that page faulting dominated the merge. Reads and
    products go into these buffers instead; only the sum handed to the writer is a new tensor.
    """

    def __init__(self, math_: "_TorchMath | _NumpyMath") -> None:
        self._math = math_
        self._raw: dict[str, Any] = {}

    def get(self, slot: str, dtype: DType, shape: tuple[int, ...]) -> Any:
        nbytes = math.prod(shape) * dtype.itemsize
        raw = self._raw.get(slot)
        if raw is None or raw.shape[0] < nbytes:
            self._raw[slot] = raw = self._math.empty_bytes(nbytes)
        return self._math.view(raw[:nbytes], dtype, shape)


class _TorchMath:
    """The engine's few operations on torch tensors (every input format, every dtype)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def empty_bytes(self, nbytes: int):
        return self.torch.empty(nbytes, dtype=self.torch.uint8)

    def view(self, raw, dtype: DType, shape: tuple[int, ...]):
        return raw.view(dtype.torch).view(shape)

    def empty(self, dtype: DType, shape: tuple[int, ...]):
        return self.torch.empty(shape, dtype=dtype.torch)

    def read(self, model: InputModel, name: str, out=None):
        return model.checkpoint.get(name, out=out)

    def widen(self, half, wide, half_dtype: DType):
        return wide.copy_(half)

    def scale(self, tensor, weight: float):
        return tensor.mul_(weight)

    def add(self, acc, term):
        return acc.add_(term)

    def cast(self, acc, dtype: DType, buffers: _Buffers):
        return acc.to(dtype.torch)


class _NumpyMath:
    """The same operations on numpy arrays, with the bits torch would produce.

    float32 products and sums are single IEEE operations in both (the Python weight is rounded to
    float32 first in both, as torch does for a float32 tensor and numpy does under NEP 50); widening
    half precision is exact; float16 rounding is IEEE round-to-nearest-even in both. numpy has no
    bfloat16, so bfloat16 tensors travel as their uint16 bits and are widened and rounded (to nearest,
    ties to even, as torch does) here. Only NaN payloads can differ from torch's.
    """

    def __init__(self) -> None:
        import numpy as np

        self.np = np

    def empty_bytes(self, nbytes: int):
        return self.np.empty(nbytes, dtype=self.np.uint8)

    def view(self, raw, dtype: DType, shape: tuple[int, ...]):
        return raw.view(dtype.storage).reshape(shape)

    def empty(self, dtype: DType, shape: tuple[int, ...]):
        return self.np.empty(shape, dtype=dtype.storage)

    def read(self, model: InputModel, name: str, out=None):
        return model.checkpoint.get_array(name, out=out)

    def widen(self, half, wide, half_dtype: DType):
        np = self.np
        if half_dtype is dtypes.bfloat16:
            # A bfloat16 is the top half of the float32 with the same value.
            bits = wide.view(np.uint32)
            np.copyto(bits, half)
            np.left_shift(bits, 16, out=bits)
        else:
            np.copyto(wide, half)
        return wide

    def scale(self, array, weight: float):
        return self.np.multiply(array, weight, out=array)

    def add(self, acc, term):
        return self.np.add(acc, term, out=acc)

    def cast(self, acc, dtype: DType, buffers: _Buffers):
        np = self.np
        if acc.dtype == dtype.storage:
            return acc
        if dtype is not dtypes.bfloat16:
            with np.errstate(over="ignore"):  # values past float16's range become inf, as in torch
                return acc.astype(dtype.storage)
        # Round to nearest, ties to even, on the float32 bits: add 0x7FFF plus the lowest kept bit, keep the top half.
        bits = acc.view(np.uint32)
        rounded = buffers.get("term", dtypes.BY_NAME["uint32"], acc.shape)
        np.right_shift(bits, 16, out=rounded)
        np.bitwise_and(rounded, 1, out=rounded)
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        out = rounded.astype(np.uint16)
        if np.isnan(np.max(acc, initial=0.0)):  # max propagates NaN without a mask the size of the tensor
            out[np.isnan(acc)] = 0x7FC0
        return out


def uses_arrays(models: list[InputModel], dtype: Optional[DType]) -> bool:
    """Whether the numpy arithmetic can merge ``models``: safetensors only, in float32, float16 or bfloat16."""
    if dtype is not None and dtype not in ARRAY_DTYPES:
        return False
    for model in models:
        if model.checkpoint.format != "safetensors":
            return False
        if any(s.dtype.is_floating_point and s.dtype not in ARRAY_DTYPES for s in model.checkpoint.specs.values()):
            return False
    return True


def stream_merge(
    models: list[InputModel], weights: list[float], *, dtype: Optional[DType], arrays: bool = False
) -> EngineResult:
    """Plan the merged tensors of ``models`` with ``weights``; each is computed when the writer asks for it.

    The arithmetic is LM_Cocktail's ``merge_param`` in its order (``w1*p1``, then ``+= w2*p2``, ...; in-place
    products give the same bits), so fp32 results are bit-identical to LM_Cocktail's. Half-precision inputs
    are summed in float32. Integer tensors are the last model's, as in LM_Cocktail. Tensor names, order
    and (with ``dtype=None``) dtypes follow the first model's checkpoint.

    With ``arrays=True`` the source may produce numpy arrays (see :func:`uses_arrays`) instead of torch
    tensors; only pass it for an output format that takes arrays.

    Example:
        >>> result = stream_merge(load_inputs(["a", "b"], trust_remote_code=False), [0.5, 0.5], dtype=None)
        >>> merged = result.source.get("embeddings.word_embeddings.weight")
    """
    # Python floats: a numpy float64 weight would make numpy multiply float32 tensors in float64.
    weights = [float(w) for w in weights]
    first = models[0].checkpoint
    out_dtypes = {name: written_dtype(spec.dtype, dtype) for name, spec in first.specs.items()}
    specs = [TensorSpec(name, out_dtypes[name], spec.shape) for name, spec in first.specs.items()]
    ops = _NumpyMath() if arrays and uses_arrays(models, dtype) else _TorchMath()
    buffers = _Buffers(ops)
    logger.debug("stream engine arithmetic on %s", "numpy arrays" if isinstance(ops, _NumpyMath) else "torch tensors")

    def read(model: InputModel, name: str, slot: Optional[str]) -> Any:
        """The model's tensor as float32 (or its own wider dtype), in a reused buffer unless ``slot`` is None."""
        spec = model.checkpoint.specs[name]
        if spec.dtype in dtypes.HALF:
            half = ops.read(model, name, buffers.get("half", spec.dtype, spec.shape))
            wide = ops.empty(dtypes.float32, spec.shape) if slot is None else buffers.get(slot, dtypes.float32, spec.shape)
            return ops.widen(half, wide, spec.dtype)
        return ops.read(model, name, None if slot is None else buffers.get(slot, spec.dtype, spec.shape))

    def get(name: str) -> Any:
        acc = None
        for weight, model in zip(weights, models):
            source_name = model.tensor_name(name)
            if not model.checkpoint.specs[source_name].dtype.is_floating_point:
                acc = ops.read(model, source_name)
            elif acc is None:
                acc = ops.scale(read(model, source_name, None), weight)
            else:
                acc = ops.add(acc, ops.scale(read(model, source_name, "term"), weight))
        return ops.cast(acc, out_dtypes[name], buffers)

    def close() -> None:
        for model in models:
            model.checkpoint.close()

    return EngineResult(
        source=TensorSource(specs=specs, get=get),
        weights=weights,
        dtype=dtype or first.dtype,
        engine="stream",
        close=close,
    )

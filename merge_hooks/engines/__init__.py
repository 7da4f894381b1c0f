"""Merge engines: each turns resolved input models into a :class:`~merge_hooks.tensors.TensorSource`.

- ``stream`` (:mod:`.stream`): reads the checkpoints tensor by tensor; memory follows the largest tensor.
- ``cocktail`` (:mod:`.cocktail`): calls LM_Cocktail's own functions and takes the model they return.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from .. import dtypes
from ..dtypes import DType

if TYPE_CHECKING:
    import torch

    from ..tensors import TensorSource


@dataclass
class EngineResult:
    """A merged model ready for the output stage (``model`` is the in-memory model where an engine has one)."""

    source: "TensorSource"
    weights: list[float]
    dtype: Optional[DType]
    engine: str
    architectures: Optional[list[str]] = None
    model: Any = None
    close: Callable[[], None] = field(default=lambda: None)


def output_dtype(option: str, first_checkpoint_dtype: Optional[DType]) -> Optional[DType]:
    """``keep`` means the first model's checkpoint dtype, whatever transformers would load it as."""
    if option == "keep":
        return first_checkpoint_dtype
    return dtypes.of(option)


def written_dtype(stored: Any, target: Any) -> DType:
    """The dtype a tensor stored as ``stored`` is written in: ``target`` for floating tensors, else unchanged.

    Either may be a :class:`~merge_hooks.dtypes.DType`, a torch dtype or a name; ``target`` may be None.
    """
    stored = dtypes.of(stored)
    return dtypes.of(target) if (target is not None and stored.is_floating_point) else stored


def accumulate(acc: Optional["torch.Tensor"], weight: float, tensor: "torch.Tensor") -> "torch.Tensor":
    """One step of LM_Cocktail's ``merge_param``: ``w1*p1``, then ``+= w2*p2``, in that order.

    Integer tensors are not averaged: the last model's is kept, as LM_Cocktail does. Half-precision
    tensors are summed in float32 (the caller casts the result back).
    """
    import torch

    if not tensor.dtype.is_floating_point:
        return tensor
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    if acc is None:
        return weight * tensor
    acc += weight * tensor
    return acc


@contextlib.contextmanager
def collecting_garbage() -> Iterator[None]:
    """Cyclic garbage collection on, for code that builds large object graphs (transformers models).

    The command line turns collection off for its short run; LM_Cocktail and model loading need it.
    Objects alive before the block are frozen out of it: LM_Cocktail's ``mix_models_by_layers`` calls
    ``gc.collect()`` once per tensor per model, and each collect then stays cheap (minutes -> seconds).
    """
    was_enabled = gc.isenabled()
    gc.enable()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if not was_enabled:
            gc.disable()

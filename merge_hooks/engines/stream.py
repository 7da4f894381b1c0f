"""The streaming engine: LM_Cocktail's weighted sum, one block of rows at a time, straight from the checkpoint files.

Each tensor is merged in blocks of rows (:data:`~merge_hooks.tensors.BLOCK_BYTES` of float32 work each,
``MERGE_HOOKS_BLOCK_SIZE`` to change it), so memory stays near a few blocks whatever the size of the
models and of their largest tensor; the arithmetic is elementwise, so blocks give the same bits. A
thread reads the next block's inputs while the current one is merged. Nothing here imports
transformers. The arithmetic runs on torch tensors, or on numpy arrays when every input is
safetensors in float32, float16 or bfloat16 and the output format takes arrays: the result is the
same bits, and the merge skips importing torch (about a second).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from typing import Any, Callable, Optional

from .. import dtypes
from ..dtypes import DType
from ..errors import MergeHooksError
from ..preflight import InputModel
from ..tensors import BLOCK_BYTES, RowRange, TensorSource, TensorSpec, row_ranges
from ..units import parse_size
from . import EngineResult, written_dtype

logger = logging.getLogger(__name__)

# The dtypes the numpy arithmetic handles (float64 and float8 inputs take the torch path).
ARRAY_DTYPES = (dtypes.float32, dtypes.float16, dtypes.bfloat16)
# Overrides the block size (bytes of float32 work per block, e.g. "4MiB").
BLOCK_SIZE_ENV = "MERGE_HOOKS_BLOCK_SIZE"


def block_bytes() -> int:
    """The row block size: ``MERGE_HOOKS_BLOCK_SIZE`` when set, else :data:`~merge_hooks.tensors.BLOCK_BYTES`."""
    value = os.environ.get(BLOCK_SIZE_ENV)
    if not value:
        return BLOCK_BYTES
    try:
        return parse_size(value)
    except ValueError as exc:
        raise MergeHooksError(f"{BLOCK_SIZE_ENV}={value!r}: {exc}") from None


class _Buffers:
    """Work buffers reused from one block to the next.

    A fresh large tensor is mapped afresh by the allocator and each of its pages faults in zeroed;
    with N reads and N products per output tensor, that page faulting dominated the merge. Reads and
    products go into these buffers instead; only the sum handed to the writer is a new block.
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

    def read(self, model: InputModel, name: str, out=None, rows: RowRange = None):
        return model.checkpoint.get(name, out=out, rows=rows)

    def scale_into(self, tensor, weight: float, out):
        return self.torch.mul(tensor, weight, out=out)

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

    def read(self, model: InputModel, name: str, out=None, rows: RowRange = None):
        return model.checkpoint.get_array(name, out=out, rows=rows)

    def scale_into(self, array, weight: float, out):
        return self.np.multiply(array, weight, out=out)

    def widen(self, half, wide, half_dtype: DType):
        np = self.np
        if half_dtype is dtypes.bfloat16:
            # A bfloat16 is the top half of the float32 with the same value; one pass, widening as it shifts.
            np.left_shift(half, 16, out=wide.view(np.uint32), dtype=np.uint32)
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
        # Shifted straight into the uint16 result: one pass less than shifting in place, then narrowing.
        out = np.right_shift(rounded, 16, out=np.empty(acc.shape, np.uint16), casting="unsafe")
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


class _ReadAhead:
    """Reads the inputs of the next block in a thread while the current block is merged.

    ``pread``, torch's copies and numpy's arithmetic release the GIL, so on two cores the reading of
    block k+1 overlaps the merging (and writing) of block k. Two sets of read buffers alternate: the
    thread fills one while the merge uses the other, so memory stays at two blocks of inputs. Blocks
    are read in ``plan`` order; a request outside the plan (a whole tensor for a writer that does not
    take blocks) or behind the thread stops it and is read here.
    """

    def __init__(self, plan: list[tuple[str, RowRange]], read: Callable[[tuple[str, RowRange], Any], list],
                 make_buffers: Callable[[], _Buffers]) -> None:
        self._plan = plan
        self._position = {key: i for i, key in enumerate(plan)}
        self._read = read
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(2):
            self._free.put(make_buffers())
        self._make_buffers = make_buffers
        self._spare: Optional[_Buffers] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()

    def take(self, key: tuple[str, RowRange]) -> tuple[list, Optional[_Buffers]]:
        """The inputs of block ``key`` and the buffer set holding them (hand it back with :meth:`release`)."""
        index = self._position.get(key)
        if index is None:
            self.stop()
            if self._spare is None:
                self._spare = self._make_buffers()
            return self._read(key, self._spare), None
        while True:
            if self._thread is None:
                self._start(index)
            item = self._ready.get()
            if isinstance(item, BaseException):
                self.stop()
                raise item
            got, inputs, buffers = item
            if got == index:
                return inputs, buffers
            self._free.put(buffers)
            if got > index:
                self.stop()

    def release(self, buffers: Optional[_Buffers]) -> None:
        if buffers is not None:
            self._free.put(buffers)

    def _start(self, index: int) -> None:
        self._stopping = threading.Event()
        self._ready = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(index, self._stopping, self._ready), name="merge-hooks-read", daemon=True
        )
        self._thread.start()

    def _run(self, index: int, stopping: threading.Event, ready: queue.SimpleQueue) -> None:
        for i in range(index, len(self._plan)):
            buffers = self._free.get()
            if stopping.is_set():
                self._free.put(buffers)
                return
            try:
                inputs = self._read(self._plan[i], buffers)
            except BaseException as exc:
                self._free.put(buffers)
                ready.put(exc)
                return
            ready.put((i, inputs, buffers))

    def stop(self) -> None:
        """Stop the thread and take back the buffer sets it filled."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        while thread.is_alive() or not self._ready.empty():
            try:
                item = self._ready.get(timeout=0.01)
            except queue.Empty:
                continue
            if not isinstance(item, BaseException):
                self._free.put(item[2])
        thread.join()


def stream_merge(
    models: list[InputModel], weights: list[float], *, dtype: Optional[DType], arrays: bool = False
) -> EngineResult:
    """Plan the merged tensors of ``models`` with ``weights``; each block is computed when the writer asks for it.

    The arithmetic is LM_Cocktail's ``merge_param`` in its order (``w1*p1``, then ``+= w2*p2``, ...; in-place
    products give the same bits), so fp32 results are bit-identical to LM_Cocktail's. Half-precision inputs
    are summed in float32. Integer tensors are the last model's, as in LM_Cocktail. Tensor names, order
    and (with ``dtype=None``) dtypes follow the first model's checkpoint. The source produces row blocks
    (``rows``) as well as whole tensors (``get``); both have the same bits.

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
    work = _Buffers(ops)  # the merge's own: widened terms and rounding, reused from block to block
    budget = block_bytes()
    logger.debug("stream engine arithmetic on %s, blocks of %d bytes",
                 "numpy arrays" if isinstance(ops, _NumpyMath) else "torch tensors", budget)

    def shape_of(spec: TensorSpec, rows: RowRange) -> tuple[int, ...]:
        return spec.shape if rows is None else (rows[1] - rows[0], *spec.shape[1:])

    def read(key: tuple[str, RowRange], buffers: _Buffers) -> list:
        """Every model's rows of the block, floating ones in ``buffers`` (runs in the read-ahead thread)."""
        name, rows = key
        inputs = []
        for i, model in enumerate(models):
            source_name = model.tensor_name(name)
            spec = model.checkpoint.specs[source_name]
            out = buffers.get(f"input{i}", spec.dtype, shape_of(spec, rows)) if spec.dtype.is_floating_point else None
            inputs.append(ops.read(model, source_name, out, rows))
        return inputs

    def merge(name: str, rows: RowRange, inputs: list) -> Any:
        acc = None
        for weight, model, value in zip(weights, models, inputs):
            spec = model.checkpoint.specs[model.tensor_name(name)]
            shape = shape_of(spec, rows)
            if not spec.dtype.is_floating_point:
                acc = value
            elif acc is None:
                # A running sum already in the output dtype is handed on (to writers that may keep it a while),
                # so it is a new block; otherwise the cast makes the new block and the sum lives in a reused
                # buffer (a fresh one per block would fault its pages in anew each time).
                wide = dtypes.float32 if spec.dtype in dtypes.HALF else spec.dtype
                into = ops.empty(wide, shape) if out_dtypes[name] is wide else work.get("sum", wide, shape)
                if spec.dtype in dtypes.HALF:
                    acc = ops.scale(ops.widen(value, into, spec.dtype), weight)
                else:
                    acc = ops.scale_into(value, weight, into)
            else:
                if spec.dtype in dtypes.HALF:
                    value = ops.widen(value, work.get("term", dtypes.float32, shape), spec.dtype)
                acc = ops.add(acc, ops.scale(value, weight))
        return ops.cast(acc, out_dtypes[name], work)

    plan = [(spec.name, rows) for spec in specs for rows in row_ranges(spec, budget)]
    ahead = _ReadAhead(plan, read, lambda: _Buffers(ops))

    def block(name: str, rows: RowRange) -> Any:
        inputs, buffers = ahead.take((name, rows))
        try:
            return merge(name, rows, inputs)
        finally:
            ahead.release(buffers)

    def close() -> None:
        ahead.stop()
        for model in models:
            model.checkpoint.close()

    return EngineResult(
        source=TensorSource(
            specs=specs,
            get=lambda name: block(name, None),
            rows=lambda name, start, stop: block(name, (start, stop)),
            block_bytes=budget,
        ),
        weights=weights,
        dtype=dtype or first.dtype,
        engine="stream",
        close=close,
    )

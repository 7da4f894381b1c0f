"""The streaming engine: LM_Cocktail's weighted sum, one block of rows at a time, straight from the checkpoint files.

Each tensor is merged in blocks of rows (:data:`~merge_hooks.tensors.BLOCK_BYTES` of float32 work each,
``MERGE_HOOKS_BLOCK_SIZE`` to change it), so memory stays near a few blocks whatever the size of the
models and of their largest tensor; the arithmetic is elementwise, so blocks give the same bits.
Worker threads read and merge the next blocks while the writer writes the current one. Nothing here imports
transformers. The arithmetic runs on torch tensors, or on numpy arrays when every input is
safetensors in float32, float16 or bfloat16 and the output format takes arrays: the result is the
same bits, and the merge skips importing torch (about a second).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
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
# Elements of a block the numpy arithmetic reads and works on at a time (see :meth:`_NumpyMath.read_and_merge`):
# 1 MiB of float32, which keeps a piece's inputs, sum and scratch in the cache. Pieces of 64Ki elements kept them
# in a core's L2 and were the fastest for one worker, but two workers hand the GIL to each other at every numpy
# call, and each hand-off wakes a thread: with 256Ki elements a piece makes a quarter of the calls. Two workers
# with 256Ki-element pieces against one with 64Ki (stack A, two cores, best of 5 interleaved runs of the CLI):
# bfloat16 0.8B decoder x2 1.50 -> 1.28 s, x3 1.95 -> 1.73 s, two 128256 x 4096 bfloat16 pairs 2.30 -> 1.76 s,
# BERT-base x3 0.48 -> 0.45 s (there the disk is the bound).
PIECE = 2**18
# Threads that read and merge blocks ahead of the writer on the numpy path (at most one per core).
NUMPY_WORKERS = 2
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


class _BlockPool:
    """Merged blocks (numpy arrays) recycled once nothing refers to them any more.

    Each merged block is handed to a writer, which writes it, hashes it and drops it. A new array per
    block was mapped afresh by the allocator and faulted its pages in anew (a 0.8B bf16 merge faulted
    230 MB of pages in and lost 0.5 s to it); a pooled array is handed out again only when the pool's
    own reference is the last one, so no writer, hashing thread or view still holds it. Thread-safe.
    """

    #: Arrays kept; when all are in use, a block gets a new array that is not kept.
    LIMIT = 8

    def __init__(self, capacity: int) -> None:
        import numpy as np

        self._np = np
        self._capacity = capacity
        self._arrays: list = []
        self._lock = threading.Lock()
        # What getrefcount says of an array only the pool holds, found out rather than assumed (interpreters
        # differ in the references they count); where one more holder does not show, nothing is reused.
        probe = [np.empty(0)]
        self._unused: Optional[int] = self._references(probe, 0)
        held = probe[0]
        if self._references(probe, 0) != self._unused + 1:
            self._unused = None
        del held

    @staticmethod
    def _references(arrays: list, i: int) -> int:
        return sys.getrefcount(arrays[i])

    def empty(self, dtype: DType, shape: tuple[int, ...]):
        """An uninitialised array of ``dtype``'s storage and ``shape``, for a block nothing else uses."""
        nbytes = math.prod(shape) * dtype.itemsize
        raw = None
        if nbytes <= self._capacity:
            with self._lock:
                raw = next((self._arrays[i] for i in range(len(self._arrays))
                            if self._references(self._arrays, i) == self._unused), None)
                if raw is None and len(self._arrays) < self.LIMIT:
                    raw = self._np.empty(self._capacity, self._np.uint8)
                    self._arrays.append(raw)
        if raw is None:
            raw = self._np.empty(nbytes, self._np.uint8)
        return raw[:nbytes].view(dtype.storage).reshape(shape)


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
    """The same arithmetic on numpy arrays, with the bits torch would produce; :meth:`read_and_merge`
    applies it to a block piece by piece, reading the pieces from safetensors files.

    float32 products and sums are single IEEE operations in both (the Python weight is rounded to
    float32 first in both, as torch does for a float32 tensor and numpy does under NEP 50); widening
    half precision is exact; float16 rounding is IEEE round-to-nearest-even in both. numpy has no
    bfloat16, so bfloat16 tensors travel as their uint16 bits and are widened and rounded (to nearest,
    ties to even, as torch does) here. Only NaN payloads can differ from torch's.
    """

    def __init__(self, blocks: Optional[_BlockPool] = None) -> None:
        import numpy as np

        self.np = np
        self.blocks = blocks or _BlockPool(BLOCK_BYTES)

    def empty_bytes(self, nbytes: int):
        return self.np.empty(nbytes, dtype=self.np.uint8)

    def view(self, raw, dtype: DType, shape: tuple[int, ...]):
        return raw.view(dtype.storage).reshape(shape)

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
        if acc.dtype == dtype.storage:
            return acc
        out = self.np.empty(acc.shape, dtype.storage)
        with self.np.errstate(over="ignore"):  # values past float16's range become inf, as in torch
            self.cast_into(acc, out, dtype, buffers.get("round", dtypes.BY_NAME["uint32"], acc.shape))
        return out

    def cast_into(self, acc, out, dtype: DType, work) -> None:
        """Round the float32 ``acc`` into ``out``, an array of ``dtype``'s storage of the same shape; ``work`` is
        uint32 scratch of that shape (used for bfloat16)."""
        np = self.np
        if dtype is not dtypes.bfloat16:
            np.copyto(out, acc, casting="unsafe")
            return
        dtypes.round_to_bfloat16(acc.view(np.uint32), work, out)
        if np.isnan(np.max(acc, initial=0.0)):  # max propagates NaN without a mask the size of the tensor
            out[np.isnan(acc)] = 0x7FC0

    def read_and_merge(self, readers: list[Callable[[int, memoryview], None]], kinds: list[DType],
                       weights: list[float], dtype: DType, shape: tuple[int, ...], buffers: _Buffers):
        """``sum(w * x)`` of one block in LM_Cocktail's order, rounded once to ``dtype``: a new array of ``shape``.

        ``readers[i](offset, view)`` reads model i's elements of the block from ``offset`` into the bytes of
        ``view`` (see :meth:`~merge_hooks.io.safetensors_io.SafetensorsReader.element_reader`). The block is
        worked through in pieces of :data:`PIECE` elements: each piece is read from the page cache into
        small buffers and goes through every step (widen, scale, add, round) while it is in the core's
        cache, where reading the whole block and then making one pass per step would stream it through
        memory again and again. Each element sees the same operations in the same order, so the bits are
        those of :meth:`cast` after :meth:`scale` and :meth:`add` over whole tensors. The loop is the
        merge's hot path (one turn per 256Ki elements): everything it can be given ready-made is made
        before it.
        """
        np = self.np
        out = self.blocks.empty(dtype, shape)
        flat_out = out.reshape(-1)
        size = flat_out.size
        if not kinds[-1].is_floating_point:
            readers[-1](0, memoryview(flat_out.view(np.uint8)))  # integer tensors are the last model's, as in LM_Cocktail
            return out
        step = max(1, min(PIECE, size))
        direct = dtype is dtypes.float32  # the sum is built in the output itself
        sums = None if direct else buffers.get("sum", dtypes.float32, (step,))
        terms = buffers.get("term", dtypes.float32, (step,))
        work = None if direct else buffers.get("round", dtypes.BY_NAME["uint32"], (step,))
        halves = {kind: buffers.get(f"read-{kind.name}", kind, (step,)) for kind in kinds if kind in dtypes.HALF}
        models = list(zip(readers, weights, kinds))
        widen, cast_into, multiply, add, uint8 = self.widen, self.cast_into, np.multiply, np.add, np.uint8
        n = 0
        # Infinities and NaN flow through silently, as in torch.
        with np.errstate(over="ignore", invalid="ignore"):
            for offset in range(0, size, step):
                if n != min(step, size - offset):  # the first piece, and a shorter last one: views of that size
                    n = min(step, size - offset)
                    term = terms[:n]
                    acc = sums[:n] if not direct else None
                    round_work = work[:n] if not direct else None
                    pieces = {kind: half[:n] for kind, half in halves.items()}
                    views = {kind: memoryview(piece.view(np.uint8)) for kind, piece in pieces.items()}
                if direct:
                    acc = flat_out[offset:offset + n]
                for i, (read, weight, kind) in enumerate(models):
                    into = term if i else acc
                    if kind in views:
                        read(offset, views[kind])
                        widen(pieces[kind], into, kind)
                    else:  # float32, read straight where it is scaled
                        read(offset, memoryview(into.view(uint8)))
                    multiply(into, weight, out=into)
                    if i:
                        add(acc, term, out=acc)
                if not direct:
                    cast_into(acc, flat_out[offset:offset + n], dtype, round_work)
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


class _Ahead:
    """Produces the blocks of ``plan`` ahead of the writer, in worker threads.

    While the writer writes block k, up to ``workers`` threads read and merge the next blocks (``pread``,
    numpy's arithmetic and torch's kernels release the GIL, so both cores work). Each block in progress
    has its own set of work buffers, and at most ``workers + 1`` finished blocks wait for the writer,
    so memory stays at a few blocks. Blocks are produced in ``plan`` order; a request outside the plan
    (a whole tensor for a writer that does not take blocks) is produced in the caller's thread, and a
    request that skips ahead drops the blocks in between.
    """

    def __init__(self, plan: list[tuple[str, RowRange]], produce: Callable[[tuple[str, RowRange], _Buffers], Any],
                 make_buffers: Callable[[], _Buffers], workers: int) -> None:
        self._plan = plan
        self._position = {key: i for i, key in enumerate(plan)}
        self._produce = produce
        self._make_buffers = make_buffers
        self._workers = workers
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(workers):
            self._free.put(make_buffers())
        self._spare: Optional[_Buffers] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[int, Future] = {}
        self._next = 0  # the next plan index to hand to a worker

    def take(self, key: tuple[str, RowRange]) -> Any:
        """Block ``key``, merged."""
        index = self._position.get(key)
        if index is None:
            if self._spare is None:
                self._spare = self._make_buffers()
            return self._produce(key, self._spare)
        if index not in self._pending:
            self._drop()
            self._next = index
        self._submit_up_to(index + self._workers)
        try:
            return self._pending.pop(index).result()
        except BaseException:
            self._drop()
            raise

    def _submit_up_to(self, last: int) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="merge-hooks-merge")
        while self._next <= min(last, len(self._plan) - 1):
            self._pending[self._next] = self._pool.submit(self._run, self._plan[self._next])
            self._next += 1

    def _run(self, key: tuple[str, RowRange]) -> Any:
        buffers = self._free.get()
        try:
            return self._produce(key, buffers)
        finally:
            self._free.put(buffers)

    def _drop(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def stop(self) -> None:
        """Drop the blocks not taken and wait for the workers."""
        self._drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


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
    budget = block_bytes()
    ops = _NumpyMath(_BlockPool(budget)) if arrays and uses_arrays(models, dtype) else _TorchMath()
    logger.debug("stream engine arithmetic on %s, blocks of %d bytes",
                 "numpy arrays" if isinstance(ops, _NumpyMath) else "torch tensors", budget)

    def shape_of(spec: TensorSpec, rows: RowRange) -> tuple[int, ...]:
        return spec.shape if rows is None else (rows[1] - rows[0], *spec.shape[1:])

    def read(key: tuple[str, RowRange], buffers: _Buffers) -> list:
        """Every model's rows of the block, floating ones in ``buffers``."""
        name, rows = key
        inputs = []
        for i, model in enumerate(models):
            source_name = model.tensor_name(name)
            spec = model.checkpoint.specs[source_name]
            out = buffers.get(f"input{i}", spec.dtype, shape_of(spec, rows)) if spec.dtype.is_floating_point else None
            inputs.append(ops.read(model, source_name, out, rows))
        return inputs

    def merge(key: tuple[str, RowRange], work: _Buffers) -> Any:
        """The merged block ``key``: read into ``work``'s buffers, then summed on torch tensors."""
        name, rows = key
        inputs = read(key, work)
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

    def read_and_merge(key: tuple[str, RowRange], work: _Buffers) -> Any:
        """The merged block ``key``, read piece by piece from the files into ``work`` and summed on numpy arrays."""
        name, rows = key
        spec = specs_by_name[name]
        row_size = math.prod(spec.shape[1:])
        shape = shape_of(spec, rows)
        start, count = (rows[0] * row_size if rows else 0), math.prod(shape)
        readers = [model.checkpoint.element_reader(model.tensor_name(name), start, count) for model in models]
        kinds = [model.checkpoint.specs[model.tensor_name(name)].dtype for model in models]
        return ops.read_and_merge(readers, kinds, weights, out_dtypes[name], shape, work)

    specs_by_name = {spec.name: spec for spec in specs}
    plan = [(spec.name, rows) for spec in specs for rows in row_ranges(spec, budget)]
    # Two numpy workers read and merge the next blocks while the writer writes (and hashes) this one: one
    # worker was the bound of every bfloat16 merge (see PIECE). The torch path keeps one: torch's kernels use
    # every core themselves.
    numpy_path = isinstance(ops, _NumpyMath)
    workers = min(NUMPY_WORKERS, os.cpu_count() or 1) if numpy_path else 1
    ahead = _Ahead(plan, read_and_merge if numpy_path else merge, lambda: _Buffers(ops), workers=workers)

    def block(name: str, rows: RowRange) -> Any:
        return ahead.take((name, rows))

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

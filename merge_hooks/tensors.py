"""What the output stage consumes: an ordered plan of tensors and a way to produce each one.

A :class:`TensorSource` lets a writer learn every name, dtype and shape before any tensor
exists, so files can be planned (shards, headers) and then filled one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence

from . import dtypes
from .dtypes import DType

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one output tensor, known before its data.

    ``dtype`` may be given as a :class:`~merge_hooks.dtypes.DType`, a torch dtype or a dtype name;
    it is always held as a ``DType``.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.of(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# Bytes of float32 work per row block (see :meth:`TensorSource.blocks`): large enough that per-block
# Python overhead vanishes, small enough that a merge's buffers stay far below 160 MB.
BLOCK_BYTES = 8 * 2**20

RowRange = Optional[tuple[int, int]]


def row_ranges(spec: TensorSpec, block_bytes: int = BLOCK_BYTES) -> list[RowRange]:
    """The row blocks a tensor is produced in: ``(start, stop)`` ranges of its first dimension.

    Each block holds at most ``block_bytes`` counted in float32 (the dtype the merge computes in),
    and at least two rows (or all of them). A tensor without dimensions is one block, ``None``.

    Example:
        >>> row_ranges(TensorSpec("w", "bfloat16", (10, 2**20)), 8 * 2**20)
        [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    """
    if not spec.shape:
        return [None]
    rows = spec.shape[0]
    row_bytes = 4 * math.prod(spec.shape[1:])
    # Never a block of one row out of several: a matrix product with one row takes another kernel (a
    # matrix-vector product) that rounds differently, and LoRA deltas computed per block must have the
    # bits of the whole product.
    step = max(2, block_bytes // row_bytes) if row_bytes else max(rows, 1)
    ranges = [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] == 1:
        ranges[-2:] = [(ranges[-2][0], rows)]
    return ranges


@dataclass
class TensorSource:
    """An ordered list of tensor specs plus ``get(name)`` that produces the tensor on demand.

    ``get`` returns a CPU tensor of exactly the spec's dtype and shape, or a C-contiguous numpy array
    of its shape in the dtype's ``storage`` (bfloat16 as uint16 bits); only formats that say they
    take arrays get the latter. Writers call it once per
    tensor, in spec order. Every tensor or block a source returns is memory of its own that the source
    never touches again: a writer (or a :func:`tee`) may keep one while it asks for the next, and a
    thread may hash or convert it later.

    A source may also produce row blocks: ``rows(name, start, stop)`` returns rows ``start:stop`` of
    the tensor, in the same form, each computed without the whole tensor in memory. Writers that
    stream call :meth:`blocks`, which falls back to one whole tensor from ``get`` for sources without
    ``rows``; writers that need whole tensors keep calling ``get``.
    """

    specs: Sequence[TensorSpec]
    get: Callable[[str], Any]
    rows: Optional[Callable[[str, int, int], Any]] = None
    block_bytes: int = BLOCK_BYTES

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def block_ranges(self, spec: TensorSpec) -> list[RowRange]:
        """The blocks :meth:`blocks` yields for ``spec``: row ranges, or ``[None]`` for the whole tensor."""
        return row_ranges(spec, self.block_bytes) if self.rows is not None else [None]

    def blocks(self, spec: TensorSpec) -> Iterator[tuple[RowRange, Any]]:
        """``(row_range, block)`` for the tensor of ``spec``, in row order; the range is None for a whole tensor.

        Example:
            >>> for rows, block in source.blocks(spec):
            ...     f.write(tensor_bytes(block))
        """
        for rows in self.block_ranges(spec):
            yield rows, self.get(spec.name) if rows is None else self.rows(spec.name, *rows)

    def subset(self, names: Sequence[str]) -> "TensorSource":
        by_name = {s.name: s for s in self.specs}
        return TensorSource(specs=[by_name[n] for n in names], get=self.get, rows=self.rows,
                            block_bytes=self.block_bytes)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, "torch.Tensor"]) -> "TensorSource":
        """Wrap tensors already in memory (contiguous CPU copies are made per tensor on ``get``)."""
        specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()]
        return cls(specs=specs, get=lambda name: state_dict[name].detach().cpu().contiguous())


class TeeAborted(RuntimeError):
    """Raised in the other branches of a :func:`tee` once one branch has failed."""


# How many bytes of merged blocks a tee may hold for writers that have not taken them yet. A writer
# that runs further ahead waits; the slowest never does, so all of them finish.
TEE_BUDGET = 2 * BLOCK_BYTES


class _Tee:
    """The shared state of the branches of :func:`tee`.

    The source's blocks (whole tensors for a source without ``rows``) are numbered in spec order. A
    block is computed once, by the first branch that asks for it, and kept until every branch has
    taken it or moved past it (writers ask in spec order and may skip names).
    """

    _PENDING = object()

    def __init__(self, source: TensorSource, count: int, budget: int) -> None:
        import threading

        self.source = source
        self.items: list[tuple[TensorSpec, RowRange]] = [
            (spec, rows) for spec in source.specs for rows in source.block_ranges(spec)
        ]
        self.index = {(spec.name, rows): i for i, (spec, rows) in enumerate(self.items)}
        self.of_tensor: dict[str, list[int]] = {}
        for i, (spec, _) in enumerate(self.items):
            self.of_tensor.setdefault(spec.name, []).append(i)
        self.budget = budget
        self.cond = threading.Condition()
        self.compute = threading.Lock()  # engines reuse work buffers: one block at a time
        self.position = [-1] * count
        self.active = set(range(count))
        self.cache: dict[int, Any] = {}
        self.taken: dict[int, set[int]] = {}
        self.failed = False

    def _size(self, item: int) -> int:
        spec, rows = self.items[item]
        return spec.nbytes if rows is None else spec.nbytes // max(spec.shape[0], 1) * (rows[1] - rows[0])

    def _needed(self, item: int) -> bool:
        return any(c not in self.taken[item] and self.position[c] <= item for c in self.active)

    def _evict(self) -> None:
        for item in [i for i, v in self.cache.items() if v is not self._PENDING and not self._needed(i)]:
            del self.cache[item]
            del self.taken[item]

    def _cached_bytes(self) -> int:
        return sum(self._size(i) for i in self.cache)

    def _someone_behind(self, consumer: int) -> bool:
        mine = self.position[consumer]
        return any(self.position[c] < mine for c in self.active if c != consumer)

    def get(self, consumer: int, item: int) -> Any:
        with self.cond:
            self.position[consumer] = item
            self._evict()
            self.cond.notify_all()
            while True:
                if self.failed:
                    raise TeeAborted("another writer failed")
                value = self.cache.get(item)
                if value is not None and value is not self._PENDING:
                    self.taken[item].add(consumer)
                    self._evict()
                    self.cond.notify_all()
                    return value
                if value is None:
                    room = self._cached_bytes() + self._size(item) <= self.budget or not self.cache
                    if room or not self._someone_behind(consumer):
                        break
                self.cond.wait()
            self.cache[item] = self._PENDING
            self.taken[item] = set()
        try:
            with self.compute:
                spec, rows = self.items[item]
                value = self.source.get(spec.name) if rows is None else self.source.rows(spec.name, *rows)
        except BaseException:
            self.abort()
            raise
        with self.cond:
            self.cache[item] = value
            self.taken[item].add(consumer)
            self._evict()
            self.cond.notify_all()
        return value

    def whole(self, consumer: int, name: str) -> Any:
        """A whole tensor for a writer that does not take blocks: its blocks, joined."""
        parts = [self.get(consumer, item) for item in self.of_tensor[name]]
        if len(parts) == 1 and self.items[self.of_tensor[name][0]][1] is None:
            return parts[0]
        return _concatenate(parts)

    def close(self, consumer: int) -> None:
        with self.cond:
            self.active.discard(consumer)
            self._evict()
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.failed = True
            self.cache.clear()
            self.taken.clear()
            self.cond.notify_all()


def _concatenate(parts: list[Any]) -> Any:
    import numpy as np

    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


@dataclass
class TeeBranch(TensorSource):
    """One branch of a :func:`tee`: a tensor source for one writer, with ``close`` and ``abort``."""

    close: Callable[[], None] = lambda: None
    abort: Callable[[], None] = lambda: None


def tee(source: TensorSource, count: int, *, budget: int = TEE_BUDGET) -> list[TeeBranch]:
    """Split ``source`` into ``count`` sources that share one computation of each block.

    Each branch is read by its own writer thread, in spec order (names may be skipped), through
    ``blocks`` or ``get`` (a whole tensor, joined from its blocks). Up to ``budget`` bytes of blocks
    wait for slower writers; past that, a writer that is ahead waits. A writer that finishes or fails
    calls ``close()`` (and ``abort()`` on failure, which makes the others raise :class:`TeeAborted`).
    Writers must not modify the blocks they get: all share them.

    Example:
        >>> safetensors_branch, gguf_branch = tee(result.source, 2)
    """
    shared = _Tee(source, count, budget)
    return [
        TeeBranch(
            specs=source.specs,
            get=lambda name, c=c: shared.whole(c, name),
            rows=None if source.rows is None else (
                lambda name, start, stop, c=c: shared.get(c, shared.index[(name, (start, stop))])
            ),
            block_bytes=source.block_bytes,
            close=lambda c=c: shared.close(c),
            abort=shared.abort,
        )
        for c in range(count)
    ]

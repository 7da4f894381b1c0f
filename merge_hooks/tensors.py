"""What the output stage consumes: an ordered plan of tensors and a way to produce each one.

A :class:`TensorSource` lets a writer learn every name, dtype and shape before any tensor
exists, so files can be planned (shards, headers) and then filled one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

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


@dataclass
class TensorSource:
    """An ordered list of tensor specs plus ``get(name)`` that produces the tensor on demand.

    ``get`` returns a CPU tensor of exactly the spec's dtype and shape, or a C-contiguous numpy array
    of its shape in the dtype's ``storage`` (bfloat16 as uint16 bits); only formats that say they
    take arrays get the latter. Writers call it once per
    tensor, in spec order, and drop the result before asking for the next one.
    """

    specs: Sequence[TensorSpec]
    get: Callable[[str], Any]

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def subset(self, names: Sequence[str]) -> "TensorSource":
        by_name = {s.name: s for s in self.specs}
        return TensorSource(specs=[by_name[n] for n in names], get=self.get)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, "torch.Tensor"]) -> "TensorSource":
        """Wrap tensors already in memory (contiguous CPU copies are made per tensor on ``get``)."""
        specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()]
        return cls(specs=specs, get=lambda name: state_dict[name].detach().cpu().contiguous())


class TeeAborted(RuntimeError):
    """Raised in the other branches of a :func:`tee` once one branch has failed."""


# How many bytes of merged tensors a tee may hold for writers that have not taken them yet. A writer
# that runs further ahead waits; the slowest never does, so all of them finish.
TEE_BUDGET = 256 * 2**20


class _Tee:
    """The shared state of the branches of :func:`tee`.

    A tensor is computed once, by the first branch that asks for it, and kept until every branch has
    taken it or moved past it (writers ask in spec order and may skip names).
    """

    _PENDING = object()

    def __init__(self, source: TensorSource, count: int, budget: int) -> None:
        import threading

        self.source = source
        self.index = {spec.name: i for i, spec in enumerate(source.specs)}
        self.size = {spec.name: spec.nbytes for spec in source.specs}
        self.budget = budget
        self.cond = threading.Condition()
        self.compute = threading.Lock()  # engines reuse work buffers: one tensor at a time
        self.position = [-1] * count
        self.active = set(range(count))
        self.cache: dict[str, Any] = {}
        self.taken: dict[str, set[int]] = {}
        self.failed = False

    def _needed(self, name: str) -> bool:
        i = self.index[name]
        return any(c not in self.taken[name] and self.position[c] <= i for c in self.active)

    def _evict(self) -> None:
        for name in [n for n, v in self.cache.items() if v is not self._PENDING and not self._needed(n)]:
            del self.cache[name]
            del self.taken[name]

    def _cached_bytes(self) -> int:
        return sum(self.size[n] for n in self.cache)

    def _someone_behind(self, consumer: int) -> bool:
        mine = self.position[consumer]
        return any(self.position[c] < mine for c in self.active if c != consumer)

    def get(self, consumer: int, name: str) -> Any:
        with self.cond:
            self.position[consumer] = self.index[name]
            self._evict()
            self.cond.notify_all()
            while True:
                if self.failed:
                    raise TeeAborted("another writer failed")
                value = self.cache.get(name)
                if value is not None and value is not self._PENDING:
                    self.taken[name].add(consumer)
                    self._evict()
                    self.cond.notify_all()
                    return value
                if value is None:
                    room = self._cached_bytes() + self.size[name] <= self.budget or not self.cache
                    if room or not self._someone_behind(consumer):
                        break
                self.cond.wait()
            self.cache[name] = self._PENDING
            self.taken[name] = set()
        try:
            with self.compute:
                value = self.source.get(name)
        except BaseException:
            self.abort()
            raise
        with self.cond:
            self.cache[name] = value
            self.taken[name].add(consumer)
            self._evict()
            self.cond.notify_all()
        return value

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


@dataclass
class TeeBranch(TensorSource):
    """One branch of a :func:`tee`: a tensor source for one writer, with ``close`` and ``abort``."""

    close: Callable[[], None] = lambda: None
    abort: Callable[[], None] = lambda: None


def tee(source: TensorSource, count: int, *, budget: int = TEE_BUDGET) -> list[TeeBranch]:
    """Split ``source`` into ``count`` sources that share one computation of each tensor.

    Each branch is read by its own writer thread, in spec order (names may be skipped). Up to
    ``budget`` bytes of tensors wait for slower writers; past that, a writer that is ahead waits.
    A writer that finishes or fails calls ``close()`` (and ``abort()`` on failure, which makes the
    others raise :class:`TeeAborted`). Writers must not modify the tensors they get: all share them.

    Example:
        >>> safetensors_branch, gguf_branch = tee(result.source, 2)
    """
    shared = _Tee(source, count, budget)
    return [
        TeeBranch(
            specs=source.specs,
            get=lambda name, c=c: shared.get(c, name),
            close=lambda c=c: shared.close(c),
            abort=shared.abort,
        )
        for c in range(count)
    ]

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

"""Tensor dtypes known without importing torch.

Planning a merge (names, dtypes, shapes, file headers) and the safetensors-only fast path need
dtypes, but not torch, whose import costs about a second. A :class:`DType` names the torch dtype
(``.torch`` imports torch on first use), its safetensors code and how numpy holds its bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import numpy
    import torch


@dataclass(frozen=True)
class DType:
    """One tensor dtype.

    Args:
        name: the torch attribute name (``float32``, ``bfloat16``); also what config.json records.
        code: the safetensors dtype code (``F32``, ``BF16``).
        itemsize: bytes per element.
        is_floating_point: as ``torch.dtype.is_floating_point`` (False for integers, bool and complex).
        numpy_name: the numpy dtype of the same name, or None where numpy has none (bfloat16, float8);
            numpy arrays then carry the raw bits in an unsigned integer type of the same size.
    """

    name: str
    code: str
    itemsize: int
    is_floating_point: bool
    numpy_name: Optional[str]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name})"

    @property
    def torch(self) -> "torch.dtype":
        """The torch dtype (imports torch)."""
        import torch

        try:
            return getattr(torch, self.name)
        except AttributeError:
            raise ValueError(f"dtype {self.name} is not available in torch {torch.__version__}") from None

    @cached_property
    def storage(self) -> "numpy.dtype":
        """The numpy dtype arrays of this dtype are held in: the same dtype, or an unsigned int of its size."""
        import numpy as np

        return np.dtype(self.numpy_name or f"uint{8 * self.itemsize}")


_TABLE = (
    # name, safetensors code, itemsize, floating, numpy name
    ("float64", "F64", 8, True, "float64"),
    ("float32", "F32", 4, True, "float32"),
    ("float16", "F16", 2, True, "float16"),
    ("bfloat16", "BF16", 2, True, None),
    ("int64", "I64", 8, False, "int64"),
    ("int32", "I32", 4, False, "int32"),
    ("int16", "I16", 2, False, "int16"),
    ("int8", "I8", 1, False, "int8"),
    ("uint8", "U8", 1, False, "uint8"),
    ("bool", "BOOL", 1, False, "bool"),
    ("complex64", "C64", 8, False, "complex64"),
    ("uint64", "U64", 8, False, "uint64"),
    ("uint32", "U32", 4, False, "uint32"),
    ("uint16", "U16", 2, False, "uint16"),
    ("float8_e4m3fn", "F8_E4M3", 1, True, None),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ", 1, True, None),
    ("float8_e5m2", "F8_E5M2", 1, True, None),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ", 1, True, None),
)
BY_NAME: dict[str, DType] = {row[0]: DType(*row) for row in _TABLE}
BY_CODE: dict[str, DType] = {dtype.code: dtype for dtype in BY_NAME.values()}

float64, float32, float16, bfloat16 = (BY_NAME[n] for n in ("float64", "float32", "float16", "bfloat16"))
HALF = (float16, bfloat16)


def of(value: Any) -> DType:
    """The :class:`DType` of a DType, a dtype name (``"float16"``, ``"torch.float16"``) or a torch dtype.

    Raises:
        ValueError: no dtype of that name.

    Example:
        >>> of(torch.bfloat16) is of("bfloat16") is bfloat16
        True
    """
    if isinstance(value, DType):
        return value
    # str(torch.float16) is "torch.float16"; torch is never imported to find out.
    name = str(value).removeprefix("torch.")
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}") from None

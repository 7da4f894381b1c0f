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
        storage_class: the typed storage class ``torch.save`` pickles for this dtype (``FloatStorage``), or None
            for the dtypes it saves as untyped storage plus the dtype (unsigned ints past uint8, float8).
    """

    name: str
    code: str
    itemsize: int
    is_floating_point: bool
    numpy_name: Optional[str]
    storage_class: Optional[str]

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
    # name, safetensors code, itemsize, floating, numpy name, torch.save storage class
    ("float64", "F64", 8, True, "float64", "DoubleStorage"),
    ("float32", "F32", 4, True, "float32", "FloatStorage"),
    ("float16", "F16", 2, True, "float16", "HalfStorage"),
    ("bfloat16", "BF16", 2, True, None, "BFloat16Storage"),
    ("int64", "I64", 8, False, "int64", "LongStorage"),
    ("int32", "I32", 4, False, "int32", "IntStorage"),
    ("int16", "I16", 2, False, "int16", "ShortStorage"),
    ("int8", "I8", 1, False, "int8", "CharStorage"),
    ("uint8", "U8", 1, False, "uint8", "ByteStorage"),
    ("bool", "BOOL", 1, False, "bool", "BoolStorage"),
    ("complex64", "C64", 8, False, "complex64", "ComplexFloatStorage"),
    ("uint64", "U64", 8, False, "uint64", None),
    ("uint32", "U32", 4, False, "uint32", None),
    ("uint16", "U16", 2, False, "uint16", None),
    ("float8_e4m3fn", "F8_E4M3", 1, True, None, None),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ", 1, True, None, None),
    ("float8_e5m2", "F8_E5M2", 1, True, None, None),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ", 1, True, None, None),
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


def round_to_bfloat16(bits: "numpy.ndarray", work: "numpy.ndarray", out: "numpy.ndarray") -> None:
    """Round float32 values, given as their uint32 ``bits``, to bfloat16 (nearest, ties to even) into ``out``.

    ``work`` is a uint32 scratch array of the same size and ``out`` a 16-bit one. The bit arithmetic
    (add 0x7FFF plus the lowest kept bit, keep the top half) is what torch and gguf-py do for every
    value but NaN, whose result here is arbitrary: callers write NaNs as their reference does.
    """
    import numpy as np

    np.right_shift(bits, 16, out=work)
    np.bitwise_and(work, 1, out=work)
    np.add(work, 0x7FFF, out=work)
    np.add(work, bits, out=work)
    np.right_shift(work, 16, out=out, casting="unsafe")

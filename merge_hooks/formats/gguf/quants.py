"""The bytes of each GGUF tensor type, converted from row blocks a cache-sized chunk at a time.

gguf-py's ``gguf.quants.quantize`` (what llama.cpp's converter runs) widens a whole tensor to float32
and converts it in many numpy passes, each streaming the tensor through memory once; numpy's own
float32 -> float16 cast runs one element at a time. Here every conversion works on
:data:`CHUNK` elements with scratch arrays that are allocated once, so all its passes stay in the
CPU's L2 cache, and each pass is a vectorised integer or float operation. The bytes are the same:

- F16 from bfloat16: every bfloat16 in float16's normal range is a float16 (8 significant bits fit in
  11), so its bits are moved, not rounded; zeros, subnormals and values out of range go through numpy's cast.
- F16 from float32: float32 -> float16 rounding to nearest even on the bits (ggml's and numpy's rule);
  values outside float16's normal range go through numpy's cast.
- BF16: gguf-py's ``BF16.quantize_blocks`` (ggml's ``ggml_compute_fp32_to_bf16``) on each chunk.
- Q8_0: ggml's ``quantize_row_q8_0_ref`` (``d = amax / 127``, ``q = roundf(x / d)``), as gguf-py's
  ``Q8_0.quantize_blocks``, with the block maximum taken on the bits and ``roundf`` as ``trunc(|v| + c)``
  for ``c`` the float32 just below 0.5 (equal to ``roundf`` for every float32 of magnitude below 256,
  checked one by one). Chunks with a block whose maximum is not finite, or whose scale is subnormal, go
  through gguf-py.

``tests/test_gguf.py`` compares every conversion with gguf-py's (and so with llama.cpp's converter) on
every bfloat16 and float16 value and on float32 values around each rounding boundary; F16 and BF16 from
float32 were also compared on all 2**32 float32 values once (too slow for the tests).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ...dtypes import round_to_bfloat16

#: Elements converted per step: a handful of scratch arrays of this many float32 (256 KiB each) stay in L2.
CHUNK = 64 * 1024
#: Steps whose output is collected before it is handed to the file (one write per ~1M elements).
CHUNKS_PER_PIECE = 16

Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 34
# roundf(v) == trunc(|v| + HALF_DOWN) with v's sign, for |v| < 256 (q8_0 values stay within 127).
HALF_DOWN = np.float32(0.5) - np.float32(2.0**-25)

_SMALLEST_NORMAL = np.float32(2.0**-126)
_SMALLEST_AMAX_BITS = int((_SMALLEST_NORMAL * np.float32(127)).view(np.uint32))  # 127 * 2**-126, exact
_INFINITY_BITS = 0x7F800000

_BYTES_PER_ELEMENT = {"F32": 4, "F16": 2, "BF16": 2}
# Stored dtype -> the GGUF type whose bytes are the same: such arrays are written as they come.
SAME_BYTES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def encoded_size(elements: int, qtype: str) -> int:
    """Bytes of ``elements`` values in GGUF type ``qtype`` (whole Q8_0 blocks)."""
    if qtype == "Q8_0":
        return elements // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
    return elements * _BYTES_PER_ELEMENT[qtype]


class Encoder:
    """Turns arrays stored as ``stored`` (a dtype name; bfloat16 as uint16 bits) into ``qtype`` bytes.

    Scratch and output arrays are reused from one call to the next: write each piece :meth:`pieces`
    yields before asking for the next one. The input is never modified.

    Example:
        >>> encoder = Encoder("bfloat16", "Q8_0")
        >>> for piece in encoder.pieces(block):
        ...     f.write(piece)
    """

    def __init__(self, stored: str, qtype: str) -> None:
        if qtype not in ("F32", "F16", "BF16", "Q8_0"):
            raise ValueError(f"no conversion to {qtype}")
        self.stored = stored
        self.qtype = qtype
        self._scratch: dict[str, np.ndarray] = {}
        self._block_starts = np.arange(0, CHUNK, Q8_0_BLOCK)
        bf16 = stored == "bfloat16"
        self._step: Callable[[np.ndarray, np.ndarray], None] = {
            "F32": self._to_f32,
            "F16": self._f16_from_bf16 if bf16 else self._to_f16,
            "BF16": self._to_bf16,
            "Q8_0": self._q8_0_from_bf16 if bf16 else self._to_q8_0,
        }[qtype]

    def pieces(self, array: np.ndarray) -> Iterator[np.ndarray]:
        """The ``qtype`` bytes of ``array`` (C-contiguous), in order, as arrays to write.

        Arrays already in ``qtype``'s bytes (see :data:`SAME_BYTES`) are converted all the same (as
        gguf-py would, which makes NaNs quiet): the writer writes those blocks as they are when nothing
        else changed them.
        """
        flat = array.reshape(-1)
        if self.qtype == "Q8_0" and flat.size % Q8_0_BLOCK:
            raise ValueError(f"{flat.size} values do not fill {Q8_0_BLOCK}-wide Q8_0 blocks")
        piece = CHUNK * CHUNKS_PER_PIECE
        out = self._buffer("out", np.uint8, encoded_size(min(piece, flat.size), self.qtype))
        for start in range(0, flat.size, piece):
            part = flat[start:start + piece]
            filled = 0
            for offset in range(0, part.size, CHUNK):
                chunk = part[offset:offset + CHUNK]
                size = encoded_size(chunk.size, self.qtype)
                self._step(chunk, out[filled:filled + size])
                filled += size
            yield out[:filled]

    def _buffer(self, name: str, dtype, size: int = CHUNK) -> np.ndarray:
        buffer = self._scratch.get(name)
        if buffer is None or buffer.size < size:
            self._scratch[name] = buffer = np.empty(size, dtype)
        return buffer[:size]

    # --- float32 bits of any stored dtype ---------------------------------------------------------------

    def _float32_bits(self, chunk: np.ndarray, into: np.ndarray | None = None) -> np.ndarray:
        """The chunk as float32 bits (uint32): a view for float32, else converted into ``into`` or scratch."""
        if self.stored == "float32" and into is None:
            return chunk.view(np.uint32)
        bits = self._buffer("bits", np.uint32, chunk.size) if into is None else into
        if self.stored == "float32":
            np.copyto(bits, chunk.view(np.uint32))
        elif self.stored == "bfloat16":
            np.copyto(bits, chunk)  # a bfloat16 is the top half of its float32
            np.left_shift(bits, 16, out=bits)
        elif self.stored == "float16":
            self._widen_f16(chunk, bits)
        else:
            np.copyto(bits.view(np.float32), chunk, casting="unsafe")  # what astype(float32) gives
        return bits

    def _widen_f16(self, chunk: np.ndarray, bits: np.ndarray) -> None:
        """float16 -> float32 bits; exact, so only the bits move (sign, exponent + 112, mantissa)."""
        wide = bits.view(np.int32)
        np.copyto(wide, chunk.view(np.int16))  # sign-extended: a negative value sets bits 16-31
        np.left_shift(wide, 13, out=wide)
        np.bitwise_and(wide, np.int32(-0x70000001), out=wide)  # 0x8FFFFFFF: the sign stays at bit 31
        np.add(wide, 0x38000000, out=wide)
        # Zeros, subnormals, infinities and NaNs (exponent 0 or 31): numpy's own cast.
        test = self._buffer("test16", np.uint16, chunk.size)
        halves = chunk.view(np.uint16)
        np.left_shift(halves, 1, out=test)
        np.subtract(test, 0x0800, out=test)
        special = np.flatnonzero(np.greater_equal(test, 0xF000, out=self._buffer("mask", np.bool_, chunk.size)))
        if special.size:
            bits[special] = chunk[special].astype(np.float32).view(np.uint32)

    # --- one step per GGUF type ---------------------------------------------------------------------------

    def _to_f32(self, chunk: np.ndarray, out: np.ndarray) -> None:
        self._float32_bits(chunk, into=out.view(np.uint32))

    def _f16_from_bf16(self, chunk: np.ndarray, out: np.ndarray) -> None:
        half = out.view(np.uint16)
        sign = self._buffer("test16", np.uint16, chunk.size)
        # Exponent - 112 and mantissa in place: (bits << 3) - (112 << 10) modulo 2**16, then the sign.
        np.left_shift(chunk, 3, out=half)
        np.subtract(half, 0xC000, out=half)
        np.bitwise_and(chunk, 0x8000, out=sign)
        np.bitwise_or(half, sign, out=half)
        # Outside float16's normal range [2**-14, 2**16): magnitude*2 - 0x7100 wraps past 0x1E00.
        test = sign
        np.left_shift(chunk, 1, out=test)
        np.subtract(test, 0x7100, out=test)
        special = np.flatnonzero(np.greater_equal(test, 0x1E00, out=self._buffer("mask", np.bool_, chunk.size)))
        if special.size:
            wide = chunk[special].astype(np.uint32) << 16
            half[special] = wide.view(np.float32).astype(np.float16).view(np.uint16)

    def _to_f16(self, chunk: np.ndarray, out: np.ndarray) -> None:
        bits = self._float32_bits(chunk)
        half = out.view(np.uint16)
        work = self._buffer("work", np.uint32, chunk.size)
        # Round to nearest even at bit 13 (add 0xFFF plus the lowest kept bit) while rebasing the exponent
        # (-112 << 23, modulo 2**32), and carry the sign from bit 31 to bit 28 (bit 15 once shifted): the
        # arithmetic shift copies the sign into bits 18-31, so one mask keeps it at 28 and the kept bit at 0.
        np.right_shift(bits.view(np.int32), 13, out=work.view(np.int32))
        np.bitwise_and(work, 0x10000001, out=work)
        np.add(work, bits, out=work)
        np.add(work, 0xC8000FFF, out=work)
        np.right_shift(work, 13, out=half, casting="unsafe")
        # Outside [2**-14, 2**16) (zeros, subnormals, overflow, infinities, NaNs): numpy's own cast.
        np.left_shift(bits, 1, out=work)
        np.subtract(work, 0x71000000, out=work)
        special = np.flatnonzero(np.greater_equal(work, 0x1E000000, out=self._buffer("mask", np.bool_, chunk.size)))
        if special.size:
            half[special] = bits[special].view(np.float32).astype(np.float16).view(np.uint16)

    def _to_bf16(self, chunk: np.ndarray, out: np.ndarray) -> None:
        bits = self._float32_bits(chunk)
        half = out.view(np.uint16)
        work = self._buffer("work", np.uint32, chunk.size)
        round_to_bfloat16(bits, work, half)
        # NaNs become quiet NaNs with their top bits, as gguf-py does.
        np.left_shift(bits, 1, out=work)
        nans = np.flatnonzero(np.greater(work, 0xFF000000, out=self._buffer("mask", np.bool_, chunk.size)))
        if nans.size:
            half[nans] = (bits[nans] >> 16).astype(np.uint16) | 0x0040

    def _to_q8_0(self, chunk: np.ndarray, out: np.ndarray) -> None:
        bits = self._float32_bits(chunk)
        magnitude = self._buffer("magnitude", np.uint32, chunk.size)
        np.bitwise_and(bits, 0x7FFFFFFF, out=magnitude)
        # The largest |x| of each block, compared as bits (the same order as the values, NaN above all).
        amax = np.maximum.reduceat(magnitude, self._block_starts[:chunk.size // Q8_0_BLOCK])
        self._q8_0(bits, magnitude, amax, out)

    def _q8_0_from_bf16(self, chunk: np.ndarray, out: np.ndarray) -> None:
        # The block maximum on the 16-bit magnitudes: a tree of maxima of neighbours 16, 8, 4, 2 and 1 apart,
        # on the whole chunk at once (position 0 of each block ends up holding its block's maximum).
        top = self._buffer("tree_a", np.uint16, chunk.size)
        other = self._buffer("tree_b", np.uint16, chunk.size)
        np.bitwise_and(chunk, 0x7FFF, out=top)
        for distance in (16, 8, 4, 2, 1):
            np.maximum(top[:-distance], top[distance:], out=other[:-distance])
            top, other = other, top
        amax = top[::Q8_0_BLOCK].astype(np.uint32) << 16
        bits = self._float32_bits(chunk)
        magnitude = self._buffer("magnitude", np.uint32, chunk.size)
        np.bitwise_and(bits, 0x7FFFFFFF, out=magnitude)
        self._q8_0(bits, magnitude, amax, out)

    def _q8_0(self, bits: np.ndarray, magnitude: np.ndarray, amax: np.ndarray, out: np.ndarray) -> None:
        """Q8_0 blocks into ``out`` from the float32 ``bits``, their ``magnitude`` bits (overwritten) and the
        bits of each block's largest magnitude, ``amax``."""
        blocks = amax.size
        # Every block is 0 or has a normal float32 scale (amax >= 127 * 2**-126) and no infinity or NaN;
        # else gguf-py's own arithmetic, for this chunk.
        if amax.max() >= _INFINITY_BITS or (amax - np.uint32(1)).min() < _SMALLEST_AMAX_BITS - 1:
            import gguf

            values = bits.view(np.float32).reshape(blocks, Q8_0_BLOCK)
            out[:] = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
            return
        d = amax.view(np.float32) / np.float32(127)
        # gguf-py's 1 / d, with 0 for d == 0; any finite inverse does there, as those blocks hold only zeros.
        inverse = np.float32(1) / np.maximum(d, _SMALLEST_NORMAL)
        scaled = magnitude.view(np.float32)
        spread = self._buffer("spread", np.float32, bits.size).reshape(blocks, Q8_0_BLOCK)
        np.copyto(spread, inverse[:, None])
        np.multiply(scaled, spread.reshape(-1), out=scaled)
        np.add(scaled, HALF_DOWN, out=scaled)
        sign = spread.reshape(-1).view(np.uint32)
        np.bitwise_and(bits, 0x80000000, out=sign)
        np.bitwise_or(magnitude, sign, out=magnitude)
        quants = self._buffer("quants", np.int8, bits.size)
        np.copyto(quants, scaled, casting="unsafe")  # truncates toward zero
        rows = out.reshape(blocks, Q8_0_BLOCK_BYTES)
        rows.view(np.uint16)[:, 0] = d.astype(np.float16).view(np.uint16)
        np.ndarray((blocks,), f"V{Q8_0_BLOCK}", out, 2, (Q8_0_BLOCK_BYTES,))[:] = quants.view(f"V{Q8_0_BLOCK}")

"""Read and write ``.safetensors`` files one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range
of every tensor, plus optional ``__metadata__``), then the raw little-endian tensor bytes.

Nothing here imports torch unless torch tensors are asked for: a merge of safetensors files runs on
numpy arrays and skips torch's import.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ..dtypes import BY_CODE
from ..tensors import TensorSource, TensorSpec
from .hashing import ALGORITHM, WeightFile

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The safetensors library refuses larger headers; so do we, before allocating for one.
MAX_HEADER_SIZE = 100_000_000
# The safetensors library computes sizes in 64-bit integers and rejects shapes that overflow them.
MAX_ELEMENTS = 2**63 - 1
# The library pads the header with spaces so the data section starts 8-byte aligned.
HEADER_ALIGNMENT = 8

def read_safetensors_header(
    path: str | os.PathLike,
) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], dict[str, str]]:
    """Parse the header of a safetensors file without reading any tensor data.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(specs, ranges, metadata)``: the tensor specs by name in the order their data appears in the
        file, each tensor's ``(start, end)`` byte range measured from the start of the file, and the
        ``__metadata__`` strings (empty when the file has none).

    Raises:
        ValueError: the header is truncated or corrupt; the message names the file.

    Example:
        >>> specs, ranges, metadata = read_safetensors_header("model.safetensors")
        >>> specs["embeddings.word_embeddings.weight"].shape
        (30522, 768)
    """
    with open(path, "rb", buffering=0) as f:
        return _read_header(f, str(path))


def _read_header(f, path: str) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], dict[str, str]]:
    file_size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {file_size} bytes, too short for a header)")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > MAX_HEADER_SIZE or 8 + header_size > file_size:
        raise ValueError(
            f"{path}: corrupt or truncated safetensors file (header claims {header_size} bytes, file has {file_size})"
        )
    try:
        header = json.loads(f.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")

    data_start = 8 + header_size
    entries = []
    for name, info in header.items():
        spec, begin, end = _parse_entry(path, name, info)
        if data_start + end > file_size:
            raise ValueError(f"{path}: truncated safetensors file (tensor {name!r} ends past the end of the file)")
        entries.append((begin, spec, (data_start + begin, data_start + end)))
    # Sorting by offset makes a reader that follows `specs` read the file front to back.
    entries.sort(key=lambda entry: entry[0])
    # As the safetensors library validates: the tensors tile the data section exactly, no overlap, no gap.
    expected = 0
    for begin, spec, (_, end) in entries:
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else "leaves a gap before it"
            raise ValueError(f"{path}: corrupt safetensors header, tensor {spec.name!r} {what} (data_offsets start {begin})")
        expected = end - data_start
    if data_start + expected != file_size:
        raise ValueError(
            f"{path}: corrupt safetensors file, the tensors' data ends at byte {data_start + expected} "
            f"but the file has {file_size}"
        )
    specs = {spec.name: spec for _, spec, _ in entries}
    ranges = {spec.name: byte_range for _, spec, byte_range in entries}
    return specs, ranges, metadata


def _parse_entry(path: str, name: str, info: object) -> tuple[TensorSpec, int, int]:
    try:
        code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
    if code not in BY_CODE:
        raise ValueError(f"{path}: tensor {name!r} has dtype {code!r}, which merge-hooks does not know")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"{path}: corrupt safetensors header, tensor {name!r} has shape {shape!r}")
    numel = 1
    for dim in shape:
        numel *= dim
        if dim > MAX_ELEMENTS or numel > MAX_ELEMENTS:
            raise ValueError(f"{path}: corrupt safetensors header, tensor {name!r} has an impossible shape {shape!r}")
    spec = TensorSpec(name, BY_CODE[code], tuple(shape))
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == spec.nbytes):
        raise ValueError(
            f"{path}: corrupt safetensors header, tensor {name!r} ({code} {shape}) needs {spec.nbytes} bytes "
            f"but data_offsets are {[begin, end]}"
        )
    return spec, begin, end


class SafetensorsReader:
    """Read tensors from one safetensors file, each into freshly allocated memory.

    Unlike ``safetensors.safe_open`` nothing is memory-mapped: mapped pages that were read stay
    resident and count toward the process's RSS, while a tensor read here is freed as soon as the
    caller drops it.

    Example:
        >>> with SafetensorsReader("model.safetensors") as reader:
        ...     for spec in reader.specs:
        ...         tensor = reader.get(spec.name)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        try:
            self._specs, self._ranges, self.metadata = _read_header(self._file, str(self.path))
        except BaseException:
            self._file.close()
            raise

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor's spec, in the order the data lies in the file."""
        return list(self._specs.values())

    def keys(self) -> list[str]:
        return list(self._specs)

    def _spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def _shape(self, name: str, rows: Optional[tuple[int, int]]) -> tuple[int, ...]:
        spec = self._spec(name)
        if rows is None:
            return spec.shape
        start, stop = rows
        if not (spec.shape and 0 <= start <= stop <= spec.shape[0]):
            raise ValueError(f"rows {start}:{stop} are out of range for tensor {name!r} of shape {list(spec.shape)}")
        return (stop - start, *spec.shape[1:])

    def get(
        self, name: str, *, out: Optional["torch.Tensor"] = None, rows: Optional[tuple[int, int]] = None
    ) -> "torch.Tensor":
        """Read tensor ``name`` into a new, writable torch tensor that owns its memory, or into ``out``.

        ``out`` must be a contiguous tensor of the tensor's dtype and shape (a reused buffer). With
        ``rows=(start, stop)`` only those rows of the first dimension are read.
        """
        import torch

        spec, shape = self._spec(name), self._shape(name, rows)
        if out is None:
            out = torch.empty(shape, dtype=spec.dtype.torch)
        elif out.dtype != spec.dtype.torch or tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"buffer for {name!r} must be a contiguous {spec.dtype} tensor of shape {list(shape)}")
        # Viewing as uint8 first works for every dtype, including bfloat16 and float8, which numpy lacks.
        self._read_into(name, memoryview(out.reshape(-1).view(torch.uint8).numpy()), rows)
        return out

    def get_array(
        self, name: str, *, out: Optional[np.ndarray] = None, rows: Optional[tuple[int, int]] = None
    ) -> np.ndarray:
        """Read tensor ``name`` (or its ``rows``) into a new numpy array, or into ``out``, in the dtype's ``storage``.

        bfloat16 and float8 tensors come as their raw bits (uint16, uint8): numpy has no such dtypes.
        """
        spec, shape = self._spec(name), self._shape(name, rows)
        if out is None:
            out = np.empty(shape, dtype=spec.dtype.storage)
        elif out.dtype != spec.dtype.storage or out.shape != shape or not out.flags.c_contiguous:
            raise ValueError(
                f"buffer for {name!r} must be a C-contiguous {spec.dtype.storage} array of shape {list(shape)}"
            )
        self._read_into(name, memoryview(out.reshape(-1).view(np.uint8)), rows)
        return out

    def element_reader(self, name: str, start: int, count: int) -> Callable[[int, memoryview], None]:
        """A function ``read(i, view)`` that reads tensor ``name``'s elements from ``start + i`` (counted in
        row-major order) into the bytes of ``view``, within elements ``start:start + count``.

        The range is checked here, once: the stream engine reads each block in many small pieces, and
        checks and lookups per piece cost a tenth of a bfloat16 merge.
        """
        spec = self._spec(name)
        if not 0 <= start <= start + count <= spec.numel:
            raise ValueError(f"elements {start}:{start + count} are out of range for tensor {name!r} of shape {list(spec.shape)}")
        fd, itemsize = self._file.fileno(), spec.dtype.itemsize
        base = self._ranges[name][0] + start * itemsize
        end = base + count * itemsize

        def read(i: int, view: memoryview) -> None:
            offset = base + i * itemsize
            if not base <= offset <= offset + view.nbytes <= end:
                raise ValueError(f"bytes {offset}:{offset + view.nbytes} are outside the elements {start}:{start + count} "
                                 f"of tensor {name!r}")
            if os.preadv(fd, [view], offset) != view.nbytes:  # a short read: read on until it is all there
                self._pread(name, view, offset)

        return read

    def _read_into(self, name: str, view: memoryview, rows: Optional[tuple[int, int]]) -> None:
        start = self._ranges[name][0]
        if rows is not None:
            spec = self._specs[name]
            row_bytes = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
            start += rows[0] * row_bytes
        self._pread(name, view, start)

    def _pread(self, name: str, view: memoryview, offset: int) -> None:
        # Hand-written because safetensors has no pread-based reader and safe_open mmaps the file.
        done = 0
        while done < view.nbytes:
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if not n:
                raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
            done += n

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_safetensors(
    path: str | os.PathLike,
    source: TensorSource,
    *,
    metadata: Optional[dict[str, str]] = None,
    progress: Optional[Callable[[int], object]] = None,
    digest: bool = False,
) -> Optional[str]:
    """Write ``source`` as a safetensors file, holding one block of rows in memory at a time.

    The header is built from the specs alone, then each tensor is produced block by block by
    ``source.blocks`` (whole tensors from ``source.get`` for a source without row blocks), each block
    checked against its spec, written, and dropped before the next one is asked for.

    Args:
        path: the file to create (overwritten if it exists).
        source: the tensors to write, in file order.
        metadata: strings stored in ``__metadata__``, on top of ``{"format": "pt"}``.
        progress: called with each tensor's byte count once it is written (e.g. ``tqdm.update``).
        digest: also hash the file while writing it (see :class:`~merge_hooks.io.hashing.WeightFile`).

    Returns:
        The file's hex digest (:data:`~merge_hooks.io.hashing.ALGORITHM`) when ``digest`` is set, else None.

    Raises:
        ValueError: a tensor name repeats or is reserved, a dtype has no safetensors code, a
            metadata value is not a string, or the source returned a tensor or block whose dtype or
            shape differs from its spec; the message names the tensor.

    Example:
        >>> source = TensorSource.from_state_dict({"w": torch.ones(2, 3)})
        >>> write_safetensors("model.safetensors", source, metadata={"merged_by": "merge-hooks"})
    """
    header_bytes = _build_header(source, {"format": "pt", **(metadata or {})})
    with open(path, "wb") as raw, WeightFile(raw, ALGORITHM if digest else None) as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in source.specs:
            write_blocks(source, spec, f.write)
            if progress is not None:
                progress(spec.nbytes)
        hexdigest = f.hexdigest() if digest else None
    logger.debug("wrote %d tensors (%d bytes) to %s", len(source), source.total_bytes, path)
    return hexdigest


def write_blocks(source: TensorSource, spec: TensorSpec, write: Callable[[Any], Any]) -> None:
    """Write one tensor's blocks with ``write``, each checked against ``spec`` and dropped once written.

    Shared by the safetensors and ``torch.save`` writers, which differ only in where the bytes go.
    """
    for rows, block in source.blocks(spec):
        check_tensor(block, spec, rows=rows)
        data = tensor_bytes(block)
        write(data)
        del block, data


def _build_header(source: TensorSource, metadata: dict[str, str]) -> bytes:
    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map strings to strings; got {bad!r}")
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in source.specs:
        if spec.name in header:
            what = "is reserved" if spec.name == "__metadata__" else "appears twice"
            raise ValueError(f"tensor name {spec.name!r} {what}; safetensors needs unique tensor names")
        header[spec.name] = {
            "dtype": spec.dtype.code,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return encoded + b" " * (-len(encoded) % HEADER_ALIGNMENT)


def check_tensor(tensor: Any, spec: TensorSpec, *, rows: Optional[tuple[int, int]] = None) -> None:
    """Raise ``ValueError`` naming the tensor unless ``tensor`` matches ``spec``'s dtype and shape.

    ``tensor`` is a torch tensor, or a numpy array in the dtype's ``storage`` (bfloat16 as uint16 bits);
    with ``rows=(start, stop)`` it is that block of the tensor's rows.
    """
    if isinstance(tensor, np.ndarray):
        dtype, expected = tensor.dtype, spec.dtype.storage
    elif type(tensor).__module__.startswith("torch") and hasattr(tensor, "dtype"):
        dtype, expected = tensor.dtype, spec.dtype.torch
    else:
        raise ValueError(f"tensor {spec.name!r}: expected a torch.Tensor or numpy array, got {type(tensor).__name__}")
    shape = tuple(spec.shape) if rows is None else (rows[1] - rows[0], *spec.shape[1:])
    if dtype != expected or tuple(tensor.shape) != shape:
        what = "" if rows is None else f" rows {rows[0]}:{rows[1]}"
        raise ValueError(
            f"tensor {spec.name!r}{what} is {dtype} {tuple(tensor.shape)} but was planned as {spec.dtype} {shape}"
        )


def tensor_bytes(tensor: Any) -> memoryview:
    """The raw bytes of a torch tensor or numpy array, without a copy when it is already contiguous."""
    if isinstance(tensor, np.ndarray):
        return memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
    import torch

    # Viewing as uint8 first works for every dtype, including bfloat16 and float8, which numpy lacks.
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())

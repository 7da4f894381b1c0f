"""Read and write ``pytorch_model.bin`` files (``torch.save`` zip archives) one tensor at a time.

The writer does not need torch: it lays the archive out exactly as torch's ``PyTorchStreamWriter``
(miniz) does (record order and names, 64-byte aligned data, data descriptors, zip64 fields past
4 GiB) and pickles ``data.pkl`` as ``torch.save`` pickles a dict of tensors. Keeping torch's own
layout matters: ``torch.load(mmap=True)`` may compute storage offsets from it instead of reading
them. The reader maps the file with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import os
import pickle
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

# ISA-L's CRC-32, zlib's function with zlib's values: every record of the archive carries one, and ISA-L computes
# it at 61 GB/s against zlib's 6.7 GB/s here, a quarter of a second of the writer's time for a 1.7 GB decoder.
from isal.isal_zlib import crc32

from ..dtypes import DType
from ..tensors import TensorSource, TensorSpec
from .hashing import ALGORITHM, WeightFile
from .libc import libc_function
from .safetensors_io import write_blocks

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Pages of the mapped file that were read stay resident until it is unmapped, so the reader
# unmaps after this many bytes; re-mapping costs one torch.load (about 50 ms per 400 tensors).
REMAP_AFTER_BYTES = 128 * 2**20

_ZIP_MAGIC = b"PK\x03\x04"

# --- data.pkl ----------------------------------------------------------------------------------------


class _Global:
    """A module attribute as pickle names it (``GLOBAL module name``), without importing the module."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only accepts callables as reduce functions
        raise TypeError(f"{self.module}.{self.name} is a placeholder for pickling")


@functools.lru_cache(maxsize=None)
def _global(module: str, name: str) -> _Global:
    # One object per name, so the pickler memoizes it and refers back to it as torch.save's pickles do.
    return _Global(module, name)


class _Storage:
    def __init__(self, key: int, spec: TensorSpec):
        self.key, self.spec = key, spec


class _Tensor:
    """Pickles as torch pickles a contiguous CPU tensor that owns its storage."""

    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        spec = self.storage.spec
        stride, step = [], 1
        for dim in reversed(spec.shape):
            stride.append(step)
            step *= dim
        args = (self.storage, 0, tuple(spec.shape), tuple(reversed(stride)), False, collections.OrderedDict())
        if spec.dtype.storage_class is not None:
            return _global("torch._utils", "_rebuild_tensor_v2"), args
        return _global("torch._utils", "_rebuild_tensor_v3"), (*args, _global("torch", spec.dtype.name))


class _TensorPickler(pickle._Pickler):
    """The pure-Python pickler, taught to write placeholder globals and torch's storage references.

    Written by hand because the standard pickler checks every global by importing its module, which
    here would import torch: the one thing this writer exists to avoid.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        dtype: DType = obj.spec.dtype
        if dtype.storage_class is not None:
            return ("storage", _global("torch", dtype.storage_class), str(obj.key), "cpu", obj.spec.numel)
        return ("storage", _global("torch.storage", "UntypedStorage"), str(obj.key), "cpu", obj.spec.nbytes)

    def _save_placeholder(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = _save_placeholder


def pickle_state_dict(specs: list[TensorSpec]) -> bytes:
    """``data.pkl`` for ``{name: tensor}`` with tensor ``i`` in storage record ``data/i``, as torch.save writes it."""
    state = {spec.name: _Tensor(_Storage(key, spec)) for key, spec in enumerate(specs)}
    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


# --- the zip archive ---------------------------------------------------------------------------------

ALIGNMENT = 64
_U32_MAX = 0xFFFFFFFF
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_FLAG_DATA_DESCRIPTOR = 0x08
_FLAG_UTF8 = 0x800
_PADDING_ID = b"FB"


def _zip64_extra(size: int, offset: int, *, local: bool) -> bytes:
    """miniz's zip64 extra field: the sizes when they overflow 32 bits, then the header offset when it does.

    In a local header, written before the data, miniz records the compressed size as 0.
    """
    values = ([size, 0 if local else size] if size >= _U32_MAX else []) + ([offset] if offset >= _U32_MAX else [])
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


class _ArchiveWriter:
    """Zip records laid out as torch's PyTorchStreamWriter lays them out; written front to back.

    Every record is stored (uncompressed), its data padded to :data:`ALIGNMENT` bytes with an ``FB``
    extra field and followed by a data descriptor (none for empty records); the end of the archive
    always has zip64 end records, as miniz writes them for torch.
    """

    def __init__(self, f, prefix: str):
        self._f = f
        self._prefix = prefix
        self._entries: list[tuple[bytes, int, int, int]] = []

    def write(self, name: str, data) -> int:
        """Write one record; ``data`` is any bytes-like object. Returns its CRC-32."""
        view = memoryview(data).cast("B")
        self.begin(name, view.nbytes)
        self.extend(view)
        return self.end()

    def begin(self, name: str, size: int) -> None:
        """Start a record of ``size`` bytes, whose data follows in :meth:`extend` calls, then :meth:`end`."""
        name_bytes = f"{self._prefix}/{name}".encode("utf-8")
        offset = self._f.tell()
        zip64 = _zip64_extra(size, offset, local=True)
        start = offset + _LOCAL_HEADER.size + len(name_bytes) + len(zip64) + 4
        padding = -start % ALIGNMENT
        extra = zip64 + _PADDING_ID + struct.pack("<H", padding) + b"Z" * padding
        flags = _FLAG_UTF8 | (_FLAG_DATA_DESCRIPTOR if size else 0)
        self._f.write(_LOCAL_HEADER.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(name_bytes), len(extra)))
        self._f.write(name_bytes)
        self._f.write(extra)
        self._record = (name_bytes, offset, size, 0, 0)

    def extend(self, data) -> None:
        """Write the next bytes of the current record."""
        view = memoryview(data).cast("B")
        self._f.write(view)
        name_bytes, offset, size, written, crc = self._record
        self._record = (name_bytes, offset, size, written + view.nbytes, crc32(view, crc))

    def end(self) -> int:
        """Finish the current record; returns its CRC-32."""
        name_bytes, offset, size, written, crc = self._record
        if written != size:
            raise ValueError(f"record {name_bytes.decode()} got {written} bytes, {size} were announced")
        if size:
            wide = offset >= _U32_MAX or size >= _U32_MAX
            self._f.write(b"PK\x07\x08" + struct.pack("<IQQ" if wide else "<III", crc, size, size))
        self._entries.append((name_bytes, offset, size, crc))
        return crc

    def finish(self) -> None:
        """Write the central directory and the end records."""
        start = self._f.tell()
        for name_bytes, offset, size, crc in self._entries:
            flags = _FLAG_UTF8 | (_FLAG_DATA_DESCRIPTOR if size else 0)
            zip64 = _zip64_extra(size, offset, local=False)
            size32 = _U32_MAX if size >= _U32_MAX else size
            self._f.write(_CENTRAL_HEADER.pack(
                0x02014B50, 0, 0, flags, 0, 0, 0, crc, size32, size32, len(name_bytes), len(zip64), 0, 0, 0, 0,
                _U32_MAX if offset >= _U32_MAX else offset,
            ))
            self._f.write(name_bytes)
            self._f.write(zip64)
        end = self._f.tell()
        count = len(self._entries)
        self._f.write(_ZIP64_END.pack(0x06064B50, _ZIP64_END.size - 12, 0x031E, 0x002D, 0, 0, count, count,
                                      end - start, start))
        self._f.write(_ZIP64_LOCATOR.pack(0x07064B50, 0, end, 1))
        self._f.write(_END.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                                min(end - start, _U32_MAX), min(start, _U32_MAX), 0))

    @property
    def crcs(self) -> list[int]:
        return [crc for *_, crc in self._entries]


def archive_name(path: str | os.PathLike) -> str:
    """The folder torch.save puts every record in: the file name without its extension."""
    return Path(path).stem


def write_torch(
    path: str | os.PathLike,
    source: TensorSource,
    *,
    progress: Optional[Callable[[int], object]] = None,
    digest: bool = False,
) -> Optional[str]:
    """Write ``source`` as a ``torch.save`` archive of ``{name: tensor}``, one block of rows in memory at a time.

    The result is laid out as ``torch.save(dict(...), path)`` lays it out (one storage per tensor, in
    order), loads with ``torch.load(path, weights_only=True)``, with or without ``mmap=True``, and has
    valid CRC-32 values for zip tools. torch is not imported; the source may produce numpy arrays.
    Tensors are written block by block (``source.blocks``), each record's CRC-32 computed as it goes.

    Args:
        path: the file to create (overwritten if it exists).
        source: the tensors to write, in file order.
        progress: called with each tensor's byte count once it is written (e.g. ``tqdm.update``).
        digest: also hash the file while writing it (see :class:`~merge_hooks.io.hashing.WeightFile`).

    Returns:
        The file's hex digest (:data:`~merge_hooks.io.hashing.ALGORITHM`) when ``digest`` is set, else None.

    Raises:
        ValueError: a tensor name repeats, or the source returned a tensor or block whose dtype or
            shape differs from its spec; the message names the tensor.

    Example:
        >>> source = TensorSource.from_state_dict({"w": torch.ones(2, 3)})
        >>> write_torch("pytorch_model.bin", source)
        >>> torch.load("pytorch_model.bin", weights_only=True)["w"].shape
        torch.Size([2, 3])
    """
    specs = list(source.specs)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor names must be unique; repeated: {repeated}")
    with open(path, "wb") as raw, WeightFile(raw, ALGORITHM if digest else None) as f:
        archive = _ArchiveWriter(f, archive_name(path))
        # The small records torch.save writes before the data, in its order.
        archive.write("data.pkl", pickle_state_dict(specs))
        archive.write(".format_version", b"1")
        archive.write(".storage_alignment", str(ALIGNMENT).encode())
        archive.write("byteorder", b"little")
        for key, spec in enumerate(specs):
            archive.begin(f"data/{key}", spec.nbytes)
            write_blocks(source, spec, archive.extend)
            archive.end()
            if progress is not None:
                progress(spec.nbytes)
        archive.write("version", b"3\n")
        archive.write(".data/serialization_id", _serialization_id(names, archive.crcs))
        archive.finish()
        hexdigest = f.hexdigest() if digest else None
    logger.debug("wrote %d tensors (%d bytes) to %s", len(specs), source.total_bytes, path)
    return hexdigest


def _serialization_id(names: list[str], crcs: list[int]) -> bytes:
    """40 digits naming this archive's contents, as torch writes (its own mixes a hash of the record names
    and the records' CRCs; only its uniqueness matters)."""
    combined = 0
    for crc in crcs:
        combined = crc32(struct.pack("<I", crc), combined)
    names_crc = crc32("\n".join(names).encode("utf-8"))
    return f"{names_crc:020d}{combined:020d}".encode()


def refused_pickle(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a pickle file, in one line.

    torch's own message runs to many lines and suggests ``weights_only=False``, which would run
    whatever code the file holds; merge-hooks never loads that way.
    """
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" such as {found.group(1)}" if found else ""
    return (
        f"it holds Python objects{what} besides tensors, and merge-hooks reads only tensors from pickle files; "
        "use a copy of the model saved as safetensors, or a state dict of tensors only"
    )


def _madvise():
    """libc's madvise, or None where there is none (Python's os module only offers it for its own mmap objects)."""
    return libc_function("madvise", "c_void_p", "c_size_t", "c_int")


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _maps_file(address: int, path: Path) -> bool:
    """Whether ``address`` lies in a mapping of the file ``path`` (Linux ``/proc/self/maps``): only such
    pages may be dropped, since they are read back from the file; anonymous memory would come back zeroed."""
    try:
        target = os.stat(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high:
                    inode = int(fields[4])
                    return inode == target.st_ino and len(fields) == 6 and Path(fields[5].strip()) == path.resolve()
    except (OSError, ValueError, IndexError):
        pass
    return False


def _drop_mapped_pages(address: int, nbytes: int) -> None:
    """Let the kernel take back the pages of a read-only file mapping once they were copied out.

    Pages of the mapping that were read stay resident, and count in the process's RSS, until the
    mapping goes; dropping them after each block keeps a ``.bin`` merge's memory at its blocks. The
    file is mapped privately and never written, so a page touched again is read back from the file.
    """
    madvise = _madvise()
    if madvise is None or nbytes <= 0:
        return
    start = address - address % _PAGE
    madvise(start, address + nbytes - start, _MADV_DONTNEED)


class TorchReader:
    """Read tensors from one ``torch.save`` file, each as an owned copy.

    The file is loaded with ``torch.load(weights_only=True, mmap=True)``, so nothing but tensors
    can be unpickled and only the tensors that are read get paged in. Tensors (or blocks of their
    rows) are copied out and the mapped pages let go at once where the system allows it (Linux
    ``madvise``); the mapping is also dropped and re-made after :data:`REMAP_AFTER_BYTES` have been
    read, which bounds memory elsewhere. Pre-zip (legacy) files cannot be mapped and are loaded whole.

    Example:
        >>> with TorchReader("pytorch_model.bin") as reader:
        ...     for spec in reader.specs:
        ...         tensor = reader.get(spec.name)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mapped = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        if not self._mapped:
            logger.info("%s is a legacy (pre-zip) torch file; loading it whole into memory", self.path)
        self._tensors: Optional[dict[str, torch.Tensor]] = self._load()
        self._droppable = self._file_mapped()
        self._specs = {
            name: TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in self._tensors.items()
        }
        self._read_bytes = 0

    def _load(self) -> dict[str, torch.Tensor]:
        import torch

        try:
            if self._mapped:
                loaded = torch.load(self.path, weights_only=True, mmap=True, map_location="cpu")
            else:
                loaded = torch.load(self.path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{self.path}: {refused_pickle(exc)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.path} holds a {type(loaded).__name__}, not a dict of tensors")
        for name, value in loaded.items():
            if not (isinstance(name, str) and isinstance(value, torch.Tensor)):
                raise ValueError(
                    f"{self.path}: entry {name!r} is a {type(value).__name__}; expected a flat dict of tensors"
                )
        return loaded

    def _file_mapped(self) -> bool:
        """Whether the loaded tensors live in a mapping of the file (see :func:`_drop_mapped_pages`)."""
        if not self._mapped or _madvise() is None:
            return False
        tensor = next((t for t in self._tensors.values() if t.numel()), None)
        return tensor is not None and _maps_file(tensor.data_ptr(), self.path)

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor's spec, in the order the file's dict lists them."""
        return list(self._specs.values())

    def keys(self) -> list[str]:
        return list(self._specs)

    def get(
        self, name: str, *, out: Optional[torch.Tensor] = None, rows: Optional[tuple[int, int]] = None
    ) -> torch.Tensor:
        """Copy tensor ``name`` (or its ``rows=(start, stop)``) into a new, contiguous tensor that owns its
        memory, or into ``out``."""
        import torch

        try:
            spec = self._specs[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None
        shape, nbytes = spec.shape, spec.nbytes
        if rows is not None:
            if not (spec.shape and 0 <= rows[0] <= rows[1] <= spec.shape[0]):
                raise ValueError(f"rows {rows[0]}:{rows[1]} are out of range for tensor {name!r} of shape {list(shape)}")
            shape = (rows[1] - rows[0], *spec.shape[1:])
            nbytes = spec.nbytes // spec.shape[0] * shape[0] if spec.shape[0] else 0
        if self._mapped and self._read_bytes and self._read_bytes + nbytes > REMAP_AFTER_BYTES:
            logger.debug("unmapping %s after reading %d bytes from it", self.path, self._read_bytes)
            self._tensors = None
            self._read_bytes = 0
        if self._tensors is None:
            self._tensors = self._load()
            self._droppable = self._file_mapped()
        # detach: files saved from nn.Parameters load as Parameters, whose clones would track gradients.
        mapped = self._tensors[name].detach()
        if rows is not None:
            mapped = mapped[rows[0]:rows[1]]
        if out is None:
            out = mapped.clone(memory_format=torch.contiguous_format)
        elif out.dtype != spec.dtype.torch or tuple(out.shape) != shape:
            raise ValueError(f"buffer for {name!r} must be a {spec.dtype} tensor of shape {list(shape)}")
        else:
            out.copy_(mapped)
        if self._droppable and mapped.is_contiguous():
            _drop_mapped_pages(mapped.data_ptr(), nbytes)
        self._read_bytes += nbytes
        return out

    def close(self) -> None:
        self._tensors = None

    def __enter__(self) -> "TorchReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

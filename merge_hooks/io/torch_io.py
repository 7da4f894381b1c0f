"""Read and write ``pytorch_model.bin`` files (``torch.save`` zip archives) one tensor at a time.

Writing first lets ``torch.save`` lay out the whole archive with ``skip_data`` over placeholder
tensors whose memory is never touched, then fills each storage record in place and patches its CRC-32. Keeping
torch's own layout (64-byte aligned records, miniz data descriptors, zip64 past 4 GiB) matters:
``torch.load(mmap=True)`` can compute storage offsets from that layout instead of reading it.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import MergeHooksError
from ..tensors import TensorSource, TensorSpec
from .safetensors_io import check_tensor, tensor_bytes

logger = logging.getLogger(__name__)

# Pages of the mapped file that were read stay resident until it is unmapped, so the reader
# unmaps after this many bytes; re-mapping costs one torch.load (about 50 ms per 400 tensors).
REMAP_AFTER_BYTES = 128 * 2**20

_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_CRC = 14
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_HEADER_SIGNATURE = 0x02014B50
_CENTRAL_HEADER_CRC = 16
_DATA_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_FLAG_DATA_DESCRIPTOR = 0x08


@dataclass(frozen=True)
class _StorageRecord:
    data_offset: int
    crc_offsets: tuple[int, ...]


def write_torch(
    path: str | os.PathLike,
    source: TensorSource,
    *,
    progress: Optional[Callable[[int], object]] = None,
) -> None:
    """Write ``source`` as a ``torch.save`` archive of ``{name: tensor}``, one tensor in memory at a time.

    The result is what ``torch.save(dict(...), path)`` would write (one storage per tensor, in
    order), loadable with ``torch.load(path, weights_only=True)``, with or without ``mmap=True``,
    and with valid CRC-32 values for zip tools.

    Args:
        path: the file to create (overwritten if it exists).
        source: the tensors to write, in file order.
        progress: called with each tensor's byte count once it is written (e.g. ``tqdm.update``).

    Raises:
        ValueError: a tensor name repeats, or ``source.get`` returned a tensor whose dtype or
            shape differs from its spec; the message names the tensor.
        MergeHooksError: this torch lacks ``torch.serialization.skip_data``.

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
    _write_skeleton(path, specs)
    records = _storage_records(path, specs)
    with open(path, "r+b") as f:
        for spec, record in zip(specs, records):
            tensor = source.get(spec.name)
            check_tensor(tensor, spec)
            data = tensor_bytes(tensor)
            f.seek(record.data_offset)
            f.write(data)
            crc = struct.pack("<I", zlib.crc32(data))
            del tensor, data
            for offset in record.crc_offsets:
                f.seek(offset)
                f.write(crc)
            if progress is not None:
                progress(spec.nbytes)
    logger.debug("wrote %d tensors (%d bytes) to %s", len(specs), source.total_bytes, path)


def _write_skeleton(path: str | os.PathLike, specs: list[TensorSpec]) -> None:
    """Have torch.save write the archive with every storage record sized but left unwritten.

    The placeholders are uninitialised ``torch.empty`` tensors: skip_data never reads them, so their
    pages are never touched and cost no resident memory (FakeTensorMode would do the same but takes
    seconds to set up on first use).
    """
    skip_data = getattr(torch.serialization, "skip_data", None)
    if skip_data is None:
        raise MergeHooksError(
            f"writing .bin files needs torch.serialization.skip_data, which torch {torch.__version__} lacks; "
            "upgrade torch (>= 2.5) or write safetensors"
        )
    placeholders = {spec.name: torch.empty(spec.shape, dtype=spec.dtype.torch) for spec in specs}
    with skip_data():
        torch.save(placeholders, path)


def _storage_records(path: str | os.PathLike, specs: list[TensorSpec]) -> list[_StorageRecord]:
    """Where each storage's bytes go and where its CRC-32 is recorded, in spec order.

    torch names storages "0", "1", ... in the order it pickles them, which is dict order here.
    """
    def layout_error(why: str) -> RuntimeError:
        return RuntimeError(
            f"torch {torch.__version__} wrote {path} in a layout merge-hooks does not expect ({why}); "
            "write safetensors instead"
        )

    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        infos = archive.infolist()
        pickles = [info.filename for info in infos if info.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise layout_error("no single data.pkl record")
        prefix = pickles[0][: -len("data.pkl")]
        storages = [info for info in infos if info.filename.startswith(f"{prefix}data/")]
        if len(storages) != len(specs):
            raise layout_error(f"{len(storages)} storage records for {len(specs)} tensors")
        central_crcs = _central_crc_offsets(f, archive.start_dir, len(infos))

        records = []
        for key, spec in enumerate(specs):
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise layout_error(f"no record {name}") from None
            if info.file_size != spec.nbytes or info.compress_type != zipfile.ZIP_STORED:
                raise layout_error(f"record {name} is not {spec.nbytes} stored bytes for {spec.name!r}")
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            flags, name_length, extra_length = fields[2], fields[9], fields[10]
            data_offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            # torch (miniz) leaves the local header's CRC zero and records it in a data descriptor
            # after the data; only records without one (empty storages) keep it in the header.
            if flags & _FLAG_DATA_DESCRIPTOR:
                f.seek(data_offset + info.file_size)
                if f.read(4) != _DATA_DESCRIPTOR_SIGNATURE:
                    raise layout_error(f"record {name} has no data descriptor signature")
                local_crc = data_offset + info.file_size + 4
            else:
                local_crc = info.header_offset + _LOCAL_HEADER_CRC
            records.append(_StorageRecord(data_offset, (local_crc, central_crcs[info.filename])))
    return records


def _central_crc_offsets(f, start: int, count: int) -> dict[str, int]:
    """File offset of the CRC-32 field of each central directory entry, by record name."""
    offsets = {}
    f.seek(start)
    for _ in range(count):
        entry = f.tell()
        fields = _CENTRAL_HEADER.unpack(f.read(_CENTRAL_HEADER.size))
        if fields[0] != _CENTRAL_HEADER_SIGNATURE:
            raise RuntimeError(f"corrupt zip central directory at byte {entry} of {f.name}")
        name_length, extra_length, comment_length = fields[10], fields[11], fields[12]
        name = f.read(name_length).decode("utf-8")
        offsets[name] = entry + _CENTRAL_HEADER_CRC
        f.seek(extra_length + comment_length, os.SEEK_CUR)
    return offsets


class TorchReader:
    """Read tensors from one ``torch.save`` file, each as an owned copy.

    The file is loaded with ``torch.load(weights_only=True, mmap=True)``, so nothing but tensors
    can be unpickled and only the tensors that are read get paged in. The mapping is dropped and
    re-made after :data:`REMAP_AFTER_BYTES` have been read, which keeps peak RSS near that plus
    twice the tensor being read. Pre-zip (legacy) files cannot be mapped and are loaded whole.

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
        self._specs = {
            name: TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in self._tensors.items()
        }
        self._read_bytes = 0

    def _load(self) -> dict[str, torch.Tensor]:
        try:
            if self._mapped:
                loaded = torch.load(self.path, weights_only=True, mmap=True, map_location="cpu")
            else:
                loaded = torch.load(self.path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{self.path} holds more than tensors and is not loaded unsafely: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.path} holds a {type(loaded).__name__}, not a dict of tensors")
        for name, value in loaded.items():
            if not (isinstance(name, str) and isinstance(value, torch.Tensor)):
                raise ValueError(
                    f"{self.path}: entry {name!r} is a {type(value).__name__}; expected a flat dict of tensors"
                )
        return loaded

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor's spec, in the order the file's dict lists them."""
        return list(self._specs.values())

    def keys(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Copy tensor ``name`` into a new, contiguous tensor that owns its memory, or into ``out``."""
        try:
            spec = self._specs[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None
        if self._mapped and self._read_bytes and self._read_bytes + spec.nbytes > REMAP_AFTER_BYTES:
            logger.debug("unmapping %s after reading %d bytes from it", self.path, self._read_bytes)
            self._tensors = None
            self._read_bytes = 0
        if self._tensors is None:
            self._tensors = self._load()
        # detach: files saved from nn.Parameters load as Parameters, whose clones would track gradients.
        mapped = self._tensors[name].detach()
        if out is None:
            out = mapped.clone(memory_format=torch.contiguous_format)
        elif out.dtype != spec.dtype.torch or tuple(out.shape) != spec.shape:
            raise ValueError(f"buffer for {name!r} must be a {spec.dtype} tensor of shape {list(spec.shape)}")
        else:
            out.copy_(mapped)
        self._read_bytes += spec.nbytes
        return out

    def close(self) -> None:
        self._tensors = None

    def __enter__(self) -> "TorchReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

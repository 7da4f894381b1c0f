"""merge_hooks.io.torch_io: the streaming ``torch.save`` writer and the mmap-based reader."""

import os
import struct
import subprocess
import sys
import weakref
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from helpers import all_dtypes_state_dict, assert_same_bits, bits, run_peak_mb_script

import merge_hooks.io.torch_io as torch_io
from merge_hooks.io.torch_io import TorchReader, write_torch
from merge_hooks.tensors import TensorSource, TensorSpec

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def _data_records(path: Path) -> dict[str, tuple[int, int, int]]:
    """Per record: its data offset, the CRC-32 in its data descriptor (or local header), the central one."""
    records = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            flags = struct.unpack("<H", header[6:8])[0]
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            data = info.header_offset + 30 + name_length + extra_length
            if flags & 0x08:
                f.seek(data + info.file_size)
                signature, local_crc = struct.unpack("<4sI", f.read(8))
                assert signature == b"PK\x07\x08"
            else:
                local_crc = struct.unpack("<I", header[14:18])[0]
            records[info.filename] = (data, local_crc, info.CRC)
    return records


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_write_matches_torch_save_for_every_dtype(tmp_path, mmap):
    tensors = all_dtypes_state_dict()
    ours, theirs = tmp_path / "ours.bin", tmp_path / "theirs.bin"
    write_torch(ours, TensorSource.from_state_dict(tensors))
    torch.save(tensors, theirs)

    loaded = torch.load(ours, weights_only=True, mmap=mmap)
    assert_same_bits(loaded, torch.load(theirs, weights_only=True, mmap=mmap), ordered=True)
    assert_same_bits(loaded, tensors, ordered=True)
    assert len({t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}) == sum(
        1 for t in tensors.values() if t.numel()
    ), "one storage per tensor"


def test_archive_crcs_and_alignment(tmp_path):
    tensors = all_dtypes_state_dict()
    path = tmp_path / "pytorch_model.bin"
    write_torch(path, TensorSource.from_state_dict(tensors))

    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
    records = _data_records(path)
    for key, tensor in enumerate(tensors.values()):
        name = f"pytorch_model/data/{key}"
        assert name in names
        data_offset, local_crc, central_crc = records[name]
        assert data_offset % 64 == 0
        assert local_crc == central_crc == zlib.crc32(bytes(bits(tensor).numpy())), name
    for name, (_, local_crc, central_crc) in records.items():
        assert local_crc == central_crc, name


def test_spec_mismatch_names_the_tensor(tmp_path):
    specs = [TensorSpec("fine", torch.float32, (1,)), TensorSpec("layer.7.weight", torch.bfloat16, (2, 3))]
    source = TensorSource(specs, lambda name: torch.zeros(1) if name == "fine" else torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"layer\.7\.weight"):
        write_torch(tmp_path / "pytorch_model.bin", source)
    duplicate = TensorSource([TensorSpec("a", torch.float32, (1,))] * 2, lambda name: torch.zeros(1))
    with pytest.raises(ValueError, match="'a'"):
        write_torch(tmp_path / "dup.bin", duplicate)


def test_writer_streams_in_order_and_reports_progress(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float16, (i + 1, 3)) for i in range(5)]
    handed_out: list[weakref.ref] = []
    order = []

    def get(name):
        assert all(ref() is None for ref in handed_out), "previous tensor still alive when the next is asked for"
        order.append(name)
        tensor = torch.full(next(s.shape for s in specs if s.name == name), float(len(order)), dtype=torch.float16)
        handed_out.append(weakref.ref(tensor))
        return tensor

    done = []
    path = tmp_path / "pytorch_model.bin"
    write_torch(path, TensorSource(specs, get), progress=done.append)
    assert order == [s.name for s in specs]
    assert done == [s.nbytes for s in specs]
    loaded = torch.load(path, weights_only=True)
    for i, spec in enumerate(specs):
        assert torch.equal(loaded[spec.name], torch.full(spec.shape, float(i + 1), dtype=torch.float16))


def test_reader_reads_torch_save_files(tmp_path):
    base = torch.randn(6, 4)
    tensors = {
        "w": base,
        "tied": base,
        "transposed": base.t(),
        "row": base[2],
        "ids": torch.arange(9),
        "half": torch.randn(5, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.randn(2)),
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)

    with TorchReader(path) as reader:
        assert reader.keys() == list(tensors)
        assert reader.specs == [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        got = {name: reader.get(name) for name in reader.keys()}
        with pytest.raises(KeyError, match="nope"):
            reader.get("nope")
    for name, tensor in tensors.items():
        assert torch.equal(got[name], tensor), name
        assert got[name].is_contiguous(), name
        assert got[name].untyped_storage().nbytes() == got[name].nbytes, f"{name} must own its memory"
        assert type(got[name]) is torch.Tensor and not got[name].requires_grad, name
    got["w"] += 1
    assert torch.equal(got["tied"], base), "copies must not share memory"


def test_reader_remaps_and_stays_correct(tmp_path, monkeypatch):
    tensors = all_dtypes_state_dict()
    path = tmp_path / "pytorch_model.bin"
    write_torch(path, TensorSource.from_state_dict(tensors))
    loads = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch_io, "REMAP_AFTER_BYTES", 40)
    monkeypatch.setattr(torch, "load", counting_load)
    with TorchReader(path) as reader:
        assert_same_bits({name: reader.get(name) for name in reader.keys()}, tensors, ordered=True)
    assert len(loads) > 3
    assert all(kw == {"weights_only": True, "mmap": True, "map_location": "cpu"} for kw in loads)


def test_reader_handles_legacy_files(tmp_path):
    tensors = {"w": torch.randn(3, 3), "b": torch.arange(3, dtype=torch.int32)}
    path = tmp_path / "legacy.bin"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    with TorchReader(path) as reader:
        assert_same_bits({name: reader.get(name) for name in reader.keys()}, tensors, ordered=True)


class _NotATensor:
    pass


def test_reader_refuses_anything_but_a_dict_of_tensors(tmp_path):
    nested = tmp_path / "nested.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, nested)
    with pytest.raises(ValueError, match="state_dict"):
        TorchReader(nested)
    unsafe = tmp_path / "unsafe.bin"
    torch.save({"w": torch.zeros(1), "obj": _NotATensor()}, unsafe)
    with pytest.raises(ValueError, match="unsafe.bin"):
        TorchReader(unsafe)


_MEMORY_SCRIPT = """
import sys, torch
from merge_hooks.io.torch_io import TorchReader, write_torch
from merge_hooks.tensors import TensorSource, TensorSpec

n = 50 * 2**20 // 4
specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i in range(6)]
source = TensorSource(specs, lambda name: torch.full((n,), float(name[1:])))
base = peak_mb()
if sys.argv[1] == "write":
    write_torch(sys.argv[2], source)
else:
    with TorchReader(sys.argv[2]) as reader:
        for spec in reader.specs:
            tensor = reader.get(spec.name)
            # min and max read every page, as merging would, without allocating a second tensor.
            assert tensor.min().item() == tensor.max().item() == float(spec.name[1:])
            del tensor
print(peak_mb() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_write_and_read_memory_stay_near_one_tensor(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    written = run_peak_mb_script(_MEMORY_SCRIPT, "write", path)
    assert path.stat().st_size > 300 * MB
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert [loaded[f"t{i}"][-1].item() for i in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    del loaded
    # Six 50 MB tensors: holding them all would be 300 MB; streaming needs about one.
    assert written < 3 * 50 + 100, f"writer peak RSS {written:.0f} MB above baseline"

    read = run_peak_mb_script(_MEMORY_SCRIPT, "read", path)
    # Without re-mapping, every page read stays resident: 300 MB mapped plus the copy.
    assert read < 2 * 50 + 150, f"reader peak RSS {read:.0f} MB above baseline"


def _without_serialization_id(path: Path) -> bytes:
    """The file's bytes with the serialization id (data and CRCs) blanked: its value is torch's own hash."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{path.stem}/.data/serialization_id")
    records = _data_records(path)
    start, _, _ = records[info.filename]
    data[start:start + info.file_size + 8] = bytes(info.file_size + 8)  # the id and its descriptor's CRC
    central = data.index(b"PK\x01\x02" + bytes(2), data.rindex(info.filename.encode()) - 46)
    data[central + 16:central + 20] = bytes(4)
    return bytes(data)


def test_archive_is_byte_for_byte_what_torch_save_writes(tmp_path):
    """Record names, order, headers, padding, descriptors, pickle, central directory: all torch's bytes."""
    tensors = all_dtypes_state_dict()
    tensors["transposed"] = torch.randn(4, 3).t().contiguous()
    (tmp_path / "ours").mkdir()
    ours, theirs = tmp_path / "ours" / "pytorch_model.bin", tmp_path / "pytorch_model.bin"
    write_torch(ours, TensorSource.from_state_dict(tensors))
    torch.save(tensors, theirs)
    assert _without_serialization_id(ours) == _without_serialization_id(theirs)


def test_writer_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from merge_hooks.io.torch_io import write_torch\n"
        "from merge_hooks.tensors import TensorSource, TensorSpec\n"
        "specs = [TensorSpec('w', 'float32', (2, 3)), TensorSpec('b', 'bfloat16', (4,))]\n"
        "arrays = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.full(4, 0x3F80, dtype=np.uint16)}\n"
        f"write_torch({str(tmp_path / 'pytorch_model.bin')!r}, TensorSource(specs, arrays.__getitem__))\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    loaded = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(loaded["b"], torch.ones(4, dtype=torch.bfloat16))


class _SparseFile:
    """A file that leaves large writes as holes, so a >4 GiB archive costs no disk or memory."""

    def __init__(self, path, mode):
        self._f = open(path, mode)

    def write(self, data):
        view = memoryview(data)
        if view.nbytes > MB:
            self._f.seek(view.nbytes, os.SEEK_CUR)
            return view.nbytes
        return self._f.write(view)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.slow
def test_archive_past_4_gib_has_torchs_zip64_layout(tmp_path, monkeypatch):
    """Past 4 GiB miniz adds zip64 fields to headers, descriptors and the central directory.

    Our archive (its big tensor left as a hole) must equal torch's skip_data skeleton of the same
    tensors, whose data records are holes too, and load with and without computed storage offsets.
    """
    import numpy as np

    small = torch.arange(5, dtype=torch.float32)
    after = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float16)
    huge = np.zeros(1100 * MB, dtype=np.float32)  # calloc'd: never touched, so never resident
    # "again" is past 4 GiB in both size and offset.
    arrays = {"small": small.numpy(), "huge": huge, "again": huge, "after": after.numpy()}
    specs = [TensorSpec("small", torch.float32, (5,)), TensorSpec("huge", torch.float32, huge.shape),
             TensorSpec("again", torch.float32, huge.shape), TensorSpec("after", torch.float16, (3,))]
    real_crc32 = torch_io.crc32
    # torch's skeleton records CRC 0 for skipped data; so do we, for tensors, without reading 4.4 GB.
    monkeypatch.setattr(torch_io, "crc32", lambda data, value=0: (
        0 if isinstance(memoryview(data).obj, np.ndarray) else real_crc32(data, value)))
    monkeypatch.setattr(torch_io, "open", _SparseFile, raising=False)
    (tmp_path / "ours").mkdir()
    ours, theirs = tmp_path / "ours" / "pytorch_model.bin", tmp_path / "pytorch_model.bin"
    write_torch(ours, TensorSource(specs, arrays.__getitem__))
    with torch.serialization.skip_data():
        torch.save({"small": torch.empty(5), "huge": torch.empty(1100 * MB), "again": torch.empty(1100 * MB),
                    "after": torch.empty(3, dtype=torch.float16)}, theirs)

    assert ours.stat().st_size == theirs.stat().st_size > 2**33
    records = _data_records(ours)
    id_name = "pytorch_model/.data/serialization_id"
    theirs_records = _data_records(theirs)
    assert records[id_name][0] == theirs_records.pop(id_name)[0]
    assert {k: v for k, v in records.items() if k != id_name} == theirs_records
    big = [(records[f"pytorch_model/data/{key}"][0], huge.nbytes) for key in (1, 2)]
    assert big[1][0] > 2**32
    id_start = records[id_name][0]
    blanks = [  # (offset, length) that may differ: small tensors' data (holes in theirs) and the id
        (records["pytorch_model/data/0"][0], small.numpy().nbytes),
        (records["pytorch_model/data/3"][0], after.numpy().nbytes), (id_start, 40), (id_start + 44, 4)]

    def outside_big_tensors(path: Path) -> list[bytes]:
        """Every byte but the two big tensors' data, with the blanks zeroed."""
        regions, position = [], 0
        with open(path, "rb") as f:
            for offset, length in big + [(path.stat().st_size, 0)]:
                f.seek(position)
                region = bytearray(f.read(offset - position))
                for blank, n in blanks:
                    if position <= blank < offset:
                        region[blank - position:blank - position + n] = bytes(n)
                regions.append(region)
                position = offset + length
        crc_at = regions[-1].rindex(id_name.encode()) - 46 + 16  # the id's central directory entry
        regions[-1][crc_at:crc_at + 4] = bytes(4)
        return [bytes(r) for r in regions]

    assert outside_big_tensors(ours) == outside_big_tensors(theirs)

    monkeypatch.undo()
    for calculate in (False, True):
        with torch.utils.serialization.config.patch({"load.calculate_storage_offsets": calculate}):
            loaded = torch.load(ours, weights_only=True, mmap=True)
        assert torch.equal(loaded["small"], small) and torch.equal(loaded["after"], after)
        assert loaded["huge"].shape == (1100 * MB,)
        del loaded

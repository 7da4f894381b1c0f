"""merge_hooks.io.safetensors_io: the header parser, the pread reader and the streaming writer."""

import json
import os
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_hooks.io.safetensors_io import (
    SafetensorsReader,
    read_safetensors_header,
    write_safetensors,
)
from merge_hooks.dtypes import BY_CODE
from merge_hooks.tensors import TensorSource, TensorSpec

# safetensors code -> torch dtype, for the dtypes this torch build has.
DTYPES = {d.code: getattr(torch, d.name) for d in BY_CODE.values() if hasattr(torch, d.name)}

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def _random(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape) * 4).to(dtype)
    return torch.randint(0, 120, shape).to(dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _all_dtypes_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {}
    for code, dtype in DTYPES.items():
        tensors[f"{code}.matrix"] = _random(dtype, (3, 5))
        tensors[f"{code}.odd"] = _random(dtype, (7,))
        tensors[f"{code}.scalar"] = _random(dtype, ())
        tensors[f"{code}.empty"] = _random(dtype, (0, 4))
    return tensors


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(_bits(loaded[name]), _bits(tensor)), name


def test_dtype_table_covers_what_safetensors_supports():
    for code in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"):
        assert code in DTYPES
    assert DTYPES["BF16"] is torch.bfloat16 and DTYPES["F8_E4M3"] is torch.float8_e4m3fn


def test_write_matches_save_file_for_every_dtype(tmp_path):
    tensors = _all_dtypes_state_dict()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, TensorSource.from_state_dict(tensors), metadata={"merged_by": "test"})
    save_file(tensors, theirs, metadata={"format": "pt", "merged_by": "test"})

    _assert_same(load_file(ours), load_file(theirs))
    _assert_same(load_file(ours), tensors)
    with safe_open(ours, framework="pt") as f, safe_open(theirs, framework="pt") as g:
        assert f.metadata() == g.metadata() == {"format": "pt", "merged_by": "test"}
        _assert_same({k: f.get_tensor(k) for k in f.keys()}, {k: g.get_tensor(k) for k in g.keys()})


def test_written_header_layout(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {"b": torch.ones(3, dtype=torch.float16), "a": torch.zeros(2, 2), "s": torch.tensor(7)}
    write_safetensors(path, TensorSource.from_state_dict(tensors), metadata={"format": "pt", "note": "x"})

    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert list(header) == ["__metadata__", "b", "a", "s"]
    assert header["__metadata__"] == {"format": "pt", "note": "x"}
    assert header["b"] == {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}
    assert header["a"] == {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}
    assert header["s"] == {"dtype": "I64", "shape": [], "data_offsets": [22, 30]}
    assert len(raw) == 8 + size + 30


def test_read_header_of_library_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {"w": torch.randn(4, 3), "ids": torch.arange(5), "half": torch.randn(2, dtype=torch.bfloat16)}
    save_file(tensors, path, metadata={"format": "pt", "k": "v"})

    specs, ranges, metadata = read_safetensors_header(path)
    assert metadata == {"format": "pt", "k": "v"}
    assert specs == {name: TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    raw = path.read_bytes()
    starts = [ranges[name][0] for name in specs]
    assert starts == sorted(starts), "specs must follow the data order"
    for name, (start, end) in ranges.items():
        assert raw[start:end] == bytes(_bits(tensors[name]).numpy())


def _corrupt_header_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(4, 4)}, good)
    raw = good.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])

    def header_file(header: object, data: bytes = b"\0" * 64) -> bytes:
        body = json.dumps(header).encode()
        return struct.pack("<Q", len(body)) + body + data

    variants = {
        "short": raw[:5],
        "length_past_end": struct.pack("<Q", len(raw)) + raw[8:],
        "huge_length": struct.pack("<Q", 2**62) + raw[8:],
        "not_json": struct.pack("<Q", size) + b"{" * size + raw[8 + size :],
        "not_object": header_file([1, 2]),
        "data_truncated": raw[:-1],
        "wrong_byte_count": header_file({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}),
        "unknown_dtype": header_file({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}),
        "missing_field": header_file({"w": {"dtype": "F32", "shape": [1]}}),
        "bad_metadata": header_file({"__metadata__": {"a": 1}}),
    }
    paths = {}
    for name, content in variants.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize(
    "variant",
    ["short", "length_past_end", "huge_length", "not_json", "not_object", "data_truncated",
     "wrong_byte_count", "unknown_dtype", "missing_field", "bad_metadata"],
)
def test_corrupt_header_raises_naming_the_file(tmp_path, variant):
    path = _corrupt_header_files(tmp_path)[variant]
    with pytest.raises(ValueError, match=str(path.name)):
        read_safetensors_header(path)
    with pytest.raises(ValueError, match=str(path.name)):
        SafetensorsReader(path)


def test_reader_returns_owned_equal_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _all_dtypes_state_dict()
    save_file(tensors, path, metadata={"format": "pt"})
    expected = load_file(path)

    with SafetensorsReader(path) as reader:
        assert reader.metadata == {"format": "pt"}
        assert sorted(reader.keys()) == sorted(tensors)
        assert [spec.name for spec in reader.specs] == reader.keys()
        _assert_same({name: reader.get(name) for name in reader.keys()}, expected)

        first = reader.get("F32.matrix")
        assert first.untyped_storage().nbytes() == first.nbytes
        first += 1
        assert torch.equal(reader.get("F32.matrix"), expected["F32.matrix"])
        with pytest.raises(KeyError, match="nope"):
            reader.get("nope")


def test_reader_reads_what_writer_wrote(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _all_dtypes_state_dict()
    write_safetensors(path, TensorSource.from_state_dict(tensors))
    with SafetensorsReader(path) as reader:
        assert reader.keys() == list(tensors)
        _assert_same({name: reader.get(name) for name in reader.keys()}, tensors)


@pytest.mark.parametrize(
    "wrong",
    [torch.zeros(2, 3, dtype=torch.float16), torch.zeros(3, 2), torch.zeros(6)],
    ids=["dtype", "shape", "flattened"],
)
def test_spec_mismatch_names_the_tensor(tmp_path, wrong):
    specs = [TensorSpec("fine", torch.float32, (1,)), TensorSpec("layer.7.weight", torch.float32, (2, 3))]
    source = TensorSource(specs, lambda name: torch.zeros(1) if name == "fine" else wrong)
    with pytest.raises(ValueError, match=r"layer\.7\.weight"):
        write_safetensors(tmp_path / "model.safetensors", source)


def test_rejects_bad_names_and_metadata(tmp_path):
    duplicate = TensorSource([TensorSpec("a", torch.float32, (1,))] * 2, lambda name: torch.zeros(1))
    with pytest.raises(ValueError, match="'a'"):
        write_safetensors(tmp_path / "dup.safetensors", duplicate)
    one = TensorSource.from_state_dict({"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="strings"):
        write_safetensors(tmp_path / "meta.safetensors", one, metadata={"epochs": 3})


def test_writer_streams_in_order_and_reports_progress(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float32, (i + 1, 3)) for i in range(5)]
    handed_out: list[weakref.ref] = []
    order = []

    def get(name):
        assert all(ref() is None for ref in handed_out), "previous tensor still alive when the next is asked for"
        order.append(name)
        tensor = torch.full(next(s.shape for s in specs if s.name == name), float(len(order)))
        handed_out.append(weakref.ref(tensor))
        return tensor

    done = []
    path = tmp_path / "model.safetensors"
    write_safetensors(path, TensorSource(specs, get), progress=done.append)
    assert order == [s.name for s in specs]
    assert done == [s.nbytes for s in specs]
    loaded = load_file(path)
    for i, spec in enumerate(specs):
        assert torch.equal(loaded[spec.name], torch.full(spec.shape, float(i + 1)))


_MEMORY_SCRIPT = """
import sys, torch
from merge_hooks.io.safetensors_io import SafetensorsReader, write_safetensors
from merge_hooks.tensors import TensorSource, TensorSpec

def peak_mb():
    # Not ru_maxrss: Linux carries the spawning process's peak across exec, so under pytest it
    # would start at pytest's own peak and hide anything smaller. VmHWM starts fresh at exec.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

n = 50 * 2**20 // 4
specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i in range(6)]
source = TensorSource(specs, lambda name: torch.full((n,), float(name[1:])))
base = peak_mb()
if sys.argv[1] == "write":
    write_safetensors(sys.argv[2], source)
else:
    with SafetensorsReader(sys.argv[2]) as reader:
        for spec in reader.specs:
            tensor = reader.get(spec.name)
            # min and max read every page, as merging would, without allocating a second tensor.
            assert tensor.min().item() == tensor.max().item() == float(spec.name[1:])
            del tensor
print(peak_mb() - base)
"""


def _peak_rss_above_baseline_mb(mode: str, path: Path) -> float:
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, mode, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_write_and_read_memory_stay_near_one_tensor(tmp_path):
    path = tmp_path / "big.safetensors"
    written = _peak_rss_above_baseline_mb("write", path)
    assert path.stat().st_size > 300 * MB
    with safe_open(path, framework="pt") as f:
        assert f.get_slice("t5")[-3:].tolist() == [5.0, 5.0, 5.0]
    # Six 50 MB tensors: holding them all would be 300 MB; streaming needs about one.
    assert written < 3 * 50 + 100, f"writer peak RSS {written:.0f} MB above baseline"

    read = _peak_rss_above_baseline_mb("read", path)
    assert read < 2 * 50 + 100, f"reader peak RSS {read:.0f} MB above baseline"

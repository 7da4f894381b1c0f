"""merge_hooks.io.safetensors_io: the header parser, the pread reader and the streaming writer."""

import json
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import TORCH_DTYPES, all_dtypes_state_dict, assert_same_bits, bits, run_peak_mb_script
from merge_hooks.io.safetensors_io import (
    SafetensorsReader,
    read_safetensors_header,
    write_safetensors,
)
from merge_hooks.tensors import TensorSource, TensorSpec

MB = 2**20


def test_dtype_table_covers_what_safetensors_supports():
    for code in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"):
        assert code in TORCH_DTYPES
    assert TORCH_DTYPES["BF16"] is torch.bfloat16 and TORCH_DTYPES["F8_E4M3"] is torch.float8_e4m3fn


def test_write_matches_save_file_for_every_dtype(tmp_path):
    tensors = all_dtypes_state_dict()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, TensorSource.from_state_dict(tensors), metadata={"merged_by": "test"})
    save_file(tensors, theirs, metadata={"format": "pt", "merged_by": "test"})

    assert_same_bits(load_file(ours), load_file(theirs))
    assert_same_bits(load_file(ours), tensors)
    with safe_open(ours, framework="pt") as f, safe_open(theirs, framework="pt") as g:
        assert f.metadata() == g.metadata() == {"format": "pt", "merged_by": "test"}
        assert_same_bits({k: f.get_tensor(k) for k in f.keys()}, {k: g.get_tensor(k) for k in g.keys()})


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
        assert raw[start:end] == bytes(bits(tensors[name]).numpy())


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
    tensors = all_dtypes_state_dict()
    save_file(tensors, path, metadata={"format": "pt"})
    expected = load_file(path)

    with SafetensorsReader(path) as reader:
        assert reader.metadata == {"format": "pt"}
        assert sorted(reader.keys()) == sorted(tensors)
        assert [spec.name for spec in reader.specs] == reader.keys()
        assert_same_bits({name: reader.get(name) for name in reader.keys()}, expected)

        first = reader.get("F32.matrix")
        assert first.untyped_storage().nbytes() == first.nbytes
        first += 1
        assert torch.equal(reader.get("F32.matrix"), expected["F32.matrix"])
        with pytest.raises(KeyError, match="nope"):
            reader.get("nope")


def test_reader_reads_what_writer_wrote(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = all_dtypes_state_dict()
    write_safetensors(path, TensorSource.from_state_dict(tensors))
    with SafetensorsReader(path) as reader:
        assert reader.keys() == list(tensors)
        assert_same_bits({name: reader.get(name) for name in reader.keys()}, tensors)


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


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_write_and_read_memory_stay_near_one_tensor(tmp_path):
    path = tmp_path / "big.safetensors"
    written = run_peak_mb_script(_MEMORY_SCRIPT, "write", path)
    assert path.stat().st_size > 300 * MB
    with safe_open(path, framework="pt") as f:
        assert f.get_slice("t5")[-3:].tolist() == [5.0, 5.0, 5.0]
    # Six 50 MB tensors: holding them all would be 300 MB; streaming needs about one.
    assert written < 3 * 50 + 100, f"writer peak RSS {written:.0f} MB above baseline"

    read = run_peak_mb_script(_MEMORY_SCRIPT, "read", path)
    assert read < 2 * 50 + 100, f"reader peak RSS {read:.0f} MB above baseline"


def test_element_reader_reads_pieces_of_a_range_and_nothing_outside_it(tmp_path):
    import numpy as np

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(7.0), "w": torch.arange(60, dtype=torch.bfloat16).reshape(6, 10)}, str(path))
    with SafetensorsReader(path) as reader:
        read = reader.element_reader("w", 20, 25)  # rows 2-4 of w, without the last 5 elements
        piece = np.empty(8, np.uint16)
        read(3, memoryview(piece.view(np.uint8)))
        expected = torch.arange(23, 31, dtype=torch.bfloat16).view(torch.uint16).numpy()
        assert np.array_equal(piece, expected)
        with pytest.raises(ValueError, match="outside the elements 20:45 of tensor 'w'"):
            read(20, memoryview(piece.view(np.uint8)))  # 40:48 runs past the range
        with pytest.raises(ValueError, match="out of range for tensor 'w'"):
            reader.element_reader("w", 50, 11)

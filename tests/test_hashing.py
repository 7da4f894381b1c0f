"""Weight files are hashed while they are written: the digests equal a fresh BLAKE3 of the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from blake3 import blake3

from helpers import merge
from merge_hooks.io import hashing
from merge_hooks.io.hashing import HashingFile
from merge_hooks.io.safetensors_io import write_safetensors
from merge_hooks.io.torch_io import write_torch
from merge_hooks.tensors import TensorSource


def _blake3(path: Path) -> str:
    return blake3(path.read_bytes()).hexdigest()


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a": torch.randn(300, 70), "b": torch.arange(11), "c": torch.randn(5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 3), "d": torch.randn(1000, 33)}


@pytest.mark.parametrize("writer, name", [(write_safetensors, "model.safetensors"), (write_torch, "pytorch_model.bin")])
def test_writers_return_the_files_digest(writer, name, tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "PENDING", 1)  # the writer waits on the hashing thread at every write
    path = tmp_path / name
    digest = writer(path, TensorSource.from_state_dict(_tensors()), digest=True)
    assert digest == _blake3(path) == hashing.hash_file(path)
    assert writer(tmp_path / f"again-{name}", TensorSource.from_state_dict(_tensors())) is None


def test_hash_file_knows_the_manifest_algorithms(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"merge" * 100_000)
    assert hashing.hash_file(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashing.hash_file(path) == _blake3(path)
    with pytest.raises(ValueError, match="unknown digest algorithm 'md5'"):
        hashing.hash_file(path, "md5")


def test_hashing_thread_stops_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError, match="writer failed"):
        with open(tmp_path / "partial", "wb") as raw, HashingFile(raw) as f:
            f.write(b"x" * 10_000)
            raise RuntimeError("writer failed")
    assert not f._thread.is_alive()


def test_hashing_file_digests_every_write_in_order(tmp_path):
    parts = [bytes([i]) * (i * 1000 + 1) for i in range(50)] + [memoryview(torch.arange(1000.0).numpy()).cast("B")]
    with open(tmp_path / "out", "wb") as raw, HashingFile(raw) as f:
        for part in parts:
            f.write(part)
        assert f.tell() == sum(len(bytes(p)) for p in parts)
        digest = f.hexdigest()
    assert digest == _blake3(tmp_path / "out") == blake3(b"".join(bytes(p) for p in parts)).hexdigest()


@pytest.mark.parametrize("save_format", ["safetensors", "bin"])
def test_merge_does_not_read_its_weight_files_again_for_the_manifest(save_format, make_models, tmp_path, monkeypatch):
    import merge_hooks.card as card

    read = []
    real = card.hash_file
    monkeypatch.setattr(card, "hash_file", lambda path, *a: read.append(Path(path).name) or real(path, *a))
    out = tmp_path / "merged"
    merge(make_models("bert-encoder", 2), "encoder", out, weights=[0.5, 0.5], save_format=save_format,
          max_shard_size="20KB")
    weight_files = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors"))
    assert len(weight_files) > 1 and not set(weight_files) & set(read)
    manifest = json.loads((out / "merge_manifest.json").read_text())["files"]
    assert set(weight_files) <= set(manifest)
    for name, entry in manifest.items():
        assert entry["blake3"] == _blake3(out / name) and entry["size"] == (out / name).stat().st_size, name


def test_convert_does_not_read_its_weight_files_again_for_the_manifest(make_models, tmp_path, monkeypatch):
    import merge_hooks.card as card
    from merge_hooks.convert import convert

    merged, converted = tmp_path / "merged", tmp_path / "converted"
    merge(make_models("bert-encoder", 2), "encoder", merged, weights=[0.5, 0.5])
    read = []
    real = card.hash_file
    monkeypatch.setattr(card, "hash_file", lambda path, *a: read.append(Path(path).name) or real(path, *a))
    convert(merged, converted, save_format="bin", max_shard_size="20KB", quiet=True)
    weight_files = sorted(p.name for p in converted.iterdir() if p.suffix == ".bin")
    assert len(weight_files) > 1 and not set(weight_files) & set(read)
    manifest = json.loads((converted / "merge_manifest.json").read_text())["files"]
    assert "model.safetensors" not in manifest
    for name in weight_files:
        assert manifest[name]["blake3"] == _blake3(converted / name)


def test_writeback_starts_through_libc_and_leaves_the_data_intact(tmp_path):
    from merge_hooks.io.libc import libc_function

    assert libc_function("no_such_function_in_libc") is None
    assert libc_function("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint") is not None  # Linux
    data = bytes(range(256)) * 4096
    with open(tmp_path / "f", "wb") as f:
        f.write(data)
        f.flush()
        hashing.start_writeback(f.fileno(), 0, len(data))
        hashing.start_writeback(-1, 0, 1)  # a failing call is only logged
    assert (tmp_path / "f").read_bytes() == data

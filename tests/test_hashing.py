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
from merge_hooks.io.hashing import WeightFile
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


@pytest.mark.parametrize("direct", ["1", "0"])
def test_threads_stop_when_the_writer_fails(direct, tmp_path, monkeypatch):
    monkeypatch.setenv(hashing.DIRECT_ENV, direct)
    with pytest.raises(RuntimeError, match="writer failed"):
        with open(tmp_path / "partial", "wb") as raw, WeightFile(raw) as f:
            f.write(b"x" * 10_000)
            raise RuntimeError("writer failed")
    threads = [f._thread, f._direct and f._direct._thread]
    assert any(threads) and not any(t.is_alive() for t in threads if t)


def test_hashing_file_digests_every_write_in_order(tmp_path):
    parts = [bytes([i]) * (i * 1000 + 1) for i in range(50)] + [memoryview(torch.arange(1000.0).numpy()).cast("B")]
    with open(tmp_path / "out", "wb") as raw, WeightFile(raw) as f:
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


@pytest.mark.parametrize("direct", ["1", "0"])
def test_direct_and_page_cache_writes_give_the_same_bytes(direct, tmp_path, monkeypatch):
    """O_DIRECT writes go through small aligned buffers here, so parts straddle buffer and alignment edges."""
    monkeypatch.setenv(hashing.DIRECT_ENV, direct)
    monkeypatch.setattr(hashing, "DIRECT_CHUNK", 2 * hashing.DIRECT_ALIGNMENT)
    sizes = [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 3, 20000, 5]
    parts = [bytes([i + 1]) * size for i, size in enumerate(sizes)]
    for count in range(len(parts) + 1):  # every length of file, aligned or not, including empty
        path = tmp_path / f"out-{count}"
        with open(path, "wb") as raw, WeightFile(raw) as f:
            if direct == "0":
                assert f._direct is None
            for part in parts[:count]:
                f.write(part)
            assert f.tell() == sum(map(len, parts[:count]))
            digest = f.hexdigest()
        expected = b"".join(parts[:count])
        assert path.read_bytes() == expected
        assert digest == blake3(expected).hexdigest()


def test_a_failed_direct_write_is_raised_in_the_writer(tmp_path, monkeypatch):
    import os

    with open(tmp_path / "probe", "wb") as raw, WeightFile(raw, None) as f:
        if f._direct is None:
            pytest.skip("this file system refuses O_DIRECT")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with open(tmp_path / "out", "wb") as raw, WeightFile(raw) as f:
            monkeypatch.setattr(os, "pwrite", full_disk)  # after the probe write at open
            for _ in range(3 * hashing.DIRECT_BUFFERS):
                f.write(b"x" * hashing.DIRECT_CHUNK)
    assert f._thread is None and not f._direct._thread.is_alive()  # hashed in the writer's thread

"""Weight files are hashed while they are written: the digests equal a fresh sha256 of the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from helpers import merge
from merge_hooks.io import hashing
from merge_hooks.io.hashing import TrailingHasher
from merge_hooks.io.safetensors_io import write_safetensors
from merge_hooks.io.torch_io import write_torch
from merge_hooks.tensors import TensorSource


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a": torch.randn(300, 70), "b": torch.arange(11), "c": torch.randn(5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 3), "d": torch.randn(1000, 33)}


@pytest.mark.parametrize("writer, name", [(write_safetensors, "model.safetensors"), (write_torch, "pytorch_model.bin")])
def test_writers_return_the_files_sha256(writer, name, tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "CHUNK", 4096)  # many chunks, hashing racing the writer
    path = tmp_path / name
    digest = writer(path, TensorSource.from_state_dict(_tensors()), sha256=True)
    assert digest == _sha256(path)
    assert writer(tmp_path / f"again-{name}", TensorSource.from_state_dict(_tensors())) is None


def test_hasher_stops_when_the_writer_fails(tmp_path):
    path = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="writer failed"):
        with open(path, "wb") as f, TrailingHasher(path) as hasher:
            f.write(b"x" * 10_000)
            f.flush()
            hasher.advance(10_000)
            raise RuntimeError("writer failed")
    assert not hasher._thread.is_alive()


def test_hasher_reports_a_file_shorter_than_announced(tmp_path):
    path = tmp_path / "short"
    with open(path, "wb") as f, TrailingHasher(path) as hasher:
        f.write(b"x" * 100)
        f.flush()
        with pytest.raises(OSError, match="file ended at byte 100"):
            hasher.finish(200)


@pytest.mark.parametrize("save_format", ["safetensors", "bin"])
def test_merge_does_not_read_its_weight_files_again_for_the_manifest(save_format, make_models, tmp_path, monkeypatch):
    import json

    import merge_hooks.card as card

    read = []
    real = card.sha256_file
    monkeypatch.setattr(card, "sha256_file", lambda path: read.append(Path(path).name) or real(path))
    out = tmp_path / "merged"
    merge(make_models("bert-encoder", 2), "encoder", out, weights=[0.5, 0.5], save_format=save_format,
          max_shard_size="20KB")
    weight_files = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors"))
    assert len(weight_files) > 1 and not set(weight_files) & set(read)
    manifest = json.loads((out / "merge_manifest.json").read_text())["files"]
    assert set(weight_files) <= set(manifest)
    for name, entry in manifest.items():
        assert entry["sha256"] == _sha256(out / name) and entry["size"] == (out / name).stat().st_size, name


def test_convert_does_not_read_its_weight_files_again_for_the_manifest(make_models, tmp_path, monkeypatch):
    import json

    import merge_hooks.card as card
    from merge_hooks.convert import convert

    merged, converted = tmp_path / "merged", tmp_path / "converted"
    merge(make_models("bert-encoder", 2), "encoder", merged, weights=[0.5, 0.5])
    read = []
    real = card.sha256_file
    monkeypatch.setattr(card, "sha256_file", lambda path: read.append(Path(path).name) or real(path))
    convert(merged, converted, save_format="bin", max_shard_size="20KB", quiet=True)
    weight_files = sorted(p.name for p in converted.iterdir() if p.suffix == ".bin")
    assert len(weight_files) > 1 and not set(weight_files) & set(read)
    manifest = json.loads((converted / "merge_manifest.json").read_text())["files"]
    assert "model.safetensors" not in manifest
    for name in weight_files:
        assert manifest[name]["sha256"] == _sha256(converted / name)

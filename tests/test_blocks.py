"""Row blocks: merging, converting and teeing in blocks gives the bytes of whole-tensor work.

The test models are tiny, so with the default block size every tensor is one block; these tests set
``MERGE_HOOKS_BLOCK_SIZE`` to a few hundred bytes, which cuts every matrix into many blocks (with a
short last block), and compare the files with those of the default run.
"""

from __future__ import annotations

import threading

import pytest
import torch

from helpers import merge
from merge_hooks.engines.stream import BLOCK_SIZE_ENV
from merge_hooks.errors import MergeHooksError
from merge_hooks.io.safetensors_io import write_safetensors
from merge_hooks.io.torch_io import write_torch
from merge_hooks.tensors import TensorSource, TensorSpec, row_ranges, tee

SMALL = "300"  # bytes of float32 work per block: 2 to 75 rows of the test models' matrices


@pytest.mark.parametrize("shape", [(), (1,), (7,), (1, 5), (2, 5), (9, 3), (10, 64), (1000, 1), (0, 4)])
@pytest.mark.parametrize("budget", [8, 100, 1000, 10**6])
def test_row_ranges_cover_every_row_within_the_budget(shape, budget):
    ranges = row_ranges(TensorSpec("t", "float32", shape), budget)
    if not shape:
        assert ranges == [None]
        return
    assert ranges[0][0] == 0 and ranges[-1][1] == shape[0]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    row_bytes = 4 * (shape[1] if len(shape) > 1 else 1)
    step = max(2, budget // row_bytes)
    for start, stop in ranges:
        # One row only when the tensor has one; the last block may take one extra row instead.
        assert stop - start >= min(2, shape[0])
        assert stop - start <= step + 1


FAMILIES = [
    ("bert-encoder", torch.float32, "safetensors", "encoder"),
    ("llama-decoder", torch.bfloat16, "safetensors", "decoder"),
    ("llama-decoder", torch.float16, "bin", "decoder"),
    ("bert-encoder", torch.float32, "bin", "encoder"),
]


@pytest.mark.parametrize(("family", "dtype", "weights_format", "model_type"), FAMILIES,
                         ids=[f"{f}-{str(d)[6:]}-{w}" for f, d, w, _ in FAMILIES])
def test_merge_in_blocks_writes_the_same_bytes(family, dtype, weights_format, model_type, make_models, tmp_path,
                                               monkeypatch):
    paths = make_models(family, 3, dtype=dtype, weights_format=weights_format)
    formats = ["safetensors", "bin"]
    merge(paths, model_type, tmp_path / "whole", save_format=formats)
    monkeypatch.setenv(BLOCK_SIZE_ENV, SMALL)
    merge(paths, model_type, tmp_path / "blocks", save_format=formats)
    merge(paths, model_type, tmp_path / "blocks-st", save_format="safetensors")
    for name in ("model.safetensors", "pytorch_model.bin"):
        assert (tmp_path / "blocks" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert (tmp_path / "blocks-st" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors").read_bytes()


def test_convert_in_blocks_writes_the_same_bytes(make_models, tmp_path, monkeypatch):
    from merge_hooks.convert import convert

    source = make_models("llama-decoder", 1, dtype=torch.float32, weights_format="bin")[0]
    convert(source, tmp_path / "whole", save_format="safetensors", dtype="bfloat16", quiet=True)
    monkeypatch.setenv(BLOCK_SIZE_ENV, SMALL)
    convert(source, tmp_path / "blocks", save_format="safetensors", dtype="bfloat16", quiet=True)
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors").read_bytes()


def test_a_bad_block_size_is_a_one_line_error(make_models, tmp_path, monkeypatch):
    paths = make_models("bert-encoder", 2)
    monkeypatch.setenv(BLOCK_SIZE_ENV, "lots")
    with pytest.raises(MergeHooksError, match=f"{BLOCK_SIZE_ENV}='lots'"):
        merge(paths, "encoder", tmp_path / "out", weights=[0.5, 0.5])
    assert not (tmp_path / "out").exists()


def _counting_source(tensors: dict[str, torch.Tensor], block_bytes: int) -> tuple[TensorSource, list]:
    calls = []
    lock = threading.Lock()

    def rows(name, start, stop):
        with lock:
            calls.append((name, start, stop))
        return tensors[name][start:stop].clone()

    def get(name):
        with lock:
            calls.append((name, None, None))
        return tensors[name].clone()

    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    return TensorSource(specs=specs, get=get, rows=rows, block_bytes=block_bytes), calls


def test_tee_computes_each_block_once_for_every_writer(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 16, generator=generator), "scalar": torch.tensor(2.5),
               "b": torch.randn(5, 3, generator=generator).to(torch.bfloat16), "c": torch.arange(40)}
    source, calls = _counting_source(tensors, block_bytes=256)
    direct = TensorSource.from_state_dict(tensors)
    (tmp_path / "direct").mkdir()
    (tmp_path / "tee").mkdir()
    write_safetensors(tmp_path / "direct" / "model.safetensors", direct)
    write_torch(tmp_path / "direct" / "pytorch_model.bin", direct)

    branches = tee(source, 3, budget=512)
    whole: dict[str, torch.Tensor] = {}

    def run(job, branch):
        try:
            job(branch)
        finally:
            branch.close()

    jobs = [
        lambda b: write_safetensors(tmp_path / "tee" / "model.safetensors", b),
        lambda b: write_torch(tmp_path / "tee" / "pytorch_model.bin", b),
        lambda b: whole.update({spec.name: b.get(spec.name) for spec in b.specs}),  # a writer taking whole tensors
    ]
    threads = [threading.Thread(target=run, args=(job, branch)) for job, branch in zip(jobs, branches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for name in ("model.safetensors", "pytorch_model.bin"):
        assert (tmp_path / "tee" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    assert all(torch.equal(whole[k], v) for k, v in tensors.items()) and sorted(whole) == sorted(tensors)
    expected = [(spec.name, *(rows or (None, None))) for spec in source.specs for rows in source.block_ranges(spec)]
    assert sorted(calls, key=str) == sorted(expected, key=str)  # each block once, whoever asked first
    assert len(expected) > 2 * len(tensors)  # the matrices were really cut into blocks


@pytest.mark.parametrize("variant", ["plain", "dora", "embedding", "modules_to_save"])
def test_adapter_deltas_in_blocks_are_the_whole_deltas(variant, make_models, tmp_path, monkeypatch):
    """Rows of B @ A per block (columns for embeddings), DoRA's norms per row; DoRA on an embedding is merged whole."""
    from test_adapters import VARIANTS, make_adapter, merge_adapter

    base = make_models("llama-decoder", 1)[0]
    adapter = make_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    whole = merge_adapter(base, [adapter], tmp_path / "whole")
    monkeypatch.setenv(BLOCK_SIZE_ENV, SMALL)
    blocks = merge_adapter(base, [adapter], tmp_path / "blocks")
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors").read_bytes()
    assert sorted(blocks) == sorted(whole)

"""The stream engine's numpy arithmetic gives torch's bits, and a safetensors merge never imports torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import merge_in_subprocess
from merge_hooks import dtypes
from merge_hooks.engines.stream import _BlockPool, _Buffers, _NumpyMath, _TorchMath, stream_merge
from merge_hooks.preflight import load_inputs

def _float32_cases(n_random: int = 200_000) -> np.ndarray:
    """Random values over the whole exponent range plus the cases rounding gets wrong first."""
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, n_random, dtype=np.uint64).astype(np.uint32)
    random_bits = random_bits[~np.isnan(random_bits.view(np.float32))]
    exact = [0.0, -0.0, 1.0, -2.5, np.inf, -np.inf,
             65504.0, 65519.99, 65520.0, -65520.0, 1e6,  # float16 max, its rounding edge, overflow
             6e-8, 5.96e-8, 2.98e-8, 1e-10, 3.0e-5,  # float16 subnormals and underflow
             3.3895e38, np.finfo(np.float32).max, 1e-45, 1e-39]  # bfloat16 overflow, float32 subnormals
    # Ties and near-ties for bfloat16 (low 16 bits 0x8000 with even and odd kept bits) and for float16.
    base = rng.integers(0x00800000, 0x7F000000, 2000, dtype=np.uint64).astype(np.uint32) & 0xFFFF0000
    ties = np.concatenate([base | 0x8000, base | 0x18000, base | 0x7FFF, base | 0x8001,
                           (base & 0xFFFFE000) | 0x1000, (base & 0xFFFFE000) | 0x3000])
    values = np.concatenate([random_bits.view(np.float32), np.array(exact, dtype=np.float32), ties.view(np.float32)])
    return np.concatenate([values, -values])


@pytest.mark.parametrize("size", [7, None], ids=["short", "long"])  # scalar and vectorised torch kernels
@pytest.mark.parametrize("target", [dtypes.bfloat16, dtypes.float16])
def test_rounding_to_half_precision_matches_torch(target, size):
    values = _float32_cases()[:size]
    ours = _NumpyMath().cast(values.copy(), target, _Buffers(_NumpyMath()))
    theirs = torch.from_numpy(values.copy()).to(target.torch).view(torch.int16)
    assert ours.dtype == target.storage
    np.testing.assert_array_equal(ours.view(np.int16), theirs.numpy())


@pytest.mark.parametrize("source", [dtypes.bfloat16, dtypes.float16])
def test_widening_half_precision_matches_torch(source):
    bits = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16)
    half = bits if source is dtypes.bfloat16 else bits.view(np.float16)
    expected = torch.from_numpy(bits.view(np.int16).copy()).view(source.torch).float().numpy()
    ours = _NumpyMath().widen(half, np.empty(bits.shape, np.float32), source)
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(ours.view(np.uint32)[finite], expected.view(np.uint32)[finite])
    assert np.isnan(ours[~finite]).all()


@pytest.mark.parametrize("weights", [[1 / 3] * 3, [0.5, 0.3, 0.2], [0.7, 0.3], [-0.25, 1.25]])
def test_weighted_sum_matches_torch(weights):
    rng = np.random.default_rng(1)
    terms = [rng.standard_normal(10_001).astype(np.float32) * 10.0 ** rng.integers(-30, 30) for _ in weights]
    results = []
    for ops, wrap in ((_NumpyMath(), lambda a: a.copy()), (_TorchMath(), lambda a: torch.from_numpy(a.copy()))):
        acc = ops.scale(wrap(terms[0]), weights[0])
        for w, t in zip(weights[1:], terms[1:]):
            acc = ops.add(acc, ops.scale(wrap(t), w))
        results.append(np.asarray(acc).view(np.uint32))
    np.testing.assert_array_equal(*results)


@pytest.mark.parametrize(
    ("inputs", "output"),
    [(torch.float32, None), (torch.float32, "bfloat16"), (torch.float32, "float16"),
     (torch.bfloat16, None), (torch.bfloat16, "float32"), (torch.float16, None), (torch.float16, "bfloat16")],
)
@pytest.mark.parametrize("piece", [None, 7], ids=["one-piece", "pieces-of-7"])
def test_stream_merge_on_arrays_equals_torch(inputs, output, piece, make_models, monkeypatch):
    if piece:  # blocks worked through in many pieces, the last one short
        monkeypatch.setattr("merge_hooks.engines.stream.PIECE", piece)
    paths = make_models("llama-decoder", 3, dtype=inputs)
    merged = {}
    for arrays in (True, False):
        models = load_inputs([str(p) for p in paths], trust_remote_code=False)
        result = stream_merge(models, [0.5, 0.3, 0.2], dtype=dtypes.of(output) if output else None, arrays=arrays)
        try:
            merged[arrays] = {spec.name: result.source.get(spec.name) for spec in result.source.specs}
        finally:
            result.close()
    assert list(merged[True]) == list(merged[False])
    for name, tensor in merged[False].items():
        array = merged[True][name]
        assert isinstance(array, np.ndarray), name
        assert array.shape == tuple(tensor.shape) and array.dtype.itemsize == tensor.dtype.itemsize, name
        np.testing.assert_array_equal(array.view(np.uint8).reshape(-1), tensor.reshape(-1).view(torch.uint8).numpy())


def _run_merge_and_report_torch(paths, out: Path, save_format: str) -> str:
    recipe = {"model_type": "encoder", "engine": "stream", "output": {"path": str(out), "save_format": save_format},
              "models": [{"path": str(paths[0]), "weight": 0.5}, {"path": str(paths[1]), "weight": 0.5}]}
    return merge_in_subprocess(recipe, "print('torch' in sys.modules)")


def test_merging_safetensors_never_imports_torch(make_models, tmp_path):
    from safetensors.torch import load_file

    paths = make_models("bert-encoder", 2, dtype=torch.bfloat16)
    for save_format in ("safetensors", "bin", "both"):
        assert _run_merge_and_report_torch(paths, tmp_path / save_format, save_format) == "False", save_format
    # .bin inputs are read with torch.load, so torch is imported; the tensors are the same.
    bin_inputs = make_models("bert-encoder", 2, dtype=torch.bfloat16, weights_format="bin")
    assert _run_merge_and_report_torch(bin_inputs, tmp_path / "from-bin", "bin") == "True"
    fast = load_file(tmp_path / "safetensors" / "model.safetensors")
    for folder in ("bin", "from-bin"):
        slow = torch.load(tmp_path / folder / "pytorch_model.bin", weights_only=True)
        assert sorted(fast) == sorted(slow)
        assert all(torch.equal(fast[k].view(torch.uint8), slow[k].view(torch.uint8)) for k in fast), folder


def test_pooled_blocks_are_reused_only_once_nothing_holds_them():
    pool = _BlockPool(4096)
    first = pool.empty(dtypes.float32, (8, 16))
    view = memoryview(first.reshape(-1).view(np.uint8))  # as a writer or the hashing thread holds a block
    del first
    second = pool.empty(dtypes.bfloat16, (4, 8))
    assert not np.shares_memory(second, np.frombuffer(view, np.uint8))
    del view
    third = pool.empty(dtypes.float16, (2, 3))
    fourth = pool.empty(dtypes.float16, (2, 3))
    assert np.shares_memory(third, np.frombuffer(memoryview(pool._arrays[0]), np.uint8))
    assert not np.shares_memory(third, fourth)
    assert pool.empty(dtypes.float32, (2048,)).size == 2048  # larger than the pool's arrays: a new one
    assert len(pool._arrays) == 3
    for _ in range(2 * _BlockPool.LIMIT):  # every pooled array held: new arrays, the pool stops growing
        held = [pool.empty(dtypes.float32, (10,)) for _ in range(_BlockPool.LIMIT + 1)]
        assert len({h.__array_interface__["data"][0] for h in held}) == len(held)
    assert len(pool._arrays) == _BlockPool.LIMIT

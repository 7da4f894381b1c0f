"""Shards are planned as huggingface_hub plans them, without importing it."""

from __future__ import annotations

import random

import pytest
from huggingface_hub import split_state_dict_into_shards_factory

from merge_hooks.sharding import plan_shards
from merge_hooks.tensors import TensorSource, TensorSpec


def _huggingface_plan(specs: list[TensorSpec], weights_name: str, max_shard_size: int) -> dict[str, list[str]]:
    stem, ext = weights_name.rsplit(".", 1)
    split = split_state_dict_into_shards_factory(
        {spec.name: spec for spec in specs},
        get_storage_size=lambda spec: spec.nbytes,
        get_storage_id=lambda spec: None,
        filename_pattern=f"{stem}{{suffix}}.{ext}",
        max_shard_size=max_shard_size,
    )
    return {name: list(tensors) for name, tensors in split.filename_to_tensors.items()}


@pytest.mark.parametrize("seed", range(40))
def test_plan_matches_huggingface_hub(seed):
    rng = random.Random(seed)
    specs = [TensorSpec(f"t{i}", "float32", (rng.choice([1, 3, 10, 40, 100, 250]),)) for i in range(rng.randint(1, 30))]
    max_shard_size = rng.choice([8, 100, 400, 1000, 10**6])  # some tensors larger than a shard, some plans one file
    weights_name = rng.choice(["model.safetensors", "pytorch_model.bin"])
    ours = plan_shards(TensorSource(specs=specs, get=None), weights_name=weights_name, max_shard_size=max_shard_size)
    assert ours == _huggingface_plan(specs, weights_name, max_shard_size)
    assert list(ours.items()) == list(_huggingface_plan(specs, weights_name, max_shard_size).items())

"""Every model type x format x engine: the output loads with transformers and equals LM_Cocktail's merge."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import FAMILY, WEIGHTS3, assert_same_tensors, leftovers, lm_cocktail_state_dict, load_state_dict, merge, weight_files

FORMAT_FILES = {
    "safetensors": ["model.safetensors"],
    "bin": ["pytorch_model.bin"],
    "both": ["model.safetensors", "pytorch_model.bin"],
}


@pytest.fixture(scope="session")
def reference(make_models):
    """LM_Cocktail's own mix_models result per model type, computed once."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            paths = make_models(FAMILY[model_type], 3, pooling="cls" if model_type == "encoder" else None)
            cache[model_type] = (paths, lm_cocktail_state_dict("mix_models", paths, model_type, WEIGHTS3))
        return cache[model_type]

    return get


@pytest.mark.parametrize("engine", ["stream", "cocktail"])
@pytest.mark.parametrize("save_format", ["safetensors", "bin", "both"])
@pytest.mark.parametrize("model_type", ["encoder", "reranker", "decoder"])
def test_output_equals_lm_cocktail(model_type, save_format, engine, reference, tmp_path):
    paths, expected = reference(model_type)
    out = tmp_path / "merged"
    result = merge(paths, model_type, out, save_format=save_format, engine=engine)

    assert result.output == out
    assert weight_files(out) == FORMAT_FILES[save_format]
    assert_same_tensors(load_state_dict(out, model_type), expected)
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    assert leftovers(tmp_path, "merged") == []


@pytest.mark.parametrize("save_format", ["bin", "safetensors"])
def test_bin_is_a_real_torch_pickle(save_format, reference, tmp_path):
    paths, expected = reference("reranker")
    out = tmp_path / "merged"
    merge(paths, "reranker", out, save_format=save_format)
    if save_format == "bin":
        state_dict = torch.load(out / "pytorch_model.bin", weights_only=True)
    else:
        from safetensors.torch import load_file

        state_dict = load_file(out / "model.safetensors")
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            assert f.metadata()["format"] == "pt"
    assert_same_tensors(state_dict, expected)


@pytest.mark.parametrize("save_format", ["safetensors", "bin"])
def test_sharded_output_reloads(save_format, reference, tmp_path):
    paths, expected = reference("encoder")
    out = tmp_path / "merged"
    merge(paths, "encoder", out, save_format=save_format, max_shard_size="20KB")
    stem, ext = ("model", "safetensors") if save_format == "safetensors" else ("pytorch_model", "bin")
    index = json.loads((out / f"{stem}.{ext}.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"{stem}-00001-of-{len(shards):05d}.{ext}"
    assert all((out / s).is_file() for s in shards)
    assert not (out / f"{stem}.{ext}").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert_same_tensors(load_state_dict(out, "encoder"), expected)


def test_tied_embeddings_written_once_and_tied_on_load(reference, tmp_path):
    from safetensors import safe_open

    from helpers import auto_class

    paths, expected = reference("decoder")
    out = tmp_path / "merged"
    merge(paths, "decoder", out, save_format="safetensors", engine="cocktail")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model = auto_class("decoder").from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (out / "generation_config.json").is_file()


@pytest.fixture(scope="session")
def by_layers_reference(make_models):
    """LM_Cocktail's mix_models_by_layers (slow: it gc.collect()s per tensor per model), computed once."""
    paths = make_models("bert-encoder", 2, pooling="cls")
    return paths, lm_cocktail_state_dict("mix_models_by_layers", paths, "encoder", [0.7, 0.3])


@pytest.mark.parametrize("engine", ["stream", "cocktail"])
def test_mix_models_by_layers_equals_lm_cocktail(engine, by_layers_reference, tmp_path):
    paths, expected = by_layers_reference
    out = tmp_path / "merged"
    merge(paths, "encoder", out, weights=[0.7, 0.3], save_format="bin", method="mix_models_by_layers", engine=engine)
    assert_same_tensors(load_state_dict(out, "encoder"), expected)


def test_inputs_in_bin_and_sharded_layouts(make_models, reference, tmp_path):
    """Inputs saved as .bin shards merge to the same tensors as the safetensors originals."""
    _, expected = reference("encoder")
    sharded_bin = make_models("bert-encoder", 3, weights_format="bin", max_shard_size="20KB", pooling="cls")
    out = tmp_path / "merged"
    merge(sharded_bin, "encoder", out, save_format="safetensors", engine="stream")
    assert_same_tensors(load_state_dict(out, "encoder"), expected)


def test_prefixed_checkpoint_keys_merge_by_loading(make_models, reference, tmp_path):
    _, expected = reference("encoder")
    plain = make_models("bert-encoder", 3, pooling="cls")
    prefixed = make_models("bert-encoder", 3, prefix=True)
    mixed = [plain[0], prefixed[1], prefixed[2]]
    out = tmp_path / "merged"
    merge(mixed, "encoder", out, save_format="bin", engine="stream")
    assert_same_tensors(load_state_dict(out, "encoder"), expected)

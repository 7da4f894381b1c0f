"""The Python API: LM_Cocktail's functions with an output stage, and save() for any model in memory."""

from __future__ import annotations

import json

import pytest
import torch

import merge_hooks
from helpers import assert_same_tensors, auto_class, lm_cocktail_state_dict, load_state_dict, weight_files


def test_mix_models_returns_the_model_and_writes_bin(make_models, tmp_path):
    paths = make_models("bert-reranker", 2)
    out = tmp_path / "merged"
    model = merge_hooks.mix_models(paths, "reranker", [0.6, 0.4], out, save_format="bin")
    expected = lm_cocktail_state_dict("mix_models", paths, "reranker", [0.6, 0.4])
    assert_same_tensors(model.state_dict(), expected)
    assert weight_files(out) == ["pytorch_model.bin"]
    assert_same_tensors(load_state_dict(out, "reranker"), expected)


def test_mix_models_without_output_writes_nothing(make_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = make_models("bert-encoder", 2)
    model = merge_hooks.mix_models(paths, "encoder", [0.5, 0.5])
    assert_same_tensors(model.state_dict(), lm_cocktail_state_dict("mix_models", paths, "encoder", [0.5, 0.5]))
    assert list(tmp_path.iterdir()) == []


def test_mix_models_by_layers_stream_engine_returns_none(make_models, tmp_path):
    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    assert merge_hooks.mix_models_by_layers(paths, "encoder", [0.5, 0.5], out, engine="stream", max_shard_size="30KB") is None
    assert (out / "model.safetensors.index.json").is_file()
    assert_same_tensors(load_state_dict(out, "encoder"), lm_cocktail_state_dict("mix_models", paths, "encoder", [0.5, 0.5]))


def test_api_rejects_bad_weights_before_work(make_models, tmp_path):
    paths = make_models("bert-encoder", 2)
    with pytest.raises(merge_hooks.MergeHooksError, match="must sum to 1"):
        merge_hooks.mix_models(paths, "encoder", [0.1, 0.1], tmp_path / "merged")
    with pytest.raises(merge_hooks.MergeHooksError, match="2 models but 3 weights"):
        merge_hooks.mix_models(paths, "encoder", [0.2, 0.3, 0.5], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("save_format", ["bin", "safetensors"])
def test_save_model_in_memory(save_format, make_models, tmp_path):
    paths = make_models("llama-decoder", 1)
    model = auto_class("decoder").from_pretrained(str(paths[0]))
    out = tmp_path / "saved"
    files = dict(merge_hooks.save(model, out, save_format=save_format, source=paths[0], dtype="bfloat16"))
    assert ("pytorch_model.bin" in files) == (save_format == "bin")
    assert "generation_config.json" in files and "tokenizer.json" in files
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    reloaded = auto_class("decoder").from_pretrained(str(out), torch_dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert_same_tensors(reloaded.state_dict(), expected)


def test_save_encoder_writes_sentence_transformers_files(make_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    paths = make_models("bert-encoder", 1)
    model = auto_class("encoder").from_pretrained(str(paths[0]))
    out = tmp_path / "saved"
    merge_hooks.save(model, out, save_format="bin", source=paths[0], model_type="encoder")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    st = SentenceTransformer(str(out), device="cpu")
    assert st.encode(["paris is the capital of france"]).shape == (1, 32)

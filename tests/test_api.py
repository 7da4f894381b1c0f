"""The Python API: LM_Cocktail's functions with an output stage, and save() for any model in memory."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
import runpy
import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

import merge_hooks
from helpers import assert_same_tensors, auto_class, lm_cocktail_state_dict, load_state_dict, weight_files


README_EXAMPLES = runpy.run_path(str(Path(__file__).parent / "data" / "lm_cocktail_readme.py"))


def _like_llama_tokenizer(folder: Path, *, pad_token: Optional[str]) -> None:
    """Give a decoder's tokenizer an eos token and no pad token, as Llama's, or ``pad_token``.

    LM_Cocktail 0.0.4 appends the eos token to each decoder example and pads with the pad token:
    without either it crashes with a TypeError.
    """
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / name).read_text())
        data["eos_token"] = "[SEP]"
        data["pad_token"] = pad_token  # null, not absent: BERT's tokenizer class would default to [PAD]
        (folder / name).write_text(json.dumps(data))


def _models_at_hub_names(make_models, root: Path, *, decoder_pad_token: Optional[str]) -> None:
    """Put a tiny local model at each relative path LM_Cocktail's README names as a hub id."""
    for name, (family, seed) in README_EXAMPLES["MODELS"].items():
        folder = shutil.copytree(make_models(family, seed + 1)[seed], root / name)
        if family == "llama-decoder":
            _like_llama_tokenizer(folder, pad_token=decoder_pad_token)


def _run_example(code: str, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"<{cwd.name}>", "exec"), namespace)
    return {k: v.detach().clone() for k, v in namespace["model"].state_dict().items()}


@pytest.mark.parametrize("example", sorted(README_EXAMPLES["EXAMPLES"]))
def test_lm_cocktail_readme_examples_with_only_the_import_changed(example, make_models, tmp_path, monkeypatch):
    code = README_EXAMPLES["EXAMPLES"][example]
    ours = code.replace("from LM_Cocktail import", "from merge_hooks import")
    assert ours != code
    # Llama's tokenizer has no pad token and LM_Cocktail crashes without one: its copies pad with eos,
    # which is what merge-hooks does when there is none.
    _models_at_hub_names(make_models, tmp_path / "lm_cocktail", decoder_pad_token="[SEP]")
    _models_at_hub_names(make_models, tmp_path / "merge_hooks", decoder_pad_token=None)
    gc.freeze()  # LM_Cocktail's mix_models_by_layers collects garbage per tensor: keep that cheap
    try:
        expected = _run_example(code, tmp_path / "lm_cocktail", monkeypatch)
        actual = _run_example(ours, tmp_path / "merge_hooks", monkeypatch)
    finally:
        gc.unfreeze()
    if "with_data" in example:
        # The weights come from losses on sampled negatives: equal up to float noise.
        assert sorted(actual) == sorted(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6)
    else:
        assert_same_tensors(actual, expected)
    outputs = re.findall(r"output_path=['\"]\./(\w+)", code)
    for side in ("lm_cocktail", "merge_hooks"):
        assert sorted(p.name for p in (tmp_path / side).iterdir() if p.name.startswith("mixed")) == sorted(set(outputs))
    if outputs:
        model_type = re.findall(r"model_type='(\w+)'", code)[-1]
        assert_same_tensors(load_state_dict(tmp_path / "merge_hooks" / outputs[-1], model_type), actual)


@pytest.mark.parametrize("engine", ["auto", "stream", "cocktail"])
def test_every_engine_returns_lm_cocktails_model(engine, make_models, tmp_path):
    paths = make_models("bert-reranker", 2)
    out = tmp_path / "merged"
    model = merge_hooks.mix_models(paths, "reranker", [0.6, 0.4], out, save_format="bin", engine=engine)
    expected = lm_cocktail_state_dict("mix_models", paths, "reranker", [0.6, 0.4])
    assert type(model).__name__ == "BertForSequenceClassification"
    assert_same_tensors(model.state_dict(), expected)
    assert weight_files(out) == ["pytorch_model.bin"]
    assert_same_tensors(load_state_dict(out, "reranker"), expected)


@pytest.mark.parametrize("engine", ["auto", "cocktail"])
def test_mix_models_without_output_writes_nothing(engine, make_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = make_models("llama-decoder", 2)
    model = merge_hooks.mix_models(paths, "decoder", [0.5, 0.5], engine=engine)
    assert_same_tensors(model.state_dict(), lm_cocktail_state_dict("mix_models", paths, "decoder", [0.5, 0.5]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert list(tmp_path.iterdir()) == []


def test_return_model_false_returns_none_and_writes(make_models, tmp_path):
    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    assert merge_hooks.mix_models_by_layers(paths, "encoder", [0.5, 0.5], out, max_shard_size="30KB",
                                            return_model=False) is None
    assert (out / "model.safetensors.index.json").is_file()
    assert_same_tensors(load_state_dict(out, "encoder"), lm_cocktail_state_dict("mix_models", paths, "encoder", [0.5, 0.5]))


def test_reranker_by_layers_runs_on_the_cocktail_engine(make_models, tmp_path):
    # LM_Cocktail 0.0.4's own mix_models_by_layers crashes for rerankers (it never builds the model).
    paths = make_models("bert-reranker", 2)
    model = merge_hooks.mix_models_by_layers(paths, "reranker", [0.3, 0.7], engine="cocktail")
    assert_same_tensors(model.state_dict(), lm_cocktail_state_dict("mix_models", paths, "reranker", [0.3, 0.7]))


ENCODER_EXAMPLES = [
    {"query": f"query {i}", "pos": [f"passage {i}"], "neg": [f"other {i} {j}" for j in range(4)]} for i in range(3)
]


def _merge_info(folder: Path) -> dict:
    return json.loads((folder / "merge_info.json").read_text())


def test_examples_by_position_keyword_alias_and_file(make_models, tmp_path):
    paths = make_models("bert-encoder", 2)
    runs = {
        "position": lambda out: merge_hooks.mix_models_with_data(paths, "encoder", ENCODER_EXAMPLES, 5.0, 2, 64, 3, out, seed=1),
        "example_ata": lambda out: merge_hooks.mix_models_with_data(paths, "encoder", example_ata=ENCODER_EXAMPLES,
                                                                    neg_number=3, max_input_length=64, output_path=out, seed=1),
        "examples": lambda out: merge_hooks.mix_models_with_data(paths, "encoder", examples=ENCODER_EXAMPLES,
                                                                 neg_number=3, max_input_length=64, output_path=out, seed=1),
    }
    jsonl = tmp_path / "examples.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in ENCODER_EXAMPLES))
    runs["file"] = lambda out: merge_hooks.mix_models_with_data(paths, "encoder", str(jsonl), neg_number=3,
                                                                max_input_length=64, output_path=out, seed=1)
    weights = {}
    for name, run in runs.items():
        model = run(tmp_path / name)
        info = _merge_info(tmp_path / name)
        assert info["seed"] == 1 and len(info["weights"]) == 2
        weights[name] = info["weights"]
        assert_same_tensors(load_state_dict(tmp_path / name, "encoder"), model.state_dict())
    assert len({tuple(w) for w in weights.values()}) == 1, weights
    recipe = yaml.safe_load((tmp_path / "position" / "merge_recipe.yaml").read_text())
    assert recipe["examples"] == ENCODER_EXAMPLES and recipe["seed"] == 1
    with pytest.raises(merge_hooks.MergeHooksError, match="not both"):
        merge_hooks.mix_models_with_data(paths, "encoder", ENCODER_EXAMPLES, examples=ENCODER_EXAMPLES)


@pytest.mark.parametrize("engine", ["auto", "cocktail"])
def test_seed_makes_with_data_weights_reproducible(engine, make_models, tmp_path):
    paths = make_models("bert-encoder", 3)
    weights = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        merge_hooks.mix_models_with_data(paths, "encoder", ENCODER_EXAMPLES, neg_number=2, max_input_length=64,
                                         output_path=out, seed=7, engine=engine, return_model=False)
        weights.append(_merge_info(out)["weights"])
    assert weights[0] == weights[1]
    assert abs(sum(weights[0]) - 1) < 1e-6


DECODER_EXAMPLES = [{"input": "Question: what is two plus two? Answer:", "output": "four"},
                    {"input": "Review: a charming film. Positive or negative?", "output": "positive"}]


@pytest.fixture
def decoders_without_pad(make_models, tmp_path):
    """Two decoders whose tokenizer has no pad token (as Llama's has none)."""
    from transformers import AutoTokenizer

    folders = []
    for i, source in enumerate(make_models("llama-decoder", 2)):
        folder = shutil.copytree(source, tmp_path / f"nopad{i}")
        _like_llama_tokenizer(folder, pad_token=None)
        assert AutoTokenizer.from_pretrained(str(folder)).pad_token_id is None
        folders.append(folder)
    return folders


def test_decoder_without_pad_token_merges_on_every_engine(decoders_without_pad, tmp_path):
    import LM_Cocktail

    with pytest.raises(TypeError), contextlib.redirect_stdout(io.StringIO()):
        LM_Cocktail.mix_models_with_data([str(p) for p in decoders_without_pad], "decoder", DECODER_EXAMPLES,
                                         max_input_length=32)
    weights = {}
    for engine in ("auto", "cocktail"):
        out = tmp_path / engine
        model = merge_hooks.mix_models_with_data(decoders_without_pad, "decoder", DECODER_EXAMPLES, max_input_length=32,
                                                 output_path=out, engine=engine)
        weights[engine] = _merge_info(out)["weights"]
        expected = lm_cocktail_state_dict("mix_models", decoders_without_pad, "decoder", weights[engine])
        assert_same_tensors(model.state_dict(), expected)
    assert weights["auto"] == pytest.approx(weights["cocktail"], abs=1e-6)
    assert weights["auto"] != pytest.approx([0.5, 0.5], abs=1e-9)


def test_quiet_cocktail_engine_draws_no_bars(make_models, tmp_path, capfd):
    paths = make_models("bert-encoder", 2)
    merge_hooks.mix_models_by_layers(paths, "encoder", [0.5, 0.5], tmp_path / "quiet", engine="cocktail", quiet=True)
    assert capfd.readouterr().err == ""
    merge_hooks.mix_models_by_layers(paths, "encoder", [0.5, 0.5], tmp_path / "loud", engine="cocktail", quiet=False)
    assert "Merging models" in capfd.readouterr().err


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


def test_api_passes_force_and_format_options(make_models, tmp_path):
    """force replaces a folder merge-hooks did not write; format keys of `output` reach the recipe; save()
    marks its output so that a second save with overwrite replaces it."""
    import merge_hooks
    from merge_hooks.errors import MergeHooksError

    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MergeHooksError, match="--force"):
        merge_hooks.mix_models(paths, "encoder", [0.5, 0.5], out, overwrite=True, return_model=False)
    assert (out / "notes.txt").read_text() == "mine"
    merge_hooks.mix_models(paths, "encoder", [0.5, 0.5], out, overwrite=True, force=True, return_model=False)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(MergeHooksError, match="gguf_type"):
        merge_hooks.mix_models(paths, "encoder", [0.5, 0.5], tmp_path / "other", gguf_type="q8_0")
    assert not (tmp_path / "other").exists()

    model = merge_hooks.mix_models(paths, "encoder", [0.5, 0.5])
    saved = tmp_path / "saved"
    merge_hooks.save(model, saved, source=paths[0], model_type="encoder")
    assert (saved / "merge_manifest.json").is_file()
    merge_hooks.save(model, saved, source=paths[0], model_type="encoder", save_format="bin", overwrite=True)
    assert (saved / "pytorch_model.bin").is_file() and not (saved / "model.safetensors").exists()

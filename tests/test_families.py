"""Each FlagEmbedding family loads with its users' loader and holds exactly the merged weights; dtypes."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from helpers import assert_same_tensors, auto_class, lm_cocktail_state_dict, load_state_dict, merge, weight_files

PAIRS = [["what is the capital of france", "paris is the capital of france"],
         ["what is the capital of france", "the cat sat on the mat"]]


def _expected_fp32_sum(paths, weights, dtype):
    """LM_Cocktail's arithmetic in float32 on the checkpoints' tensors, cast to ``dtype``."""
    from merge_hooks.checkpoint import Checkpoint

    checkpoints = [Checkpoint(p) for p in paths]
    out = {}
    for name in checkpoints[0].specs:
        acc = None
        for w, ckpt in zip(weights, checkpoints):
            t = ckpt.get(name).float()
            acc = w * t if acc is None else acc.add_(w * t)
        out[name] = acc.to(dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keep_dtype_sums_in_float32(dtype, make_models, tmp_path):
    from safetensors.torch import load_file

    paths = make_models("bert-encoder", 3, dtype=dtype)
    out = tmp_path / "merged"
    merge(paths, "encoder", out, save_format="safetensors", engine="stream")
    written = load_file(out / "model.safetensors")
    assert {t.dtype for t in written.values() if t.is_floating_point()} == {dtype}
    assert_same_tensors(written, _expected_fp32_sum(paths, [0.5, 0.3, 0.2], dtype))
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(dtype).removeprefix("torch.")
    loaded = auto_class("encoder").from_pretrained(str(out), torch_dtype="auto")
    assert loaded.dtype == dtype


@pytest.mark.parametrize("engine", ["stream", "cocktail"])
def test_keep_dtype_is_the_same_on_both_stacks(engine, make_models, tmp_path):
    """LM_Cocktail on transformers 4 upcasts bf16 to fp32; 'keep' writes the checkpoint's bf16 either way."""
    paths = make_models("llama-decoder", 2, dtype=torch.bfloat16)
    out = tmp_path / "merged"
    merge(paths, "decoder", out, weights=[0.5, 0.5], save_format="bin", engine=engine)
    state_dict = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in state_dict.values() if t.is_floating_point()} == {torch.bfloat16}
    expected = _expected_fp32_sum(paths, [0.5, 0.5], torch.bfloat16)
    for name, tensor in expected.items():
        torch.testing.assert_close(state_dict[name], tensor, rtol=1e-2, atol=1e-2)
    if engine == "stream":
        assert_same_tensors(state_dict, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_explicit_dtype(dtype, make_models, tmp_path):
    paths = make_models("bert-reranker", 3)
    reference = lm_cocktail_state_dict("mix_models", paths, "reranker", [0.5, 0.3, 0.2])
    out = tmp_path / "merged"
    merge(paths, "reranker", out, save_format="bin", dtype=dtype)
    target = getattr(torch, dtype)
    written = auto_class("reranker").from_pretrained(str(out), torch_dtype="auto").state_dict()
    assert_same_tensors(written, {k: v.to(target) if v.is_floating_point() else v for k, v in reference.items()})


@pytest.mark.parametrize("family", ["bert-reranker", "xlmr-reranker"])
@pytest.mark.parametrize("method", ["mix_models", "mix_models_by_layers"])
def test_rerankers_all_methods(family, method, make_models, tmp_path):
    paths = make_models(family, 2)
    expected = lm_cocktail_state_dict("mix_models", paths, "reranker", [0.6, 0.4])
    out = tmp_path / "merged"
    merge(paths, "reranker", out, weights=[0.6, 0.4], save_format="bin", method=method)
    assert_same_tensors(load_state_dict(out, "reranker"), expected)


def _reranker_scores(folder, state_dict):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    model.load_state_dict(state_dict)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(PAIRS, padding=True, truncation=True, return_tensors="pt", max_length=512)
    with torch.no_grad():
        return model(**batch).logits.view(-1).float()


@pytest.mark.stack_a
@pytest.mark.parametrize("family", ["bert-reranker", "xlmr-reranker"])
def test_flag_reranker_scores_match_merged_weights(family, make_models, tmp_path):
    from FlagEmbedding import FlagReranker

    paths = make_models(family, 2)
    expected = lm_cocktail_state_dict("mix_models", paths, "reranker", [0.6, 0.4])
    out = tmp_path / "merged"
    merge(paths, "reranker", out, weights=[0.6, 0.4], save_format="bin", method="mix_models_by_layers")
    reranker = FlagReranker(str(out), use_fp16=False, devices="cpu")
    assert_same_tensors(reranker.model.state_dict(), expected)
    scores = torch.tensor(reranker.compute_score(PAIRS, normalize=False))
    torch.testing.assert_close(scores, _reranker_scores(out, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.stack_a
def test_flag_model_embeds_with_merged_weights(make_models, tmp_path):
    from FlagEmbedding import FlagModel
    from transformers import AutoModel, AutoTokenizer

    paths = make_models("bert-encoder", 2, pooling="cls")
    expected = lm_cocktail_state_dict("mix_models", paths, "encoder", [0.6, 0.4])
    out = tmp_path / "merged"
    merge(paths, "encoder", out, weights=[0.6, 0.4], save_format="bin")
    flag = FlagModel(str(out), use_fp16=False, devices="cpu")
    assert_same_tensors(flag.model.state_dict(), expected)
    texts = [pair[1] for pair in PAIRS]
    model = AutoModel.from_pretrained(str(out)).eval()
    batch = AutoTokenizer.from_pretrained(str(out))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model(**batch).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(torch.tensor(flag.encode(texts)), cls, rtol=1e-5, atol=1e-5)


def test_minilm_keeps_mean_pooling(minilm_path, tmp_path):
    """all-MiniLM-L6-v2 merged with itself embeds exactly like the original (LM_Cocktail would force CLS)."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "merged"
    merge([minilm_path, minilm_path], "encoder", out, weights=[0.5, 0.5], save_format="bin")
    assert weight_files(out) == ["pytorch_model.bin"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    texts = ["merging keeps general ability", "paris is the capital of france"]
    base = SentenceTransformer(str(minilm_path), device="cpu").encode(texts, convert_to_tensor=True)
    merged = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.equal(base, merged)


def _examples():
    negatives = ["the cat sat on the mat", "a recipe for pancakes", "stock prices fell", "football results"]
    return [{"query": "what is the capital of france", "pos": ["paris is the capital of france"], "neg": negatives},
            {"query": "what do pandas eat", "pos": ["pandas eat mostly bamboo"], "neg": negatives},
            {"query": "how do i reset my password", "pos": ["open settings and reset the password"], "neg": negatives}]


@pytest.mark.parametrize("engine", ["stream", "cocktail"])
def test_mix_models_with_data_encoder(engine, make_models, tmp_path):
    import contextlib
    import io

    import LM_Cocktail

    paths = make_models("bert-encoder", 3, pooling="cls")
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in _examples()))
    random.seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = LM_Cocktail.mix_models_with_data([str(p) for p in paths], "encoder", _examples(), 5.0, 2, 64, 3)
    expected = reference.state_dict()

    random.seed(0)
    from merge_hooks.pipeline import run_recipe
    from merge_hooks.recipe import recipe_from_dict

    out = tmp_path / "merged"
    result = run_recipe(recipe_from_dict({
        "model_type": "encoder", "method": "mix_models_with_data", "engine": engine,
        "models": [{"path": str(p)} for p in paths], "examples": str(examples),
        "temperature": 5.0, "batch_size": 2, "max_input_length": 64, "neg_number": 3,
        "output": {"path": str(out), "save_format": "bin"},
    }), quiet=True)
    assert len(result.weights) == 3 and abs(sum(result.weights) - 1) < 1e-6
    assert_same_tensors(load_state_dict(out, "encoder"), expected)


def test_mix_models_with_data_decoder_without_pad_token(make_models, tmp_path):
    """LM_Cocktail needs pad_token_id; a decoder tokenizer without one pads with its eos token."""
    from merge_hooks.pipeline import run_recipe
    from merge_hooks.recipe import recipe_from_dict
    from transformers import AutoTokenizer

    paths = []
    for i, src in enumerate(make_models("llama-decoder", 2)):
        dst = tmp_path / f"llm{i}"
        shutil.copytree(src, dst)
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config.pop("pad_token", None)
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token="[SEP]")
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
        specials = json.loads((dst / "special_tokens_map.json").read_text())
        specials.pop("pad_token", None)
        (dst / "special_tokens_map.json").write_text(json.dumps(specials))
        paths.append(dst)
    assert AutoTokenizer.from_pretrained(str(paths[0])).pad_token_id is None
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"input": "what is the capital of france", "output": "paris"}) + "\n"
                        + json.dumps({"input": "what do pandas eat", "output": "bamboo"}) + "\n")
    out = tmp_path / "merged"
    result = run_recipe(recipe_from_dict({
        "model_type": "decoder", "method": "mix_models_with_data", "models": [{"path": str(p)} for p in paths],
        "examples": str(examples), "max_input_length": 32, "output": {"path": str(out), "save_format": "bin"},
    }), quiet=True)
    assert abs(sum(result.weights) - 1) < 1e-6 and result.engine == "stream"
    expected = _expected_fp32_sum(paths, result.weights, torch.float32)
    assert_same_tensors(torch.load(out / "pytorch_model.bin", weights_only=True), expected)
    assert (out / "generation_config.json").is_file()


def test_new_sentence_transformers_layout_is_written_back_in_the_old_one(minilm_path, tmp_path):
    """A first model saved by sentence-transformers >= 5.4 still gives a folder every release loads."""
    from sentence_transformers import SentenceTransformer

    source = tmp_path / "minilm-new-layout"
    shutil.copytree(minilm_path, source)
    (source / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"},
    ]))
    (source / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": True}))
    (source / "sentence_bert_config.json").write_text(json.dumps(
        {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings"}))
    out = tmp_path / "merged"
    merge([source, minilm_path], "encoder", out, weights=[0.5, 0.5], save_format="bin")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                             "sentence_transformers.models.Pooling",
                                             "sentence_transformers.models.Normalize"]
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["pooling_mode_cls_token"] is False
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 512, "do_lower_case": False}
    texts = ["merging keeps general ability"]
    base = SentenceTransformer(str(minilm_path), device="cpu").encode(texts, convert_to_tensor=True)
    merged = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(merged, base, rtol=1e-5, atol=1e-6)

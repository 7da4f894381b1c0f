"""The tiny model factories build folders that the real loaders accept on the running stack."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from builders import FAMILIES, TOKENIZER_DIR, TOKENIZER_FILES, VOCAB_SIZE, build_model

AUTO_CLASS = {
    "bert-encoder": AutoModel,
    "bert-reranker": AutoModelForSequenceClassification,
    "xlmr-reranker": AutoModelForSequenceClassification,
    "xlmr-m3": AutoModel,
    "llama-decoder": AutoModelForCausalLM,
}
QUERY = "what is the capital of france"
PASSAGE = "paris is the capital of france"


def read_checkpoint(path):
    """Every tensor stored in a model folder, whatever the format and sharding."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    for file in sorted(path.glob("pytorch_model*.bin")):
        tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return tensors


def load(family, path, **kwargs):
    model, info = AUTO_CLASS[family].from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {kind: keys for kind, keys in info.items() if keys}
    assert not problems, f"{family} at {path} did not load cleanly: {problems}"
    return model.eval()


def test_tokenizer_encodes_pairs_without_unknown_words():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == 128
    encoded = tokenizer(QUERY, PASSAGE)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["[CLS]", *QUERY.split(), "[SEP]", *PASSAGE.split(), "[SEP]"]
    assert encoded["token_type_ids"] == [0] * 8 + [1] * 7


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_with_its_auto_class_and_seeds_differ(make_models, family):
    base, tuned = make_models(family)
    assert {p.name for p in base.iterdir()} >= {"config.json", "model.safetensors", *TOKENIZER_FILES}
    assert AutoConfig.from_pretrained(base).architectures == [type(load(family, base)).__name__]

    stored = read_checkpoint(base)
    model_state = load(family, base).state_dict()
    for key, tensor in stored.items():
        assert torch.equal(model_state[key], tensor), key
    other = read_checkpoint(tuned)
    assert stored.keys() == other.keys()
    same = [key for key in stored if stored[key].is_floating_point() and torch.equal(stored[key], other[key])]
    assert not same, f"tensors equal across seeds: {same}"


def test_same_seed_gives_same_tensors(tmp_path, make_models):
    (cached,) = make_models("bert-reranker", 1)
    again = build_model("bert-reranker", tmp_path / "again", seed=0)
    first, second = read_checkpoint(cached), read_checkpoint(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_make_models_caches_and_extends(make_models):
    two = make_models("bert-encoder", 2)
    three = make_models("bert-encoder", 3)
    assert three[:2] == two and len(set(three)) == 3


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_stored_declared_and_loaded(make_models, dtype, weights_format):
    (path,) = make_models("bert-reranker", 1, dtype=dtype, weights_format=weights_format)
    expected_file = "model.safetensors" if weights_format == "safetensors" else "pytorch_model.bin"
    assert sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin")) == [expected_file]
    assert {t.dtype for t in read_checkpoint(path).values() if t.is_floating_point()} == {dtype}
    assert json.loads((path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert load("bert-reranker", path, dtype="auto").dtype == dtype


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_llama_checkpoint_holds_the_tied_embedding_once(make_models, weights_format):
    (path,) = make_models("llama-decoder", 1, weights_format=weights_format)
    stored = read_checkpoint(path)
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    model = load("llama-decoder", path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, stored["model.embed_tokens.weight"])
    generation = GenerationConfig.from_pretrained(path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (2, 3, 0)


@pytest.mark.parametrize(
    ("weights_format", "index_name", "shard_glob"),
    [
        ("safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
    ],
)
def test_sharded_output_has_an_index(make_models, weights_format, index_name, shard_glob):
    (sharded,) = make_models("llama-decoder", 1, weights_format=weights_format, max_shard_size="20KB")
    (single,) = make_models("llama-decoder", 1)
    shards = sorted(p.name for p in sharded.glob(shard_glob))
    assert len(shards) > 1
    index = json.loads((sharded / index_name).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    expected = read_checkpoint(single)
    assert index["weight_map"].keys() == expected.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    model_state = load("llama-decoder", sharded).state_dict()
    assert all(torch.equal(model_state[key], tensor) for key, tensor in expected.items())


def test_prefixed_checkpoint_loads_into_automodel(make_models):
    (prefixed,) = make_models("bert-encoder", 1, prefix=True)
    (plain,) = make_models("bert-encoder", 1)
    stored = read_checkpoint(prefixed)
    assert all(key.startswith("bert.") for key in stored)
    expected = read_checkpoint(plain)
    assert {key.removeprefix("bert.") for key in stored} == expected.keys()
    model_state = load("bert-encoder", prefixed).state_dict()
    assert all(torch.equal(model_state[key], tensor) for key, tensor in expected.items())


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_layout_loads_with_its_pooling(make_models, pooling):
    from sentence_transformers import SentenceTransformer

    (path,) = make_models("bert-encoder", 1, pooling=pooling)
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling"] + (["Normalize"] if pooling == "cls" else [])

    model = SentenceTransformer(str(path), device="cpu")
    assert [type(m).__name__ for m in model] == [m["type"].rsplit(".", 1)[-1] for m in modules]
    pool = model[1]
    mode = pool.pooling_mode if hasattr(pool, "pooling_mode") else pool.get_pooling_mode_str()
    assert mode == pooling

    embeddings = model.encode([QUERY, PASSAGE], convert_to_tensor=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer([QUERY, PASSAGE], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = load("bert-encoder", path)(**batch).last_hidden_state
    if pooling == "cls":
        expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)


def test_minilm_path_is_the_real_model(minilm_path):
    config = AutoConfig.from_pretrained(minilm_path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 384, 6)
    pooling = json.loads((minilm_path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True


def test_stack_matches_transformers(STACK):
    import transformers

    assert STACK == {"4": "A", "5": "B"}[transformers.__version__.split(".")[0]]


@pytest.mark.stack_a
def test_flagmodel_encodes_with_cls_pooling(make_models):
    from FlagEmbedding import FlagModel

    (path,) = make_models("bert-encoder", 1, pooling="cls")
    embeddings = FlagModel(str(path), use_fp16=False, devices="cpu").encode([QUERY, PASSAGE])
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        hidden = load("bert-encoder", path)(**tokenizer([QUERY, PASSAGE], padding=True, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(embeddings), torch.nn.functional.normalize(hidden[:, 0], dim=-1), rtol=1e-4, atol=1e-5)


@pytest.mark.stack_a
@pytest.mark.parametrize("family", ["bert-reranker", "xlmr-reranker"])
def test_flagreranker_scores_pairs(make_models, family):
    from FlagEmbedding import FlagReranker

    (path,) = make_models(family, 1)
    pairs = [[QUERY, PASSAGE], [QUERY, "a dog is in the house"]]
    scores = FlagReranker(str(path), use_fp16=False, devices="cpu").compute_score(pairs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer([q for q, _ in pairs], [p for _, p in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = load(family, path)(**batch).logits.view(-1)
    torch.testing.assert_close(torch.tensor(scores), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.stack_a
def test_bgem3_loads_the_written_heads(make_models):
    from FlagEmbedding import BGEM3FlagModel

    (path,) = make_models("xlmr-m3", 1)
    m3 = BGEM3FlagModel(str(path), use_fp16=False, devices="cpu")
    for head in ("colbert_linear", "sparse_linear"):
        written = torch.load(path / f"{head}.pt", map_location="cpu", weights_only=True)
        loaded = getattr(m3.model, head).state_dict()
        assert written.keys() == loaded.keys()
        assert all(torch.equal(loaded[key], written[key]) for key in written), head
    assert m3.model.colbert_linear.weight.shape == (32, 32) and m3.model.sparse_linear.weight.shape == (1, 32)

    output = m3.encode([QUERY, PASSAGE], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert output["dense_vecs"].shape == (2, 32)
    assert len(output["lexical_weights"]) == 2
    assert output["colbert_vecs"][0].shape == (len(QUERY.split()) + 1, 32)

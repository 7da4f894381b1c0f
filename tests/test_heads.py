"""bge-m3's colbert_linear.pt and sparse_linear.pt: merged like the main weights, written where FlagEmbedding reads them."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import leftovers, merge
from merge_hooks.errors import MergeHooksError
from merge_hooks.heads import HEAD_FILES

TEXTS = ["what is the capital of france", "paris is the capital of france and the city of paris is very old"]
WEIGHTS = [0.6, 0.4]


def read_head(folder, name):
    return torch.load(folder / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def m3_models(make_models):
    return make_models("xlmr-m3", 2, pooling="cls")


@pytest.mark.parametrize("engine", ["stream", "cocktail"])
def test_heads_are_the_weighted_sum_bit_for_bit(engine, m3_models, tmp_path):
    out = tmp_path / "merged"
    merge(m3_models, "encoder", out, weights=WEIGHTS, save_format="bin", engine=engine)
    for name in HEAD_FILES:
        h1, h2 = (read_head(p, name) for p in m3_models)
        merged = read_head(out, name)
        assert merged.keys() == h1.keys() == {"weight", "bias"}
        for key in h1:
            expected = WEIGHTS[0] * h1[key] + WEIGHTS[1] * h2[key]
            assert merged[key].dtype == torch.float32
            assert torch.equal(merged[key], expected), f"{name} {key}"


def test_heads_follow_the_output_dtype(m3_models, tmp_path):
    out = tmp_path / "merged"
    merge(m3_models, "encoder", out, weights=WEIGHTS, dtype="bfloat16")
    for name in HEAD_FILES:
        h1, h2 = (read_head(p, name) for p in m3_models)
        merged = read_head(out, name)
        for key in h1:
            assert torch.equal(merged[key], (WEIGHTS[0] * h1[key] + WEIGHTS[1] * h2[key]).to(torch.bfloat16))


def test_models_without_heads_get_none(make_models, tmp_path):
    out = tmp_path / "merged"
    merge(make_models("bert-encoder", 2), "encoder", out, weights=WEIGHTS)
    assert not any((out / name).exists() for name in HEAD_FILES)


@pytest.mark.parametrize(
    "removed, lacking",
    [({1: ["sparse_linear.pt"]}, 1), ({0: list(HEAD_FILES)}, 0)],
    ids=["second-lacks-sparse", "first-lacks-both"],
)
def test_models_disagreeing_on_heads_fail_before_merging(removed, lacking, m3_models, tmp_path, monkeypatch):
    import merge_hooks.pipeline as pipeline

    def must_not_merge(*args, **kwargs):
        raise AssertionError("the engine ran although preflight should have failed")

    monkeypatch.setattr(pipeline, "_merge", must_not_merge)
    paths = []
    for i, source in enumerate(m3_models):
        copy = tmp_path / f"model{i}"
        shutil.copytree(source, copy)
        for name in removed.get(i, []):
            (copy / name).unlink()
        paths.append(copy)
    out = tmp_path / "merged"
    with pytest.raises(MergeHooksError) as error:
        merge(paths, "encoder", out, weights=WEIGHTS)
    message = str(error.value)
    assert f"model {str(paths[lacking])!r} has no" in message
    assert all(name in message for name in removed[lacking])
    assert not out.exists() and leftovers(tmp_path, "merged") == []


def test_heads_of_different_shapes_are_an_error(m3_models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(m3_models[1], other)
    torch.save(torch.nn.Linear(32, 16).state_dict(), other / "colbert_linear.pt")
    with pytest.raises(MergeHooksError, match="differ in colbert_linear.pt"):
        merge([m3_models[0], other], "encoder", tmp_path / "merged", weights=WEIGHTS)
    assert not (tmp_path / "merged").exists()


def test_heads_are_read_without_unpickling_code(m3_models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(m3_models[1], other)
    torch.save({"weight": torch.zeros(1, 32), "bias": torch.zeros(1), "note": object()}, other / "sparse_linear.pt")
    with pytest.raises(MergeHooksError, match="cannot read .*sparse_linear.pt: it holds Python objects such as .*object besides tensors"):
        merge([m3_models[0], other], "encoder", tmp_path / "merged", weights=WEIGHTS)


def _by_hand(folder):
    """FlagEmbedding 1.4.2's M3 outputs recomputed from the merged folder with transformers and the head files."""
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    colbert, sparse = torch.nn.Linear(32, 32), torch.nn.Linear(32, 1)
    colbert.load_state_dict(read_head(folder, "colbert_linear.pt"))
    sparse.load_state_dict(read_head(folder, "sparse_linear.pt"))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        dense = F.normalize(hidden[:, 0], dim=-1)
        token_weights = torch.relu(sparse(hidden)).squeeze(-1)
        colbert_vecs = F.normalize(colbert(hidden[:, 1:]) * batch["attention_mask"][:, 1:, None].float(), dim=-1)
    unused = {tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[t])
              for t in ("cls_token", "eos_token", "pad_token", "unk_token") if t in tokenizer.special_tokens_map}
    lexical = []
    for weights, ids in zip(token_weights.tolist(), batch["input_ids"].tolist()):
        row = {}
        for w, i in zip(weights, ids):
            if i not in unused and w > 0:
                row[str(i)] = max(w, row.get(str(i), 0))
        lexical.append(row)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    colbert_out = [vecs[: n - 1] for vecs, n in zip(colbert_vecs, lengths)]
    return dense, lexical, colbert_out


@pytest.mark.stack_a
@pytest.mark.parametrize("engine", ["stream", "cocktail"])
def test_bgem3_loads_the_merged_heads_and_outputs_match(engine, m3_models, tmp_path):
    from FlagEmbedding import BGEM3FlagModel

    out = tmp_path / "merged"
    merge(m3_models, "encoder", out, weights=WEIGHTS, save_format="bin", engine=engine)
    assert (out / "pytorch_model.bin").is_file() and not (out / "model.safetensors").exists()

    m3 = BGEM3FlagModel(str(out), use_fp16=False, devices="cpu")
    for name in HEAD_FILES:
        loaded = getattr(m3.model, name.removesuffix(".pt")).state_dict()
        written = read_head(out, name)
        assert loaded.keys() == written.keys()
        assert all(torch.equal(loaded[k], written[k]) for k in written), f"{name} was not loaded (random init?)"

    output = m3.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    dense, lexical, colbert = _by_hand(out)
    torch.testing.assert_close(torch.from_numpy(output["dense_vecs"]), dense, rtol=1e-5, atol=1e-6)
    assert len(output["lexical_weights"]) == len(TEXTS)
    for got, expected in zip(output["lexical_weights"], lexical):
        assert got.keys() == expected.keys() and expected
        torch.testing.assert_close(torch.tensor([float(got[k]) for k in expected]), torch.tensor(list(expected.values())),
                                   rtol=1e-5, atol=1e-6)
    for got, expected in zip(output["colbert_vecs"], colbert):
        assert got.shape == tuple(expected.shape)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-6)

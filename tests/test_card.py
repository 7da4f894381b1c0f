"""Provenance in every merged folder: Hub model card, the exact recipe, merge_info.json, and a sha256 manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from helpers import FAMILY, merge, merge_in_subprocess
from merge_hooks.card import MANIFEST_NAME, hash_files, write_manifest
from merge_hooks.recipe import load_recipe

WEIGHTS = [0.6, 0.4]


def front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def files_on_disk(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "model_type, library, pipeline_tag",
    [("encoder", "sentence-transformers", "sentence-similarity"), ("reranker", "transformers", "text-classification"),
     ("decoder", "transformers", "text-generation")],
)
def test_card_front_matter_and_body(model_type, library, pipeline_tag, make_models, tmp_path):
    paths = make_models(FAMILY[model_type], 2)
    out = tmp_path / "merged"
    merge(paths, model_type, out, weights=WEIGHTS, save_format="bin", dtype="bfloat16")
    meta, body = front_matter(out / "README.md")
    assert meta["base_model"] == [str(p) for p in paths]
    assert meta["base_model_relation"] == "merge"
    assert {"merge", "lm-cocktail"} <= set(meta["tags"])
    assert ("sentence-transformers" in meta["tags"]) == (model_type == "encoder")
    assert meta["library_name"] == library and meta["pipeline_tag"] == pipeline_tag
    for fact in ("`mix_models`", "Engine: `stream`", "`bin`", "`bfloat16`", "| 0.6 |", "| 0.4 |",
                 f"| torch | {version('torch')} |", f"| transformers | {version('transformers')} |",
                 "## How to load", str(out)):
        assert fact in body, fact


def test_recipe_and_info_are_written(make_models, tmp_path):
    paths = make_models("bert-encoder", 2, pooling="mean")
    out = tmp_path / "merged"
    result = merge(paths, "encoder", out, weights=WEIGHTS, save_format="safetensors", max_shard_size="20KB")
    written = load_recipe(out / "merge_recipe.yaml")
    assert written.model_paths == [str(p) for p in paths] and written.weights == WEIGHTS
    assert written.output.max_shard_size == "20KB" and written.output.path == out
    assert (out / "merge_recipe.yaml").read_text() == written.to_yaml()
    info = json.loads((out / "merge_info.json").read_text())
    assert info["weights"] == result.weights == WEIGHTS
    assert info["engine"] == "stream" and info["save_format"] == "safetensors" and info["dtype"] == "float32"
    assert info["models"] == [str(p) for p in paths] and info["m3_heads"] is False


def test_manifest_lists_every_other_file_with_its_sha256(make_models, tmp_path):
    paths = make_models("xlmr-m3", 2, pooling="cls")
    out = tmp_path / "merged"
    merge(paths, "encoder", out, weights=WEIGHTS, save_format="both", max_shard_size="40KB")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    on_disk = files_on_disk(out)
    assert set(manifest["files"]) == set(on_disk) - {MANIFEST_NAME}
    assert {"README.md", "merge_recipe.yaml", "merge_info.json", "colbert_linear.pt", "sparse_linear.pt",
            "1_Pooling/config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = on_disk[name].read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_with_data_records_the_computed_weights(make_models, tmp_path):
    from merge_hooks.pipeline import run_recipe
    from merge_hooks.recipe import recipe_from_dict

    negatives = ["the cat sat on the mat", "a recipe for pancakes"]
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"query": q, "pos": [p], "neg": negatives}) + "\n" for q, p in [
        ("what is the capital of france", "paris is the capital of france"),
        ("what is the capital of germany", "berlin is the capital of germany"),
    ]))
    paths = make_models("bert-encoder", 2, pooling="cls")
    out = tmp_path / "merged"
    result = run_recipe(recipe_from_dict({
        "model_type": "encoder", "method": "mix_models_with_data", "models": [{"path": str(p)} for p in paths],
        "examples": str(examples), "max_input_length": 32, "neg_number": 2, "output": {"path": str(out)},
    }), quiet=True)
    assert len(result.weights) == 2 and abs(sum(result.weights) - 1) < 1e-6
    assert json.loads((out / "merge_info.json").read_text())["weights"] == result.weights
    _, body = front_matter(out / "README.md")
    assert "`mix_models_with_data`" in body and str(examples) in body
    assert all(f"| {w:.6g} |" in body for w in result.weights)


def test_source_readme_is_not_copied(make_models, tmp_path):
    sources = []
    for i, path in enumerate(make_models("bert-encoder", 2, pooling="mean")):
        copy = tmp_path / f"model{i}"
        shutil.copytree(path, copy)
        (copy / "README.md").write_text("# the base model's own card\n")
        sources.append(copy)
    out = tmp_path / "merged"
    merge(sources, "encoder", out, weights=WEIGHTS)
    card = (out / "README.md").read_text()
    assert "the base model's own card" not in card and "A merge of 2 models" in card


def test_write_manifest_reuses_hashes_of_unchanged_files(tmp_path, monkeypatch):
    import merge_hooks.card as card

    (tmp_path / "weights.bin").write_bytes(b"w" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text("{}")
    hashed = hash_files([tmp_path / "weights.bin"], root=tmp_path)
    read = []
    real = card.sha256_file
    monkeypatch.setattr(card, "sha256_file", lambda path: read.append(Path(path).name) or real(path))
    write_manifest(tmp_path, hashed=hashed)
    assert read == ["config.json"]

    (tmp_path / "weights.bin").write_bytes(b"v" * 1001)
    read.clear()
    files = json.loads(write_manifest(tmp_path, hashed=hashed).read_text())["files"]
    assert sorted(read) == ["config.json", "weights.bin"]
    assert files["weights.bin"] == {"size": 1001, "sha256": hashlib.sha256(b"v" * 1001).hexdigest()}
    assert set(files) == {"weights.bin", "sub/config.json"}


def test_stream_merge_with_card_does_not_import_transformers(make_models, tmp_path):
    paths = make_models("bert-reranker", 2)
    recipe = {"model_type": "reranker", "engine": "stream", "output": {"path": str(tmp_path / "merged")},
              "models": [{"path": str(paths[0]), "weight": 0.5}, {"path": str(paths[1]), "weight": 0.5}]}
    imported = merge_in_subprocess(
        recipe, "print(sorted(m for m in ('transformers', 'sentence_transformers', 'LM_Cocktail') if m in sys.modules))")
    assert imported == "[]"
    assert f"| transformers | {version('transformers')} |" in (tmp_path / "merged" / "README.md").read_text()

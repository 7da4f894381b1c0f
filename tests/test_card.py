"""Provenance in every merged folder: Hub model card, the exact recipe, merge_info.json, and a sha256 manifest."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from blake3 import blake3

from helpers import FAMILY, cli_subprocess, merge, merge_in_subprocess
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


def test_manifest_lists_every_other_file_with_its_digest(make_models, tmp_path):
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
        assert entry == {"size": len(data), "blake3": blake3(data).hexdigest()}, name
    assert manifest["algorithm"] == "blake3"


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
    real = card.hash_file
    monkeypatch.setattr(card, "hash_file", lambda path, *a: read.append(Path(path).name) or real(path, *a))
    write_manifest(tmp_path, hashed=hashed)
    assert read == ["config.json"]

    (tmp_path / "weights.bin").write_bytes(b"v" * 1001)
    read.clear()
    files = json.loads(write_manifest(tmp_path, hashed=hashed).read_text())["files"]
    assert sorted(read) == ["config.json", "weights.bin"]
    assert files["weights.bin"] == {"size": 1001, "blake3": blake3(b"v" * 1001).hexdigest()}
    assert set(files) == {"weights.bin", "sub/config.json"}


def test_stream_merge_with_card_does_not_import_transformers(make_models, tmp_path):
    paths = make_models("bert-reranker", 2)
    recipe = {"model_type": "reranker", "engine": "stream", "output": {"path": str(tmp_path / "merged")},
              "models": [{"path": str(paths[0]), "weight": 0.5}, {"path": str(paths[1]), "weight": 0.5}]}
    imported = merge_in_subprocess(
        recipe, "print(sorted(m for m in ('transformers', 'sentence_transformers', 'LM_Cocktail') if m in sys.modules))")
    assert imported == "[]"
    assert f"| transformers | {version('transformers')} |" in (tmp_path / "merged" / "README.md").read_text()


def _card_verify_command(folder: Path) -> list[str]:
    """The ``merge-hooks verify ... --against ...`` command the folder's model card shows."""
    import re

    body = (folder / "README.md").read_text(encoding="utf-8")
    found = re.search(r"`merge-hooks verify ([^`]+)`\s*\(add `(--against [^`]+)`", body)
    assert found, body
    return ["verify", found.group(1), *found.group(2).split(" ", 1)]


def test_cards_verify_command_replays_from_any_folder(make_models, tmp_path):
    for i, source in enumerate(make_models("bert-encoder", 2)):
        shutil.copytree(source, tmp_path / "work" / "models" / f"m{i}")
    merged = cli_subprocess("merge", "--model-type", "encoder", "--models", "models/m0", "models/m1", "--weights", "0.6",
                            "0.4", "-o", "merged", "-q", cwd=tmp_path / "work")
    assert merged.returncode == 0, merged.stderr
    out = tmp_path / "work" / "merged"
    recorded = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert [m["path"] for m in recorded["models"]] == [str(tmp_path / "work" / "models" / f"m{i}") for i in range(2)]
    assert recorded["output"]["path"] == str(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    replay = cli_subprocess(*_card_verify_command(out), cwd=elsewhere)
    assert replay.returncode == 0, replay.stdout
    assert "equal the recipe's merge bit for bit" in replay.stdout


def test_recipe_paths_relative_to_its_folder(make_models, tmp_path, monkeypatch):
    folder = tmp_path / "kept"
    for i, source in enumerate(make_models("bert-encoder", 2)):
        shutil.copytree(source, folder / f"m{i}")
    (folder / "recipe.yaml").write_text(
        "model_type: encoder\nmodels:\n  - {path: m0, weight: 0.5}\n  - {path: m1, weight: 0.5}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_recipe(folder / "recipe.yaml").model_paths == [str(folder / "m0"), str(folder / "m1")]


def test_hub_ids_are_recorded_with_their_revision(make_models, tmp_path):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--test-org--tiny-bert"
    shutil.copytree(make_models("bert-encoder", 1)[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "merged"
    merge(["test-org/tiny-bert", make_models("bert-encoder", 2)[1]], "encoder", out, weights=WEIGHTS)
    recorded = load_recipe(out / "merge_recipe.yaml")
    assert (recorded.models[0].path, recorded.models[0].revision) == ("test-org/tiny-bert", commit)
    (repo / "refs" / "main").write_text("f" * 40)  # main moved on; the recorded commit still replays
    from merge_hooks.verify import verify_folder

    report = verify_folder(out, against=recorded, loaders=False)
    assert report.ok, report.problems


@pytest.mark.parametrize("save_format, dtype", [("bin", "float16"), ("safetensors", "bfloat16")])
def test_convert_rewrites_card_recipe_info_and_manifest(save_format, dtype, make_models, tmp_path):
    out = tmp_path / "merged"
    merge(make_models("bert-encoder", 2), "encoder", out, weights=WEIGHTS, save_format="safetensors")
    converted = cli_subprocess("convert", out, tmp_path / "converted", "--save-format", save_format,
                               "--dtype", dtype, "-q", cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    folder = tmp_path / "converted"
    info = json.loads((folder / "merge_info.json").read_text())
    assert (info["save_format"], info["dtype"]) == (save_format, dtype)
    recipe = load_recipe(folder / "merge_recipe.yaml")
    assert (recipe.output.path, recipe.output.save_format, recipe.output.dtype) == (folder, save_format, dtype)
    meta, body = front_matter(folder / "README.md")
    assert f"`{save_format}`, dtype `{dtype}`" in body
    assert f"SentenceTransformer({str(folder)!r})" in body and str(out) + "'" not in body
    replay = cli_subprocess(*_card_verify_command(folder), cwd=tmp_path)
    assert replay.returncode == 0, replay.stdout
    assert "equal the recipe's merge bit for bit" in replay.stdout and "sizes and blake3" in replay.stdout

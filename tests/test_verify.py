"""``merge-hooks verify``: passes on what merges write, fails (exit 1, naming the problem) on broken folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import fail_verification, leftovers, merge
from merge_hooks.cli import main
from merge_hooks.io.safetensors_io import read_safetensors_header

WEIGHTS = [0.6, 0.4]
# (family, model_type, save_format, max_shard_size, engine)
CASES = {
    "encoder-safetensors": ("bert-encoder", "encoder", "safetensors", None, "stream"),
    "encoder-sharded-safetensors": ("bert-encoder", "encoder", "safetensors", "20KB", "stream"),
    "reranker-bin": ("xlmr-reranker", "reranker", "bin", None, "stream"),
    "reranker-cocktail-bin": ("bert-reranker", "reranker", "bin", None, "cocktail"),
    "decoder-both-sharded": ("llama-decoder", "decoder", "both", "30KB", "stream"),
    "m3-sharded-bin": ("xlmr-m3", "encoder", "bin", "40KB", "stream"),
}


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


@pytest.fixture(scope="module")
def merged(make_models, tmp_path_factory):
    """Merged folders by case name, written once per module: copy one before breaking it."""
    root = tmp_path_factory.mktemp("verify")
    cache = {}

    def get(case: str) -> Path:
        if case not in cache:
            family, model_type, save_format, shard, engine = CASES[case]
            paths = make_models(family, 2, pooling="cls" if family == "xlmr-m3" else None)
            options = {"max_shard_size": shard} if shard else {}
            cache[case] = merge(paths, model_type, root / case, weights=WEIGHTS, save_format=save_format, engine=engine,
                                **options).output
        return cache[case]

    return get


@pytest.fixture
def broken(merged, tmp_path):
    """A private copy of a merged folder, to damage."""

    def copy(case: str) -> Path:
        target = tmp_path / case
        shutil.copytree(merged(case), target)
        return target

    return copy


def verify(capsys, folder, *args) -> tuple[int, str]:
    code = run_cli("verify", folder, *args)
    return code, capsys.readouterr().out


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_folders_pass_and_match_their_recipe(case, merged, capsys, STACK):
    folder = merged(case)
    code, out = verify(capsys, folder, "--against", folder / "merge_recipe.yaml")
    assert code == 0, out
    assert out.startswith(f"OK: {folder}")
    assert "files match merge_manifest.json (sizes and blake3)" in out
    assert "loads with transformers" in out and "no missing or unexpected weights" in out
    assert "equal the recipe's merge bit for bit" in out
    if CASES[case][1] == "encoder":
        assert "loads with sentence-transformers" in out
    if CASES[case][2] == "both":
        assert "model.safetensors: " in out and "pytorch_model.bin: " in out
    if CASES[case][0] == "xlmr-m3":
        assert "and the bge-m3 heads equal" in out
        expected = "loads with FlagEmbedding BGEM3FlagModel" if STACK == "A" else "FlagEmbedding BGEM3FlagModel not tried"
        assert expected in out


def test_plain_model_folder_passes_with_a_note(make_models, capsys):
    (folder,) = make_models("bert-reranker", 1)
    code, out = verify(capsys, folder)
    assert code == 0, out
    assert "note: no merge_manifest.json" in out


def test_other_weights_fail_against_the_recipe(merged, capsys, tmp_path):
    folder = merged("encoder-safetensors")
    recipe = yaml.safe_load((folder / "merge_recipe.yaml").read_text())
    recipe["models"][0]["weight"], recipe["models"][1]["weight"] = 0.5, 0.5
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(recipe))
    code, out = verify(capsys, folder, "--against", other)
    assert code == 1
    assert "merge_info.json records weights [0.6, 0.4], the recipe has [0.5, 0.5]" in out
    assert "differs from the recipe's merge" in out and "max abs difference" in out


def test_with_data_merge_is_checked_with_the_recorded_weights(make_models, tmp_path, capsys):
    from merge_hooks.pipeline import run_recipe
    from merge_hooks.recipe import recipe_from_dict

    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"query": "what is the capital of france", "pos": ["paris is the capital of france"],
                                    "neg": ["the cat sat on the mat"]}) + "\n")
    out = tmp_path / "merged"
    run_recipe(recipe_from_dict({
        "model_type": "encoder", "method": "mix_models_with_data", "models": [{"path": str(p)} for p in make_models("bert-encoder", 2)],
        "examples": str(examples), "max_input_length": 32, "neg_number": 1, "output": {"path": str(out)},
    }), quiet=True)
    code, report = verify(capsys, out, "--against", out / "merge_recipe.yaml")
    assert code == 0 and "equal the recipe's merge bit for bit" in report, report

    (out / "merge_info.json").unlink()
    code, report = verify(capsys, out, "--against", out / "merge_recipe.yaml")
    assert code == 1
    assert "no merge_info.json with the weights used" in report and "merge_info.json is listed" in report


def test_missing_shard(broken, capsys):
    folder = broken("encoder-sharded-safetensors")
    shard = "model-00002-of-" + json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "encoder.layer.1.output.dense.weight"].split("-of-")[1]
    (folder / shard).unlink()
    code, out = verify(capsys, folder)
    assert code == 1
    assert out.startswith(f"FAILED: {folder}")
    assert f"model.safetensors.index.json names shard {shard}" in out and "which is missing" in out
    assert f"{shard} is listed in merge_manifest.json but missing" in out
    assert "loaders not tried" in out


def test_corrupted_tensor_data_fails_the_manifest_hash(broken, capsys):
    folder = broken("reranker-bin")
    data = bytearray((folder / "pytorch_model.bin").read_bytes())
    middle = len(data) // 2  # inside the tensor records, far from the zip headers
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    (folder / "pytorch_model.bin").write_bytes(bytes(data))
    code, out = verify(capsys, folder)
    assert code == 1
    assert "pytorch_model.bin does not match its blake3 in merge_manifest.json" in out


def test_sha256_manifests_of_earlier_versions_still_verify(broken, capsys):
    import hashlib

    folder = broken("encoder-safetensors")
    manifest = json.loads((folder / "merge_manifest.json").read_text())
    files = {name: {"size": entry["size"], "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
             for name, entry in manifest["files"].items()}
    (folder / "merge_manifest.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))
    code, out = verify(capsys, folder)
    assert code == 0 and "files match merge_manifest.json (sizes and sha256)" in out
    files["config.json"]["sha256"] = "0" * 64
    (folder / "merge_manifest.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))
    code, out = verify(capsys, folder)
    assert code == 1 and "config.json does not match its sha256 in merge_manifest.json" in out
    (folder / "merge_manifest.json").write_text(json.dumps({"algorithm": "md5", "files": files}))
    code, out = verify(capsys, folder)
    assert code == 1 and "names the digest algorithm 'md5'" in out


def test_tampered_manifest(broken, capsys):
    folder = broken("encoder-safetensors")
    manifest = json.loads((folder / "merge_manifest.json").read_text())
    manifest["files"]["config.json"]["blake3"] = "0" * 64
    manifest["files"]["vocab.txt"]["size"] += 1
    del manifest["files"]["tokenizer.json"]
    manifest["files"]["extra.safetensors"] = {"size": 1, "blake3": "0" * 64}
    (folder / "merge_manifest.json").write_text(json.dumps(manifest))
    code, out = verify(capsys, folder)
    assert code == 1
    assert "config.json does not match its blake3" in out
    assert "vocab.txt has" in out and "merge_manifest.json says" in out
    assert "tokenizer.json is not listed in merge_manifest.json" in out
    assert "extra.safetensors is listed in merge_manifest.json but missing" in out

    (folder / "merge_manifest.json").write_text("{not json")
    code, out = verify(capsys, folder)
    assert code == 1 and "merge_manifest.json is not a valid manifest" in out


def test_truncated_safetensors(broken, capsys):
    folder = broken("encoder-safetensors")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    code, out = verify(capsys, folder)
    assert code == 1
    assert "cannot read model.safetensors" in out and "truncated" in out
    assert "model.safetensors has" in out  # size differs from the manifest


def test_index_and_shard_disagree(broken, capsys):
    folder = broken("m3-sharded-bin")
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[0]
    shard = index["weight_map"].pop(dropped)
    index_path.write_text(json.dumps(index))
    code, out = verify(capsys, folder)
    assert code == 1
    assert f"{shard} holds 1 tensors that pytorch_model.bin.index.json does not name, e.g. {dropped!r}" in out


def test_missing_weight_is_reported_by_the_transformers_check(merged, tmp_path, capsys):
    import torch

    folder = tmp_path / "folder"
    shutil.copytree(merged("reranker-bin"), folder)
    (folder / "merge_manifest.json").unlink()
    tensors = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del tensors["classifier.out_proj.weight"]
    torch.save(tensors, folder / "pytorch_model.bin")
    code, out = verify(capsys, folder)
    assert code == 1
    assert "transformers AutoModelForSequenceClassification: 1 weights missing from the weights, " \
           "e.g. classifier.out_proj.weight" in out


def test_one_head_missing(broken, capsys):
    folder = broken("m3-sharded-bin")
    (folder / "sparse_linear.pt").unlink()
    (folder / "merge_manifest.json").unlink()
    code, out = verify(capsys, folder)
    assert code == 1
    assert "colbert_linear.pt is present but sparse_linear.pt is missing" in out


def test_head_of_the_wrong_shape(broken, capsys):
    import torch

    folder = broken("m3-sharded-bin")
    listed = json.loads((folder / "merge_manifest.json").read_text())["files"]["colbert_linear.pt"]
    torch.save(torch.nn.Linear(16, 32).state_dict(), folder / "colbert_linear.pt")
    code, out = verify(capsys, folder)
    assert code == 1
    assert "colbert_linear.pt has weight [32, 16] and bias [32]; expected [32, 32] and [32] for hidden_size 32" in out
    assert f"merge_manifest.json says {listed['size']}" in out or "colbert_linear.pt does not match its blake3" in out


def test_missing_folder_is_a_user_error(tmp_path, capsys):
    code = run_cli("verify", tmp_path / "nope")
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: folder {tmp_path / 'nope'} does not exist"


def test_merge_verify_flag(make_models, tmp_path, capsys):
    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    code = run_cli("merge", "--model-type", "encoder", "--models", *paths, "--weights", "0.5", "0.5", "-o", out, "--verify")
    assert code == 0
    assert capsys.readouterr().out.startswith(f"wrote and verified {out}")


def test_merge_verify_failure_keeps_the_previous_output(make_models, tmp_path, capsys, monkeypatch):
    fail_verification(monkeypatch)
    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("good output")
    code = run_cli("merge", "--model-type", "encoder", "--models", *paths, "--weights", "0.5", "0.5", "-o", out,
                   "--verify", "--overwrite", "--force", "-q")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("error: the merged output failed verification, nothing was written:")
    assert "missing from the weights" in err
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert leftovers(tmp_path, "merged") == []


def test_sample_is_deterministic_and_covers_extremes(merged):
    from merge_hooks.checkpoint import Checkpoint
    from merge_hooks.verify import sample_names

    with Checkpoint(merged("encoder-safetensors")) as ckpt:
        specs = list(ckpt.specs.values())
    sample = sample_names(specs)
    assert sample == sample_names(list(reversed(specs)))
    assert sample[0] == max(specs, key=lambda s: (s.nbytes, s.name)).name
    assert sample[1] == min(specs, key=lambda s: (s.nbytes, s.name)).name
    assert 3 <= len(sample) <= 6 and len(set(sample)) == len(sample)


def test_truncated_header_names_the_file(broken, capsys):
    folder = broken("encoder-safetensors")
    path = folder / "model.safetensors"
    header_end = 8 + len(json.dumps({}))  # a few bytes into the JSON header
    path.write_bytes(path.read_bytes()[:header_end])
    with pytest.raises(ValueError):
        read_safetensors_header(path)
    code, out = verify(capsys, folder)
    assert code == 1 and "cannot read model.safetensors" in out

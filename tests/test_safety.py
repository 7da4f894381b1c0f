"""Adversarial inputs: nothing outside the named folders is deleted, modified, read or run.

Each refusal is exit 2 with one ``error:`` line, and the scratch folder (inputs, outputs, anything
beside them) is byte for byte what it was before. Models are copies of the session's tiny models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import fail_verification, leftovers, weight_files
from merge_hooks.cli import main
from merge_hooks.errors import MergeHooksError

REPO = Path(__file__).resolve().parents[1]
MERGE = ["merge", "--weights", "0.5", "0.5", "-q"]


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (symlinks not followed): its kind and content hash or link target."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                state[rel] = "link:" + os.readlink(path)
            elif stat.S_ISDIR(mode):
                state[rel] = "dir"
            elif stat.S_ISREG(mode):
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[rel] = f"special:{stat.S_IFMT(mode)}"
    return state


def refused(root: Path, capsys, *args, match: str) -> str:
    """Run the CLI, expect exit 2 with one error line containing ``match``, and nothing under ``root`` changed."""
    before = snapshot(root)
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    assert snapshot(root) == before
    return err


def copy_models(make_models, root: Path, family: str = "bert-reranker", names=("rr_0", "rr_1"), **options) -> list[Path]:
    copies = []
    for source, name in zip(make_models(family, len(names), **options), names):
        copies.append(Path(shutil.copytree(source, root / name)))
    return copies


@pytest.fixture
def scratch(make_models, tmp_path, monkeypatch):
    """A scratch folder holding copies of two rerankers and an unrelated file; the current directory."""
    root = tmp_path / "scratch"
    root.mkdir()
    copy_models(make_models, root)
    (root / "notes.txt").write_text("not a model")
    monkeypatch.chdir(root)
    return root


def rerankers(*extra):
    return [*MERGE, "--model-type", "reranker", "--models", "rr_0", "rr_1", *extra]


# --- the output location ----------------------------------------------------------------------------------


@pytest.mark.parametrize("output, match", [
    ("rr_1/../rr_0", "is input model"),
    ("rr_0", "is input model"),
    ("./rr_0/", "is input model"),
    ("rr_0/merged", "lies inside input model"),
    ("rr_0/sub/merged", "lies inside input model"),
    ("", "empty"),
    (".", "names no folder"),
    ("./", "names no folder"),
    ("..", "names no folder"),
    ("/", "names no folder"),
])
@pytest.mark.parametrize("flags", [(), ("--overwrite",), ("--overwrite", "--force")])
def test_output_that_could_destroy_an_input_or_the_cwd_is_refused(scratch, capsys, output, match, flags):
    refused(scratch.parent, capsys, *rerankers("-o", output, *flags), match=match)


def test_output_holding_the_inputs_is_refused(scratch, capsys):
    (scratch / "models").mkdir()
    for name in ("rr_0", "rr_1"):
        (scratch / name).rename(scratch / "models" / name)
    args = [*MERGE, "--model-type", "reranker", "--models", "models/rr_0", "models/rr_1"]
    refused(scratch.parent, capsys, *args, "-o", "models", "--overwrite", "--force", match="holds input model")


def test_inputs_through_symlinks_are_caught_by_either_name(scratch, capsys):
    links = scratch / "links"
    links.mkdir()
    (links / "a").symlink_to("../rr_0")
    (links / "b").symlink_to("../rr_1")
    args = [*MERGE, "--model-type", "reranker", "--models", "links/a", "links/b"]
    # The folder holding the symlinks, and the folder the symlinks point into.
    refused(scratch.parent, capsys, *args, "-o", "links", "--overwrite", "--force", match="holds input model")
    refused(scratch.parent, capsys, *args, "-o", "rr_0", "--overwrite", "--force", match="is input model")
    # The output named through a symlinked parent folder.
    (scratch / "here").symlink_to(".")
    refused(scratch.parent, capsys, *args, "-o", "here/rr_1", "--overwrite", "--force", match="is input model")


def test_symlinked_output_is_refused(scratch, capsys):
    (scratch / "out").symlink_to("rr_0")
    refused(scratch.parent, capsys, *rerankers("-o", "out", "--overwrite", "--force"), match="is a symlink")
    (scratch / "gone").symlink_to("does-not-exist")
    refused(scratch.parent, capsys, *rerankers("-o", "gone"), match="is a dangling symlink")


def test_home_and_its_parents_are_refused(scratch, capsys, monkeypatch):
    home = scratch / "home"
    home.mkdir()
    (home / ".bashrc").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    refused(scratch.parent, capsys, *rerankers("-o", "~", "--overwrite", "--force"), match="home directory")
    refused(scratch.parent, capsys, *rerankers("-o", str(home), "--overwrite", "--force"), match="home directory")


def test_a_parent_of_the_current_directory_is_refused(scratch, capsys, monkeypatch):
    (scratch / "deep").mkdir()
    monkeypatch.chdir(scratch / "deep")
    args = [*MERGE, "--model-type", "reranker", "--models", "../rr_0", "../rr_1"]
    refused(scratch.parent, capsys, *args, "-o", "..", "--overwrite", "--force", match="names no folder")
    refused(scratch.parent, capsys, *args, "-o", str(scratch), "--overwrite", "--force", match="current directory")


def test_overwrite_replaces_only_merge_hooks_outputs(scratch, capsys):
    other = scratch / "data"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    refused(scratch.parent, capsys, *rerankers("-o", "data", "--overwrite"), match="pass --force")
    assert run_cli(*rerankers("-o", "merged")) == 0
    assert run_cli(*rerankers("-o", "merged", "--overwrite")) == 0  # its own output
    assert weight_files(scratch / "merged") == ["model.safetensors"]
    assert run_cli(*rerankers("-o", "data", "--overwrite", "--force")) == 0
    assert not (other / "thesis.tex").exists() and weight_files(other) == ["model.safetensors"]
    assert leftovers(scratch, "merged") == [] and leftovers(scratch, "data") == []


def test_empty_output_in_a_recipe_and_through_the_api(scratch, capsys):
    from merge_hooks.recipe import recipe_from_dict

    recipe = scratch / "r.yaml"
    recipe.write_text(json.dumps({"model_type": "reranker", "models": [{"path": "rr_0", "weight": 0.5},
                                                                      {"path": "rr_1", "weight": 0.5}],
                                  "output": {"path": ""}}))
    refused(scratch.parent, capsys, "merge", recipe, "--overwrite", "--force", match="output path is empty")
    with pytest.raises(MergeHooksError, match="output path is empty"):
        recipe_from_dict({"model_type": "reranker", "models": [{"path": "rr_0", "weight": 1.0}] * 2,
                          "output": {"path": "  "}})


def test_unwritable_output_locations(scratch, capsys):
    refused(scratch.parent, capsys, *rerankers("-o", "notes.txt/merged"), match="not a writable folder")
    refused(scratch.parent, capsys, *rerankers("-o", "notes.txt"), match="is a file")
    refused(scratch.parent, capsys, *rerankers("-o", "/proc/merge-hooks-out"), match="/proc")
    if os.geteuid() != 0:  # root writes anywhere
        locked = scratch / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            refused(scratch.parent, capsys, *rerankers("-o", "locked/merged"), match="not a writable folder")
        finally:
            locked.chmod(0o755)


def test_python_api_refuses_too(scratch):
    from merge_hooks.pipeline import run_recipe
    from merge_hooks.recipe import recipe_from_dict

    before = snapshot(scratch.parent)
    recipe = recipe_from_dict({"model_type": "reranker", "models": [{"path": "rr_0", "weight": 0.5},
                                                                   {"path": "rr_1", "weight": 0.5}],
                               "output": {"path": "rr_1/../rr_0"}})
    with pytest.raises(MergeHooksError, match="is input model"):
        run_recipe(recipe, overwrite=True, force=True)
    with pytest.raises(MergeHooksError, match="needs a Recipe"):
        run_recipe({"model_type": "reranker"})
    with pytest.raises(MergeHooksError):
        recipe_from_dict({"model_type": "reranker", "models": "rr_0", "output": {"path": "x"}})
    from merge_hooks.paths import check_output_location

    with pytest.raises(MergeHooksError, match="must be a string or path"):
        check_output_location(3)
    assert snapshot(scratch.parent) == before


@pytest.mark.parametrize("dst", ["rr_0", "link", "rr_0/converted", "."])
def test_convert_never_writes_over_or_into_its_source(scratch, capsys, dst):
    (scratch / "link").symlink_to("rr_0")
    match = "names no folder" if dst == "." else "symlink" if dst == "link" else "input model"
    refused(scratch.parent, capsys, "convert", "link", dst, "--overwrite", "--force", "-q", match=match)
    refused(scratch.parent, capsys, "convert", "rr_0", dst, "--overwrite", "--force", "-q", match=match)


def test_convert_of_a_source_reached_through_a_symlink_with_overwrite(scratch, capsys):
    (scratch / "src").symlink_to("rr_0")
    refused(scratch.parent, capsys, "convert", "src", "rr_0", "--overwrite", "-q", match="is input model")
    assert run_cli("convert", "src", "copy", "--save-format", "bin", "-q") == 0
    assert weight_files(scratch / "copy") == ["pytorch_model.bin"]


# --- failures leave no folders ----------------------------------------------------------------------------


def test_a_failed_run_removes_the_parent_folders_it_created(encoders, scratch, capsys):
    (scratch / "examples.jsonl").write_text("not json\n")
    args = [*MERGE[:1], "-q", "--model-type", "encoder", "--method", "mix_models_with_data",
            "--models", "enc_0", "enc_1", "--examples", "examples.jsonl"]
    refused(scratch.parent, capsys, *args, "-o", "new/deeper/merged", match="not JSON lines")
    assert not (scratch / "new").exists()


def test_a_failed_verify_removes_the_parent_folders_it_created(scratch, capsys, monkeypatch):
    fail_verification(monkeypatch)
    refused(scratch.parent, capsys, *rerankers("-o", "new/deeper/merged", "--verify"), match="failed verification")
    assert not (scratch / "new").exists()


# --- commit without races ---------------------------------------------------------------------------------


def _writer_that_meddles(monkeypatch, meddle):
    """Make the safetensors writer call ``meddle()`` once, while the merge is being written."""
    import merge_hooks.io.safetensors_io as io

    real_write = io.write_safetensors

    def write(path, source, **kwargs):
        meddle()
        return real_write(path, source, **kwargs)

    monkeypatch.setattr(io, "write_safetensors", write)


def test_a_folder_created_at_the_target_during_the_merge_is_kept(scratch, capsys, monkeypatch):
    out = scratch / "merged"

    def create():
        out.mkdir()
        (out / "theirs.txt").write_text("written by someone else meanwhile")

    _writer_that_meddles(monkeypatch, create)
    err = refused(scratch / "rr_0", capsys, *rerankers("-o", "merged"), match="changed while this run was writing")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    kept = [p for p in scratch.iterdir() if p.name.startswith("merged.merge-hooks-new-")]
    assert len(kept) == 1 and str(kept[0]) in err and weight_files(kept[0]) == ["model.safetensors"]
    assert leftovers(scratch, "merged") == []


def test_an_output_changed_during_an_overwrite_is_kept(scratch, capsys, monkeypatch):
    out = scratch / "merged"
    assert run_cli(*rerankers("-o", "merged")) == 0
    before = snapshot(out)

    def meddle():
        (out / "merge_info.json").write_text('{"changed": true}\n')

    _writer_that_meddles(monkeypatch, meddle)
    err = refused(scratch / "rr_0", capsys, *rerankers("-o", "merged", "--overwrite"), match="changed while")
    assert snapshot(out) == {**before, "merge_info.json": hashlib.sha256(b'{"changed": true}\n').hexdigest()}
    assert any(p.name.startswith("merged.merge-hooks-new-") and str(p) in err for p in scratch.iterdir())


SLOW_MERGE = """
import sys, time
from pathlib import Path
import merge_hooks.io.safetensors_io as io
from merge_hooks.cli import main

marker = Path(sys.argv[1])
real_write = io.write_safetensors

def slow_write(path, source, **kwargs):
    marker.touch()
    time.sleep(3)
    return real_write(path, source, **kwargs)

io.write_safetensors = slow_write
main(sys.argv[2:])
"""


def test_two_merges_to_one_output_one_wins_the_other_fails_clearly(scratch, capsys):
    marker = scratch.parent / "writing"
    first = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(marker), *rerankers("-o", "merged")],
                             cwd=scratch, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    code = run_cli(*rerankers("-o", "merged", "--overwrite"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: another merge-hooks run is writing") and "\n" not in err
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    assert weight_files(scratch / "merged") == ["model.safetensors"]
    assert (scratch / "merged" / "merge_info.json").is_file()
    assert leftovers(scratch, "merged") == []


# --- reading only inside the model folders ---------------------------------------------------------------


@pytest.fixture
def encoders(make_models, scratch):
    return copy_models(make_models, scratch, "bert-encoder", ("enc_0", "enc_1"), pooling="mean")


def encoder_args(*extra):
    return [*MERGE, "--model-type", "encoder", "--models", "enc_0", "enc_1", "-o", "merged", *extra]


def _set_module_path(folder: Path, index: int, path: str) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    modules[index]["path"] = path
    (folder / "modules.json").write_text(json.dumps(modules))


@pytest.mark.parametrize("module_path", ["../../../secret", "../secret", "/etc", "1_Pooling/../../secret"])
def test_module_paths_outside_the_model_are_refused(encoders, scratch, capsys, module_path):
    (scratch.parent / "secret").mkdir()
    (scratch.parent / "secret" / "key").write_text("private")
    _set_module_path(encoders[0], 1, module_path)
    refused(scratch.parent, capsys, *encoder_args(), match="lies outside that folder")


def test_bad_sidecar_files_are_found_before_anything_is_merged(encoders, scratch, capsys, monkeypatch):
    import merge_hooks.engines.stream as stream

    def no_merge(*args, **kwargs):
        raise AssertionError("the merge ran before the sidecar files were checked")

    monkeypatch.setattr(stream, "stream_merge", no_merge)
    _set_module_path(encoders[0], 1, "../enc_1")
    refused(scratch.parent, capsys, *encoder_args(), match="lies outside that folder")
    _set_module_path(encoders[0], 1, "1_Pooling")
    (encoders[0] / "tokenizer_config.json").write_text("[]")
    refused(scratch.parent, capsys, *encoder_args(), match="must hold a JSON object")


def test_symlinks_out_of_a_model_are_refused(encoders, scratch, capsys):
    secret = scratch.parent / "secret.txt"
    secret.write_text("private")
    tokenizer = encoders[0] / "tokenizer.json"
    tokenizer.unlink()
    tokenizer.symlink_to(secret)
    refused(scratch.parent, capsys, *encoder_args(), match="'tokenizer.json'")
    tokenizer.unlink()
    shutil.copy2(encoders[1] / "tokenizer.json", tokenizer)
    # A symlinked file, and a symlinked folder, inside a sentence-transformers module.
    pooling = encoders[0] / "1_Pooling"
    (pooling / "extra.txt").symlink_to(secret)
    refused(scratch.parent, capsys, *encoder_args(), match="'1_Pooling/extra.txt'")
    (pooling / "extra.txt").unlink()
    (pooling / "sub").symlink_to(scratch.parent)
    refused(scratch.parent, capsys, *encoder_args(), match="symlink to a folder")


@pytest.mark.parametrize("entry", ["../rr_1/model.safetensors", "ABSOLUTE", "sub/../../rr_1/model.safetensors"])
def test_weight_index_entries_outside_the_model_are_refused(make_models, scratch, capsys, entry):
    sharded = copy_models(make_models, scratch, "bert-reranker", ("sh_0", "sh_1"), max_shard_size="20KB")
    index_path = sharded[0] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = str(scratch / "rr_1" / "model.safetensors") if entry == "ABSOLUTE" else entry
    index_path.write_text(json.dumps(index))
    args = [*MERGE, "--model-type", "reranker", "--models", "sh_0", "sh_1", "-o", "merged"]
    refused(scratch.parent, capsys, *args, match="lies outside that folder")
    # A shard that is a symlink to another model's file.
    index["weight_map"][name] = "model-00001-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    (sharded[0] / "model-00001-of-00009.safetensors").symlink_to(scratch / "rr_1" / "model.safetensors")
    refused(scratch.parent, capsys, *args, match="lies outside that folder")


def test_bge_m3_heads_outside_the_model_are_refused(make_models, scratch, capsys):
    m3 = copy_models(make_models, scratch, "xlmr-m3", ("m3_0", "m3_1"))
    head = m3[0] / "colbert_linear.pt"
    outside = scratch.parent / "colbert_linear.pt"
    head.rename(outside)
    head.symlink_to(outside)
    args = [*MERGE, "--model-type", "encoder", "--models", "m3_0", "m3_1", "-o", "merged"]
    refused(scratch.parent, capsys, *args, match="lies outside that folder")


def test_verify_never_opens_manifest_entries_outside_the_folder(scratch, capsys):
    assert run_cli(*rerankers("-o", "merged")) == 0
    secret = scratch.parent / "secret.bin"
    secret.write_bytes(b"x" * 12345)
    manifest_path = scratch / "merged" / "merge_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../../secret.bin"] = {"size": 1, "blake3": "0" * 64}
    manifest["files"][str(secret)] = {"size": 1, "blake3": "0" * 64}
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("verify", "merged") == 1
    report = capsys.readouterr().out
    assert report.count("lies outside the folder; it was not opened") == 2
    assert "12345" not in report
    # Weights that are a symlink to another model's file are not read either.
    weights = scratch / "merged" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(scratch / "rr_1" / "model.safetensors")
    assert run_cli("verify", "merged") == 1
    assert "model.safetensors is a symlink out of the folder; it was not opened" in capsys.readouterr().out


def _as_cache_snapshot(folder: Path, cache: Path, repo: str) -> Path:
    """Lay ``folder`` out as a Hugging Face cache snapshot: every file a relative symlink into ``blobs/``."""
    repo_dir = cache / f"models--org--{repo}"
    snapshot_dir = repo_dir / "snapshots" / ("0" * 40)
    (repo_dir / "blobs").mkdir(parents=True)
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot_dir / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot_dir


def test_a_cache_snapshot_with_symlinks_into_blobs_still_merges(encoders, scratch):
    from safetensors.torch import load_file

    snapshots = [_as_cache_snapshot(e, scratch / "hub", f"enc{i}") for i, e in enumerate(encoders)]
    assert run_cli(*encoder_args()) == 0
    assert run_cli(*MERGE, "--model-type", "encoder", "--models", *snapshots, "-o", "from-cache") == 0
    expected, actual = load_file(scratch / "merged" / "model.safetensors"), load_file(scratch / "from-cache" / "model.safetensors")
    assert sorted(actual) == sorted(expected) and all(torch.equal(actual[k], expected[k]) for k in expected)
    for name in ("tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert not (scratch / "from-cache" / name).is_symlink()
        assert (scratch / "from-cache" / name).read_bytes() == (encoders[0] / name).read_bytes()


# --- remote code --------------------------------------------------------------------------------------------


def _add_tokenizer_code(folder: Path, marker: Path) -> None:
    (folder / "tokenization_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("engine", ["cocktail", "auto", "stream"])
def test_tokenizer_auto_map_needs_trust_remote_code(scratch, capsys, engine):
    marker = scratch.parent / "code-ran"
    _add_tokenizer_code(scratch / "rr_0", marker)
    refused(scratch.parent, capsys, *rerankers("-o", "merged", "--engine", engine), match="auto_map in its tokenizer_config.json")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["processor_config.json", "preprocessor_config.json"])
def test_auto_map_in_any_config_needs_trust_remote_code(scratch, capsys, name):
    (scratch / "rr_1" / name).write_text(json.dumps({"auto_map": {"AutoProcessor": "processing_x.P"}}))
    refused(scratch.parent, capsys, *rerankers("-o", "merged", "--engine", "cocktail"), match=f"auto_map in its {name}")


def test_custom_sentence_transformers_modules_need_trust_remote_code(encoders, scratch, capsys):
    modules = json.loads((encoders[1] / "modules.json").read_text())
    modules[1]["type"] = "custom_pooling.MyPooling"
    (encoders[1] / "modules.json").write_text(json.dumps(modules))
    refused(scratch.parent, capsys, *encoder_args(), match="module type custom_pooling.MyPooling")


def test_cocktail_engine_refuses_custom_code_when_called_directly(scratch):
    from merge_hooks.engines.cocktail import run_cocktail

    marker = scratch.parent / "code-ran"
    _add_tokenizer_code(scratch / "rr_0", marker)
    with pytest.raises(MergeHooksError, match="custom code"):
        run_cocktail("mix_models", ["rr_0", "rr_1"], "reranker", weights=[0.5, 0.5])
    assert not marker.exists()


CONFIGURATION = """
from transformers import BertConfig


class CustomBertConfig(BertConfig):
    model_type = "custom-bert"
"""
MODELING = """
from transformers import BertModel

from .configuration_custom import CustomBertConfig


class CustomBertModel(BertModel):
    config_class = CustomBertConfig
"""


def test_custom_code_model_merges_with_trust_remote_code_and_its_output_loads(encoders, scratch, capsys):
    from transformers import AutoModel

    for folder in encoders:
        (folder / "configuration_custom.py").write_text(CONFIGURATION)
        (folder / "modeling_custom.py").write_text(MODELING)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="custom-bert", architectures=["CustomBertModel"],
                      auto_map={"AutoConfig": "configuration_custom.CustomBertConfig",
                                "AutoModel": "modeling_custom.CustomBertModel"})
        (folder / "config.json").write_text(json.dumps(config))
    refused(scratch.parent, capsys, *encoder_args(), match="auto_map in its config.json")
    assert run_cli(*encoder_args("--trust-remote-code")) == 0
    out = scratch / "merged"
    assert (out / "modeling_custom.py").read_text() == MODELING
    assert (out / "configuration_custom.py").read_text() == CONFIGURATION
    merged = AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert type(merged).__name__ == "CustomBertModel"
    inputs = [AutoModel.from_pretrained(str(f), trust_remote_code=True).state_dict() for f in encoders]
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, 0.5 * inputs[0][name] + 0.5 * inputs[1][name], atol=1e-6), name


# --- inputs validated as strictly as their libraries --------------------------------------------------------


def _rewrite_safetensors_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])


def _overlap(header):
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (first_begin, first_end), _ = tensors[0]
    for (begin, end), name in tensors[1:]:
        if end - begin == first_end - first_begin:
            # Point it at the first tensor's bytes: same size, overlapping range.
            header[name]["data_offsets"] = [first_begin, first_end]
            return
    raise AssertionError("no two tensors of the same size")


def _huge_dims(header):
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [0, 2**64]


@pytest.mark.parametrize("edit, match", [(_overlap, "overlaps"), (_huge_dims, "impossible shape")])
def test_corrupt_safetensors_headers_are_refused(scratch, capsys, edit, match):
    _rewrite_safetensors_header(scratch / "rr_1" / "model.safetensors", edit)
    refused(scratch.parent, capsys, *rerankers("-o", "merged"), match=match)


def test_safetensors_data_must_tile_the_file(tmp_path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from merge_hooks.io.safetensors_io import read_safetensors_header

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, path)
    with path.open("ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(SafetensorError):
        load_file(path)  # the library refuses the trailing bytes...
    with pytest.raises(ValueError, match="ends at byte"):
        read_safetensors_header(path)  # ...and so does the reader here

    def gap(header):
        header["b"]["data_offsets"] = [x + 8 for x in header["b"]["data_offsets"]]

    _rewrite_safetensors_header(path, gap)
    with pytest.raises(ValueError, match="gap"):
        read_safetensors_header(path)


def test_tensor_dtype_kinds_must_agree(scratch, capsys):
    from safetensors.torch import load_file, save_file

    path = scratch / "rr_1" / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k, v in tensors.items() if v.dtype == torch.float32)
    tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, path, metadata={"format": "pt"})
    refused(scratch.parent, capsys, *rerankers("-o", "merged"), match="float32 (floating) vs int64 (integer)")


def _encoder_with_data(examples: str):
    return [*MERGE[:1], "-q", "--model-type", "encoder", "--method", "mix_models_with_data",
            "--models", "enc_0", "enc_1", "--examples", examples, "-o", "merged"]


def test_examples_must_be_a_bounded_regular_file(encoders, scratch, capsys):
    refused(scratch.parent, capsys, *_encoder_with_data("/dev/zero"), match="not a regular file")
    refused(scratch.parent, capsys, *_encoder_with_data("enc_0"), match="not a regular file")
    big = scratch.parent / "big.jsonl"
    with big.open("wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: no disk used
    refused(scratch.parent, capsys, *_encoder_with_data(str(big)), match="more than the")


def test_a_named_pipe_as_examples_is_an_error_not_a_hang(encoders, scratch):
    fifo = scratch.parent / "examples.fifo"
    os.mkfifo(fifo)
    before = snapshot(scratch)
    done = subprocess.run([sys.executable, "-m", "merge_hooks", *_encoder_with_data(str(fifo))], cwd=scratch,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("error: ") and "not a regular file" in err and "\n" not in err
    assert snapshot(scratch) == before


# --- one error line for malformed files ---------------------------------------------------------------------


@pytest.mark.parametrize("name, content, match", [
    ("config.json", "[]", "must hold a JSON object, not list"),
    ("config.json", "null", "must hold a JSON object, not NoneType"),
    ("config.json", "{", "is not valid JSON"),
    ("tokenizer_config.json", "[1]", "must hold a JSON object"),
    ("tokenizer_config.json", "null", "must hold a JSON object"),
])
def test_malformed_json_files_are_one_error_line(scratch, capsys, name, content, match):
    (scratch / "rr_0" / name).write_text(content)
    refused(scratch.parent, capsys, *rerankers("-o", "merged"), match=match)


@pytest.mark.parametrize("content, match", [
    ('{"idx": 0}', "must hold a JSON list"),
    ("[null]", "needs a string 'type' and 'path'"),
    ('[{"type": "sentence_transformers.models.Pooling", "path": 3}]', "needs a string 'type' and 'path'"),
])
def test_malformed_modules_json_is_one_error_line(encoders, scratch, capsys, content, match):
    (encoders[0] / "modules.json").write_text(content)
    refused(scratch.parent, capsys, *encoder_args(), match=match)


@pytest.mark.parametrize("content, match", [
    ("[]", "must hold a JSON object"),
    ('{"weight_map": null}', "not a valid weight index"),
    ('{"weight_map": {"a": 1}}', "not a valid weight index"),
])
def test_malformed_weight_index_is_one_error_line(make_models, scratch, capsys, content, match):
    sharded = copy_models(make_models, scratch, "bert-reranker", ("sh_0", "sh_1"), max_shard_size="20KB")
    (sharded[1] / "model.safetensors.index.json").write_text(content)
    args = [*MERGE, "--model-type", "reranker", "--models", "sh_0", "sh_1", "-o", "merged"]
    refused(scratch.parent, capsys, *args, match=match)


def test_empty_pytorch_model_bin_is_one_error_line(make_models, scratch, capsys):
    bins = copy_models(make_models, scratch, "bert-reranker", ("bin_0", "bin_1"), weights_format="bin")
    (bins[1] / "pytorch_model.bin").write_bytes(b"")
    args = [*MERGE, "--model-type", "reranker", "--models", "bin_0", "bin_1", "-o", "merged"]
    refused(scratch.parent, capsys, *args, match="the file is empty")

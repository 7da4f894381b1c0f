"""The command line: merges from recipes and flags, formats, convert, and one clear line per user error."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import assert_same_tensors, cli_subprocess, leftovers, load_state_dict, weight_files
from merge_hooks.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def encoder_recipe(paths, out, **extra) -> dict:
    data = {
        "model_type": "encoder",
        "models": [{"path": str(paths[0]), "weight": 0.6}, {"path": str(paths[1]), "weight": 0.4}],
        "output": {"path": str(out)},
    }
    data.update(extra)
    return data


@pytest.fixture
def encoders(make_models):
    return make_models("bert-encoder", 2, pooling="mean")


def test_merge_recipe_with_save_format_flag(encoders, tmp_path, capsys):
    from helpers import lm_cocktail_state_dict

    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "r.yaml", encoder_recipe(encoders, out, output={"path": str(out), "save_format": "safetensors"}))
    assert run_cli("merge", recipe, "--save-format", "bin") == 0
    assert weight_files(out) == ["pytorch_model.bin"]
    summary = capsys.readouterr().out
    assert f"wrote {out}" in summary and "pytorch_model.bin" in summary
    expected = lm_cocktail_state_dict("mix_models", encoders, "encoder", [0.6, 0.4])
    assert_same_tensors(load_state_dict(out, "encoder"), expected)
    # The source's mean pooling is kept (LM_Cocktail would force CLS).
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["pooling_mode_cls_token"] is False


def test_merge_from_flags_without_recipe(encoders, tmp_path):
    out = tmp_path / "merged"
    code = run_cli("merge", "--model-type", "encoder", "--models", *encoders, "--weights", "0.5", "0.5",
                   "--output", out, "--save-format", "both", "-q")
    assert code == 0
    assert weight_files(out) == ["model.safetensors", "pytorch_model.bin"]


def test_formats_lists_builtins(capsys):
    assert run_cli("formats") == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"safetensors", "bin", "both"} <= set(names)


def test_convert_safetensors_to_bin_keeps_sidecars(encoders, tmp_path):
    out = tmp_path / "converted"
    assert run_cli("convert", encoders[0], out, "--save-format", "bin", "-q") == 0
    assert weight_files(out) == ["pytorch_model.bin"]
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    assert_same_tensors(load_state_dict(out, "encoder"), load_state_dict(encoders[0], "encoder"))


def test_overwrite_replaces_output(encoders, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    args = ["merge", "--model-type", "encoder", "--models", *encoders, "--weights", "0.5", "0.5", "-o", out, "-q"]
    assert run_cli(*args) == 2
    assert (out / "old.txt").read_text() == "previous"
    # Not a merge-hooks output: --overwrite alone refuses it, --force replaces it.
    assert run_cli(*args, "--overwrite") == 2
    assert (out / "old.txt").read_text() == "previous"
    assert run_cli(*args, "--overwrite", "--force") == 0
    assert not (out / "old.txt").exists() and weight_files(out) == ["model.safetensors"]
    # A merge-hooks output: --overwrite replaces it.
    assert run_cli(*args, "--overwrite") == 0
    assert weight_files(out) == ["model.safetensors"]
    assert leftovers(tmp_path, "merged") == []


# --- bad input: one line "error: ...", exit 2, nothing written -----------------------------------------------


def _bad(tmp_path, capsys, *args) -> str:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()
    assert leftovers(tmp_path, "merged") == []
    return err


def test_missing_recipe(tmp_path, capsys):
    assert "does not exist" in _bad(tmp_path, capsys, "merge", tmp_path / "nope.yaml")


def test_unreadable_recipe(tmp_path, capsys):
    folder = tmp_path / "a-folder.yaml"
    folder.mkdir()
    assert "cannot read recipe" in _bad(tmp_path, capsys, "merge", folder)


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_type: encoder\nmodels:\n  - path: a\n    weight: [0.5\noutput: {}\n")
    err = _bad(tmp_path, capsys, "merge", recipe)
    assert "YAML syntax error" in err and "line 5" in err


def test_unknown_key_names_its_path(encoders, tmp_path, capsys):
    data = encoder_recipe(encoders, tmp_path / "merged")
    data["output"]["formatt"] = "bin"
    err = _bad(tmp_path, capsys, "merge", write_recipe(tmp_path / "r.yaml", data))
    assert "unknown key 'output.formatt'" in err


@pytest.mark.parametrize(
    "models, expected",
    [
        ([{"path": "a", "weight": 1.0}], "at least two models"),
        ([{"path": "a", "weight": 1.2}, {"path": "b", "weight": -0.2}], "must be >= 0"),
        ([{"path": "a", "weight": 0.1}, {"path": "b", "weight": 0.1}], "must sum to 1"),
        ([{"path": "a", "weight": 0.5}, {"path": "b"}], "models.1.weight is missing"),
    ],
)
def test_bad_weights(models, expected, tmp_path, capsys):
    data = {"model_type": "encoder", "models": models, "output": {"path": str(tmp_path / "merged")}}
    assert expected in _bad(tmp_path, capsys, "merge", write_recipe(tmp_path / "r.yaml", data))


def test_weight_count_differs_from_model_count(encoders, tmp_path, capsys):
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", *encoders,
               "--weights", "0.2", "0.3", "0.5", "-o", tmp_path / "merged")
    assert "2 models but 3 weights" in err


def test_model_path_missing_or_without_config(encoders, tmp_path, capsys):
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", encoders[0], tmp_path / "missing",
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert "does not exist" in err and "missing" in err
    empty = tmp_path / "empty-model"
    empty.mkdir()
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", encoders[0], empty,
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert "has no config.json" in err


def test_different_architectures(make_models, tmp_path, capsys):
    encoder = make_models("bert-encoder", 1)[0]
    reranker = make_models("bert-reranker", 1)[0]
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", encoder, reranker,
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert "differ in architectures" in err


def test_different_tensor_shapes_name_the_tensor(make_models, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    a = make_models("bert-encoder", 1)[0]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tensors = load_file(b / "model.safetensors")
    name = "encoder.layer.1.output.dense.bias"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, b / "model.safetensors", metadata={"format": "pt"})
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", a, b,
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert f"'{name}'" in err and "shape" in err


def test_different_tensor_names(make_models, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    a = make_models("bert-encoder", 1)[0]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tensors = load_file(b / "model.safetensors")
    del tensors["pooler.dense.bias"]
    save_file(tensors, b / "model.safetensors", metadata={"format": "pt"})
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", a, b,
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert "'pooler.dense.bias' is missing" in err


def test_unknown_save_format_lists_known(encoders, tmp_path, capsys):
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", *encoders,
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged", "--save-format", "npz")
    assert "unknown save format 'npz'" in err and "bin, both, gguf, onnx, safetensors" in err


def test_output_exists_and_is_not_empty(encoders, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = run_cli("merge", "--model-type", "encoder", "--models", *encoders, "--weights", "0.5", "0.5", "-o", out)
    err = capsys.readouterr().err
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_output_is_a_file(encoders, tmp_path, capsys):
    out = tmp_path / "merged"
    out.write_text("a file")
    code = run_cli("merge", "--model-type", "encoder", "--models", *encoders, "--weights", "0.5", "0.5", "-o", out)
    assert code == 2 and "is a file" in capsys.readouterr().err
    assert out.read_text() == "a file"


def test_custom_code_needs_trust_remote_code(encoders, tmp_path, capsys):
    import shutil

    b = tmp_path / "custom"
    shutil.copytree(encoders[1], b)
    config = json.loads((b / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (b / "config.json").write_text(json.dumps(config))
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", encoders[0], b,
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert "custom code" in err and "trust_remote_code" in err


def test_hub_id_not_cached_while_offline(encoders, tmp_path, capsys):
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", encoders[0], "BAAI/bge-base-en-v1.5",
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert "'BAAI/bge-base-en-v1.5'" in err and "HF_HUB_OFFLINE" in err


def test_not_enough_disk_space(encoders, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    err = _bad(tmp_path, capsys, "merge", "--model-type", "encoder", "--models", *encoders,
               "--weights", "0.5", "0.5", "-o", tmp_path / "merged")
    assert "not enough disk space" in err and "1000 bytes" in err


def test_subprocess_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "merge_hooks", "merge", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: recipe {tmp_path / 'none.yaml'} does not exist"]


def test_help_and_formats_do_not_import_torch():
    code = ("import sys; from merge_hooks.cli import main\n"
            "try:\n    main(['formats'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_convert_a_merged_folder_keeps_it_verifiable(encoders, tmp_path, capsys):
    merged, converted = tmp_path / "merged", tmp_path / "converted"
    assert run_cli("merge", "--model-type", "encoder", "--models", *encoders, "--weights", "0.5", "0.5",
                   "-o", merged, "-q") == 0
    assert run_cli("convert", merged, converted, "--save-format", "bin", "--dtype", "float16", "-q") == 0
    assert weight_files(converted) == ["pytorch_model.bin"]
    info = json.loads((converted / "merge_info.json").read_text())
    assert info["save_format"] == "bin" and info["dtype"] == "float16"
    manifest = json.loads((converted / "merge_manifest.json").read_text())
    assert "pytorch_model.bin" in json.dumps(manifest) and "model.safetensors" not in json.dumps(manifest)
    capsys.readouterr()
    assert run_cli("verify", converted) == 0, capsys.readouterr().out


# --- global flags, quiet, one-line errors, pipes -----------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_before_or_after_the_command(where, encoders, tmp_path):
    merge = ["merge", "--model-type", "encoder", "--models", *encoders, "--weights", "0.5", "0.5"]
    quiet = ["-q", *merge] if where == "before" else [*merge, "-q"]
    proc = cli_subprocess(*quiet, "-o", tmp_path / "quiet")
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    verbose = ["-v", *merge] if where == "before" else [*merge, "-v"]
    proc = cli_subprocess(*verbose, "-o", tmp_path / "verbose")
    assert proc.returncode == 0, proc.stderr
    assert "INFO merge_hooks.pipeline: merging 2 models with the stream engine" in proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'verbose'}")


@pytest.mark.parametrize("method", ["mix_models", "mix_models_by_layers"])
def test_quiet_silences_lm_cocktails_bars(method, encoders, tmp_path):
    args = ["merge", "--model-type", "encoder", "--method", method, "--models", *encoders, "--weights", "0.5", "0.5",
            "--engine", "cocktail"]
    proc = cli_subprocess(*args, "-o", tmp_path / "quiet", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    # The control: without -q, bars name each model loaded (transformers 5's anonymous ones stay off).
    loud = cli_subprocess(*args, "-o", tmp_path / "loud")
    for path in encoders:
        assert f"LM_Cocktail loading {path}" in loud.stderr
    assert "Loading weights" not in loud.stderr
    assert ("Merging models" in loud.stderr) == (method == "mix_models_by_layers")


def test_example_scoring_bar_names_each_model(encoders, tmp_path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}) + "\n")
    args = ["merge", "--model-type", "encoder", "--method", "mix_models_with_data", "--models", *encoders,
            "--examples", examples, "--neg-number", "2"]
    loud = cli_subprocess(*args, "-o", tmp_path / "loud")
    assert loud.returncode == 0, loud.stderr
    for path in encoders:
        assert f"scoring {path} on the examples" in loud.stderr
    assert "Loading weights" not in loud.stderr
    quiet = cli_subprocess(*args, "-o", tmp_path / "quiet", "-q")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_with_data_flags_and_seed_are_recorded_and_reproducible(encoders, tmp_path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(
        json.dumps({"query": f"q {i}", "pos": [f"p {i}"], "neg": [f"n {i} {j}" for j in range(3)]}) + "\n" for i in range(3)
    ))
    weights = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        assert run_cli("merge", "--model-type", "encoder", "--method", "mix_models_with_data", "--models", *encoders,
                       "--examples", examples, "--temperature", "0.5", "--neg-number", "2", "--batch-size", "3",
                       "--max-input-length", "64", "--seed", "11", "-o", out, "-q") == 0
        info = json.loads((out / "merge_info.json").read_text())
        assert info["seed"] == 11
        weights.append(info["weights"])
        recipe = yaml.safe_load((out / "merge_recipe.yaml").read_text())
        assert {k: recipe[k] for k in ("temperature", "neg_number", "batch_size", "max_input_length", "seed")} == {
            "temperature": 0.5, "neg_number": 2, "batch_size": 3, "max_input_length": 64, "seed": 11}
    assert weights[0] == weights[1]


def test_models_flag_keeps_the_recipes_weights(encoders, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", encoder_recipe(["a", "b"], tmp_path / "unused"))
    out = tmp_path / "merged"
    assert run_cli("merge", recipe, "--models", *encoders, "-o", out, "-q") == 0
    assert json.loads((out / "merge_info.json").read_text())["weights"] == [0.6, 0.4]


def test_bin_with_python_objects_is_one_safe_line(encoders, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(encoders[0], folder)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": argparse.Namespace(a=1)}, folder / "pytorch_model.bin")
    proc = cli_subprocess("merge", "--model-type", "encoder", "--models", folder, encoders[1], "--weights", "0.5", "0.5",
                          "-o", tmp_path / "merged")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "argparse.Namespace" in proc.stderr and "weights_only" not in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_verify_into_head_ends_quietly(encoders):
    proc = cli_subprocess("verify", encoders[0], shell_tail="head -c 1")
    assert proc.stderr == "" and proc.stdout == "O"


def test_verify_report_has_no_library_warnings(encoders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extra"
    shutil.copytree(encoders[0], folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "surplus.weight": state["pooler.dense.bias"].clone()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    proc = cli_subprocess("verify", folder)
    assert proc.returncode == 1
    assert "1 weights in the weights but unused, e.g. surplus.weight" in proc.stdout
    assert proc.stderr == ""

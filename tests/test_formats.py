"""The output-format registry: built-ins, and third-party formats through the entry-point group."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest

from merge_hooks.errors import MergeHooksError
from merge_hooks.formats import OutputFormat, available_formats, get_format


def test_builtin_formats():
    formats = available_formats()
    assert {"safetensors", "bin", "both"} <= set(formats)
    assert all(isinstance(f, OutputFormat) and f.description for f in formats.values())
    assert get_format("both").alias_of == ("safetensors", "bin")


def test_unknown_format_lists_known():
    with pytest.raises(MergeHooksError, match=r"unknown save format .npy.; known formats: bin, both, .*safetensors"):
        get_format("npy")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed distribution that registers the format 'npz' through the entry-point group."""
    (tmp_path / "npz_format.py").write_text(textwrap.dedent('''
        import numpy as np
        from merge_hooks.formats import OutputFormat

        def write(source, directory, options):
            path = directory / "weights.npz"
            np.savez(path, **{s.name: source.get(s.name).float().numpy() for s in source.specs})
            return [path]

        FORMAT = OutputFormat(name="npz", description="numpy archive", write=write)
    '''))
    dist = tmp_path / "npz_format-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: npz-format\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[merge_hooks.formats]\nnpz = npz_format:FORMAT\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    available_formats.cache_clear()
    yield
    available_formats.cache_clear()
    sys.modules.pop("npz_format", None)


def test_entry_point_format_is_used_by_merge(plugin, make_models, tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    from helpers import merge

    assert "npz" in available_formats()
    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    merge(paths, "encoder", out, weights=[1.0, 0.0], save_format="npz")
    arrays = np.load(out / "weights.npz")
    original = load_file(paths[0] / "model.safetensors")
    assert sorted(arrays.files) == sorted(original)
    assert all(np.array_equal(arrays[k], original[k].numpy()) for k in original)


# --- several formats from one merge ---------------------------------------------------------------------


def test_format_names_expand_aliases_and_keep_order():
    from merge_hooks.formats import format_names

    assert format_names("safetensors") == ["safetensors"]
    assert format_names("both") == ["safetensors", "bin"]
    assert format_names("bin, safetensors") == ["bin", "safetensors"]
    assert format_names(["bin", "both"]) == ["bin", "safetensors"]
    with pytest.raises(MergeHooksError, match="unknown save format 'npy'"):
        format_names("safetensors,npy")
    with pytest.raises(MergeHooksError, match="empty save format name"):
        format_names("safetensors,")
    with pytest.raises(MergeHooksError, match="no save format given"):
        format_names([])


@pytest.mark.parametrize("save_format", [["safetensors", "bin"], "safetensors,bin"])
def test_recipe_takes_a_list_of_formats(save_format):
    from merge_hooks.recipe import OutputOptions

    options = OutputOptions(save_format=save_format)
    assert options.save_format == ["safetensors", "bin"]
    assert options.formats == ["safetensors", "bin"]
    assert OutputOptions(save_format="both").formats == ["safetensors", "bin"]
    with pytest.raises(ValueError, match="unknown save format 'npy'"):
        OutputOptions(save_format=["bin", "npy"])


def test_list_of_formats_is_written_in_one_pass(make_models, tmp_path, monkeypatch):
    """safetensors + bin from one merge: every merged tensor is computed once, and both files equal separate merges."""
    from helpers import merge
    from merge_hooks.engines import stream

    paths = make_models("bert-encoder", 3)
    computed = []
    original = stream.stream_merge

    def counting_merge(*args, **kwargs):
        result = original(*args, **kwargs)
        get, rows = result.source.get, result.source.rows
        result.source.get = lambda name: computed.append((name, None)) or get(name)
        result.source.rows = lambda name, start, stop: computed.append((name, start, stop)) or rows(name, start, stop)
        return result

    monkeypatch.setattr(stream, "stream_merge", counting_merge)
    merge(paths, "encoder", tmp_path / "together", save_format=["safetensors", "bin"])
    assert sorted(computed) == sorted(set(computed)) and len(computed) > 10
    monkeypatch.setattr(stream, "stream_merge", original)
    merge(paths, "encoder", tmp_path / "st", save_format="safetensors")
    merge(paths, "encoder", tmp_path / "bin", save_format="bin")
    together = tmp_path / "together"
    assert (together / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()
    assert (together / "pytorch_model.bin").read_bytes() == (tmp_path / "bin" / "pytorch_model.bin").read_bytes()
    info = json.loads((together / "merge_info.json").read_text())
    assert info["save_format"] == "safetensors,bin"
    manifest = json.loads((together / "merge_manifest.json").read_text())["files"]
    assert {"model.safetensors", "pytorch_model.bin"} <= set(manifest)


def test_cli_save_format_list(make_models, tmp_path, capsys):
    from merge_hooks.cli import main

    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--model-type", "encoder", "--models", *map(str, paths), "--weights", "0.5", "0.5",
              "-o", str(out), "--save-format", "bin,safetensors", "-q"])
    assert exit_info.value.code == 0
    assert (out / "model.safetensors").is_file() and (out / "pytorch_model.bin").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--model-type", "encoder", "--models", *map(str, paths), "--weights", "0.5", "0.5",
              "-o", str(tmp_path / "bad"), "--save-format", "bin,npy"])
    assert exit_info.value.code == 2
    assert "unknown save format 'npy'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --- the tee that feeds several writers -----------------------------------------------------------------


def _numbered_source(count: int, nbytes: int):
    import numpy as np

    from merge_hooks.tensors import TensorSource, TensorSpec

    specs = [TensorSpec(f"t{i}", "float32", (nbytes // 4,)) for i in range(count)]
    calls = []

    def get(name):
        calls.append(name)
        return np.full(nbytes // 4, int(name[1:]), dtype=np.float32)

    return TensorSource(specs=specs, get=get), calls


def test_tee_computes_each_tensor_once_and_bounds_what_it_holds():
    import threading
    import time

    from merge_hooks.tensors import tee

    source, calls = _numbered_source(40, 4096)
    fast, slow = tee(source, 2, budget=3 * 4096)
    seen = {"fast": [], "slow": []}
    ahead = []  # tensors computed but not yet taken by the slow writer, each time it takes one

    def read(branch, key, delay, skip=()):
        for spec in branch.specs:
            if spec.name in skip:
                continue
            seen[key].append(int(branch.get(spec.name)[0]))
            if key == "slow":
                ahead.append(len(calls) - len(seen["slow"]))
            time.sleep(delay)
        branch.close()

    threads = [threading.Thread(target=read, args=(fast, "fast", 0, {"t5", "t6"})),
               threading.Thread(target=read, args=(slow, "slow", 0.002))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert seen["slow"] == list(range(40))
    assert seen["fast"] == [i for i in range(40) if i not in (5, 6)]
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 40
    assert max(ahead) <= 4  # the budget (3 tensors) plus the one being handed over
    assert max(ahead) >= 2  # the fast writer did run ahead


def test_tee_failure_stops_the_other_writer():
    import threading

    from merge_hooks.tensors import TeeAborted, tee

    source, _calls = _numbered_source(1000, 64)
    first, second = tee(source, 2, budget=128)
    errors = []

    def failing():
        first.get("t0")
        first.abort()
        first.close()

    def reading():
        try:
            for spec in second.specs:
                second.get(spec.name)
        except TeeAborted as exc:
            errors.append(exc)
        finally:
            second.close()

    threads = [threading.Thread(target=failing), threading.Thread(target=reading)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 1


def test_writer_error_in_a_list_of_formats_writes_nothing(make_models, tmp_path, monkeypatch):
    """bin fails midway while safetensors is being written: its error surfaces and no output is left."""
    from helpers import leftovers, merge
    from merge_hooks.io import torch_io

    def broken_write(path, source, **kwargs):
        source.get(source.specs[0].name)
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(torch_io, "write_torch", broken_write)
    paths = make_models("bert-encoder", 2)
    with pytest.raises(OSError, match="Input/output error"):
        merge(paths, "encoder", tmp_path / "merged", weights=[0.5, 0.5], save_format="safetensors,bin")
    assert not (tmp_path / "merged").exists()
    assert leftovers(tmp_path, "merged") == []


# --- hooks: preflight, finish, check --------------------------------------------------------------------


@pytest.fixture
def hooked_format(tmp_path, monkeypatch):
    """A plugin format 'npz' using every hook; what the hooks saw is recorded in ``seen``."""
    import numpy as np

    from merge_hooks.formats import FormatCheck

    seen = {}

    def preflight(context):
        seen["preflight"] = context
        if context.config.get("hidden_size") == 7:
            raise MergeHooksError("npz cannot write hidden_size 7")

    def write(source, directory, options):
        path = directory / f"{options.output_name}.npz"
        np.savez(path, **{s.name: np.asarray(source.get(s.name)) for s in source.specs})
        return [path]

    def finish(directory, options):
        seen["finish"] = sorted(p.name for p in directory.iterdir())
        seen["options"] = options
        marker = directory / "npz-ready.txt"
        marker.write_text("ok")
        return [marker]

    def check(folder):
        files = list(folder.glob("*.npz"))
        if not files:
            return None
        try:
            with np.load(files[0]) as arrays:
                return FormatCheck(passed=[f"{len(arrays.files)} arrays"])
        except (ValueError, OSError) as exc:
            return FormatCheck(problems=[f"cannot read {files[0].name}: {exc}"])

    fmt = OutputFormat(name="npz", description="numpy archive", write=write, takes_arrays=True,
                       preflight=preflight, finish=finish, check=check)
    formats = {**available_formats(), "npz": fmt}
    monkeypatch.setattr("merge_hooks.formats.available_formats", lambda: formats)
    return seen


def test_format_hooks_run_in_order(hooked_format, make_models, tmp_path):
    from helpers import merge
    from merge_hooks.verify import verify_folder

    paths = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    merge(paths, "encoder", out, weights=[0.5, 0.5], save_format="npz")
    context = hooked_format["preflight"]
    assert context.model_dir == paths[0] and context.model_type == "encoder" and context.formats == ("npz",)
    # finish sees the weights and the sidecars, not yet the provenance files
    assert {"merged.npz", "config.json", "tokenizer.json", "modules.json"} <= set(hooked_format["finish"])
    assert "merge_manifest.json" not in hooked_format["finish"]
    assert hooked_format["options"].output_name == "merged"
    assert hooked_format["options"].config["hidden_size"] == context.config["hidden_size"]
    manifest = json.loads((out / "merge_manifest.json").read_text())["files"]
    assert {"merged.npz", "npz-ready.txt"} <= set(manifest)
    # a folder with only the plugin's weights is verified by its check, not failed for "no weights"
    report = verify_folder(out)
    assert report.ok, report.problems
    assert any(line.startswith("npz: ") for line in report.passed)
    (out / "merged.npz").write_bytes(b"broken")
    assert not verify_folder(out, hashes=False).ok


def test_format_preflight_error_writes_nothing(hooked_format, make_models, tmp_path, monkeypatch):
    import json as json_module

    from helpers import merge

    paths = make_models("bert-encoder", 2)
    copies = []
    for i, path in enumerate(paths):
        copy = tmp_path / f"m{i}"
        shutil.copytree(path, copy)
        config = json_module.loads((copy / "config.json").read_text())
        config["hidden_size"] = 7
        (copy / "config.json").write_text(json_module.dumps(config))
        copies.append(copy)
    with pytest.raises(MergeHooksError, match="npz cannot write hidden_size 7"):
        merge(copies, "encoder", tmp_path / "merged", weights=[0.5, 0.5], save_format="npz")
    assert not (tmp_path / "merged").exists()

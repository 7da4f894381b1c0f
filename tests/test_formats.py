"""The output-format registry: built-ins, and third-party formats through the entry-point group."""

from __future__ import annotations

import sys
import textwrap

import pytest

from merge_hooks.errors import MergeHooksError
from merge_hooks.formats import OutputFormat, available_formats, get_format


def test_builtin_formats():
    formats = available_formats()
    assert {"safetensors", "bin", "both"} <= set(formats)
    assert all(isinstance(f, OutputFormat) and f.description for f in formats.values())
    assert get_format("both").size_factor == 2


def test_unknown_format_lists_known():
    with pytest.raises(MergeHooksError, match="unknown save format 'onnx'; known formats: bin, both, safetensors"):
        get_format("onnx")


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

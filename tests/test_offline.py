"""Local work sends nothing to the hub, whether or not HF_HUB_OFFLINE is set.

The hub endpoint (HF_ENDPOINT) points at a server on 127.0.0.1 that answers 404 and counts requests;
each command runs in a fresh Python without HF_HUB_OFFLINE, on models given as relative ``dir/name``
paths (what a hub id looks like to the loaders). ``merge-hooks demo`` runs the same way in test_readme.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import counting_hub, online_env

EXAMPLES = [{"query": f"q {i}", "pos": [f"p {i}"], "neg": [f"n {i} {j}" for j in range(2)]} for i in range(2)]


@pytest.fixture(scope="module")
def hub():
    with counting_hub() as endpoint_and_requests:
        yield endpoint_and_requests


@pytest.fixture(scope="module")
def workdir(make_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    for name, source in zip(("bare", "other"), make_models("bert-encoder", 2, pooling="mean")):
        shutil.copytree(source, root / "models" / name)
        (root / "models" / name / "README.md").unlink(missing_ok=True)
    (root / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return root


def _run(args: list[str], *, hub, cwd) -> tuple[subprocess.CompletedProcess, list[str]]:
    endpoint, requests = hub
    requests.clear()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=online_env(endpoint), capture_output=True, text=True,
                          timeout=600)
    return proc, list(requests)


MODELS = ["--models", "models/bare", "models/other"]
COMMANDS = {
    "merge stream": ["merge", "--model-type", "encoder", *MODELS, "--weights", "0.5", "0.5", "-o", "out/stream"],
    "merge cocktail": ["merge", "--model-type", "encoder", *MODELS, "--weights", "0.5", "0.5", "-o", "out/cocktail",
                       "--engine", "cocktail", "--verify"],
    "merge with data": ["merge", "--model-type", "encoder", "--method", "mix_models_with_data", "--examples",
                        "examples.jsonl", "--neg-number", "2", *MODELS, "-o", "out/data", "--seed", "0"],
    "merge with data cocktail": ["merge", "--model-type", "encoder", "--method", "mix_models_with_data", "--examples",
                                 "examples.jsonl", "--neg-number", "2", *MODELS, "-o", "out/data-cocktail",
                                 "--engine", "cocktail"],
    "convert": ["convert", "models/bare", "out/converted", "--save-format", "bin"],
    "verify": ["verify", "models/bare"],
}
API = (
    "import merge_hooks\n"
    "paths = ['models/bare', 'models/other']\n"
    "for engine in ('auto', 'cocktail'):\n"
    "    merge_hooks.mix_models(paths, 'encoder', [0.5, 0.5], engine=engine)\n"
    "    merge_hooks.mix_models_by_layers(paths, 'encoder', [0.5, 0.5], f'out/api-{engine}', engine=engine)\n"
    f"merge_hooks.mix_models_with_data(paths, 'encoder', {EXAMPLES!r}, neg_number=2)\n"
    "print('api done')\n"
)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_sends_no_hub_request(command, hub, workdir):
    proc, requests = _run(["-m", "merge_hooks", *COMMANDS[command]], hub=hub, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert requests == []


def test_verify_against_written_recipe_sends_no_hub_request(hub, workdir):
    proc, _ = _run(["-m", "merge_hooks", *COMMANDS["merge stream"], "--overwrite"], hub=hub, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    proc, requests = _run(["-m", "merge_hooks", "verify", "out/stream", "--against", "out/stream/merge_recipe.yaml"],
                          hub=hub, cwd=workdir)
    assert proc.returncode == 0, proc.stdout
    assert "equal the recipe's merge bit for bit" in proc.stdout
    assert requests == []


def test_api_sends_no_hub_request(hub, workdir):
    proc, requests = _run(["-c", API], hub=hub, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("api done")
    assert requests == []


def test_the_counting_server_sees_a_hub_lookup(hub, workdir):
    """The control: an uncached hub id does reach the server, so zero above means zero."""
    proc, requests = _run(["-m", "merge_hooks", "merge", "--model-type", "encoder", "--models", "no-such-org/no-such-model",
                           "models/other", "--weights", "0.5", "0.5", "-o", "out/never"], hub=hub, cwd=workdir)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert any("no-such-org/no-such-model" in r for r in requests), requests
    assert not (workdir / "out" / "never").exists()

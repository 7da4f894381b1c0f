"""The stream engine's peak memory follows its row block size, not the size of the models or of their tensors.

Four models of 4 float32 tensors of 32 MiB (128 MiB each, 512 MiB in all) are merged by
``python -m merge_hooks merge --engine stream`` in a child process, in blocks of 1 MiB
(``MERGE_HOOKS_BLOCK_SIZE``): the largest tensor is 32 times the block. Its peak RSS, minus that of a
process that only imports what the merge imports, must stay under 56 MiB: an engine that held even
one whole tensor in each of the sum, the term read and its product (96 MiB), or one whole model
(128 MiB), could not fit. A control process that imports what a merge imports and then holds one
model's tensors shows that the measurement would catch it.

The blocks are small on purpose: glibc serves allocations below its mmap threshold from the heap,
and blocks of 1 MiB reused from block to block keep its fragmentation far below the margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
N_MODELS = 4
N_TENSORS = 4
SHAPE = (8192, 1024)
TENSOR_BYTES = SHAPE[0] * SHAPE[1] * 4
MODEL_BYTES = N_TENSORS * TENSOR_BYTES
MiB = 2**20
BLOCK = 1 * MiB
# Two sets of read buffers (one block per model each), the running sum, the term and the block written,
# plus what the rest of the merge (hashing, model card, sidecars) allocates.
BOUND = 56 * MiB
WEIGHTS = [0.4, 0.3, 0.2, 0.1]

# Runs argv (a JSON list) and prints its peak RSS in KiB; exits with its status.
MEASURE_CODE = """
import json, os, subprocess, sys
proc = subprocess.Popen(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""
# Re-imports, in a fresh interpreter, every module the measured merge imported.
IMPORT_CODE = """
import importlib, sys
for name in open(sys.argv[1]).read().split():
    try:
        importlib.import_module(name)
    except Exception:
        pass
"""
# The control: what a merge imports at least, then one whole model's tensors held at once.
CONTROL_IMPORTS = "import merge_hooks.cli, merge_hooks.pipeline, torch, safetensors.torch\n"
HOLD_CODE = CONTROL_IMPORTS + f"held = [torch.ones({SHAPE}) for _ in range({N_TENSORS})]\n"

assert MODEL_BYTES > BOUND + 32 * MiB, "a whole model must overshoot the bound by a clear margin"
assert 3 * TENSOR_BYTES > BOUND + 32 * MiB, "three copies of the largest tensor must overshoot it too"
assert TENSOR_BYTES >= 8 * BLOCK, "the largest tensor must be several blocks"


def _tensor_value(seed: int, index: int) -> float:
    return float(seed + 1) * 0.01 + index


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("memory-models")
    paths = []
    for seed in range(N_MODELS):
        folder = root / f"model{seed}"
        folder.mkdir()
        tensors = {f"layer{i}.weight": torch.full(SHAPE, _tensor_value(seed, i)) for i in range(N_TENSORS)}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        paths.append(folder)
    return paths


@pytest.fixture(scope="module")
def big_bin_models(big_models, tmp_path_factory) -> list[Path]:
    """The same models as ``pytorch_model.bin`` files (read through a file mapping, not with pread)."""
    root = tmp_path_factory.mktemp("memory-bin-models")
    paths = []
    for folder in big_models:
        target = root / folder.name
        target.mkdir()
        torch.save(load_file(str(folder / "model.safetensors")), target / "pytorch_model.bin")
        (target / "config.json").write_text((folder / "config.json").read_text())
        paths.append(target)
    return paths


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["MERGE_HOOKS_BLOCK_SIZE"] = str(BLOCK)
    return env


def _run_measured(argv: list[str]) -> tuple[int, str]:
    """Peak RSS in bytes of one child process, and its stderr.

    A lean helper process starts the child and reads its ``ru_maxrss`` with ``os.wait4``: a child
    forked straight from pytest would count pytest's own pages (resident before ``exec``) as its peak.
    """
    with tempfile.TemporaryFile() as stderr:
        helper = subprocess.run(
            [sys.executable, "-c", MEASURE_CODE, json.dumps(argv)],
            env=_env(), stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    assert helper.returncode == 0, f"{argv[:6]}... failed with exit status {helper.returncode}:\n{text[-3000:]}"
    return int(helper.stdout) * 1024, text


def _imported_modules(importtime_stderr: str) -> list[str]:
    modules = []
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "imported package" not in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "__main__" and not name.endswith(".__main__"):
                modules.append(name)
    return modules


def merge_memory(args: list[str], tmp_path: Path) -> tuple[int, list[str]]:
    """Run ``merge-hooks merge ARGS`` in a fresh process: its peak RSS above a process that only imports the
    same modules, and the modules it imported."""
    merged_rss, stderr = _run_measured([sys.executable, "-X", "importtime", "-m", "merge_hooks", "merge", *args])
    modules = _imported_modules(stderr)
    module_list = tmp_path / "modules.txt"
    module_list.write_text("\n".join(modules))
    baseline_rss, _ = _run_measured([sys.executable, "-c", IMPORT_CODE, str(module_list)])
    return merged_rss - baseline_rss, modules


def _expected(name: str) -> torch.Tensor:
    """LM_Cocktail's arithmetic: w1*p1, then += w2*p2, ..."""
    index = int(name.removeprefix("layer").split(".")[0])
    merged = None
    for seed, weight in enumerate(WEIGHTS):
        tensor = torch.full(SHAPE, _tensor_value(seed, index))
        merged = weight * tensor if merged is None else merged.add_(weight * tensor)
    return merged


@pytest.mark.slow
@pytest.mark.parametrize("save_format", ["safetensors", "bin"])
def test_stream_merge_memory_follows_the_block_size(big_models, tmp_path, save_format):
    output = tmp_path / "merged"
    used, modules = merge_memory([
        "--model-type", "encoder", "--models", *map(str, big_models), "--weights", *map(str, WEIGHTS),
        "-o", str(output), "--engine", "stream", "--save-format", save_format, "-q",
    ], tmp_path)
    assert "merge_hooks.pipeline" in modules
    # Safetensors inputs are merged on numpy arrays, whichever format is written.
    assert "torch" not in modules
    assert used < BOUND, (
        f"the merge used {used / MiB:.0f} MiB above its import baseline, "
        f"more than {BOUND / MiB:.0f} MiB; one input model is {MODEL_BYTES / MiB:.0f} MiB"
    )

    if save_format == "safetensors":
        merged = load_file(str(output / "model.safetensors"))
    else:
        merged = torch.load(output / "pytorch_model.bin", weights_only=True)
    assert sorted(merged) == sorted(f"layer{i}.weight" for i in range(N_TENSORS))
    for name, tensor in merged.items():
        assert torch.equal(tensor, _expected(name)), name


@pytest.mark.slow
def test_memory_measurement_sees_one_whole_model():
    """The control: holding one model's tensors after the same imports must break the bound."""
    baseline_rss, _ = _run_measured([sys.executable, "-c", CONTROL_IMPORTS])
    held_rss, _ = _run_measured([sys.executable, "-c", HOLD_CODE])
    used = held_rss - baseline_rss
    assert used > BOUND, f"holding {MODEL_BYTES / MiB:.0f} MiB measured as {used / MiB:.0f} MiB, under the bound"


ADAPTER_RANK = 8
ADAPTER_SCALING = 16 / ADAPTER_RANK


@pytest.fixture(scope="module")
def big_adapter(big_models, tmp_path_factory) -> Path:
    """A LoRA adapter on every tensor of the first model, as peft saves it (rank 8, alpha 16)."""
    folder = tmp_path_factory.mktemp("memory-adapter")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(N_TENSORS):
        tensors[f"base_model.model.layer{i}.lora_A.weight"] = torch.randn(ADAPTER_RANK, SHAPE[1], generator=generator)
        tensors[f"base_model.model.layer{i}.lora_B.weight"] = torch.randn(SHAPE[0], ADAPTER_RANK, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": ADAPTER_RANK, "lora_alpha": 16, "target_modules": ["layer0"],
              "base_model_name_or_path": str(big_models[0])}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_stream_merge_with_an_adapter_stays_in_the_bound(big_models, big_adapter, tmp_path):
    """A tensor with a LoRA delta is merged whole, as peft computes it (see ``Adapter.needs_whole``): memory
    follows the block size plus that one tensor and its delta, never a whole model."""
    output = tmp_path / "merged"
    used, _ = merge_memory([
        "--model-type", "encoder", "--models", f"{big_models[0]}+{big_adapter}", *map(str, big_models[1:]),
        "--weights", *map(str, WEIGHTS), "-o", str(output), "-q",
    ], tmp_path)
    bound = BOUND + 2 * TENSOR_BYTES
    assert bound < MODEL_BYTES
    assert used < bound, (
        f"the merge with an adapter used {used / MiB:.0f} MiB above its import baseline, more than "
        f"{bound / MiB:.0f} MiB; one input model is {MODEL_BYTES / MiB:.0f} MiB, its largest tensor "
        f"{TENSOR_BYTES / MiB:.0f} MiB"
    )
    adapter = load_file(str(big_adapter / "adapter_model.safetensors"))
    merged = load_file(str(output / "model.safetensors"))
    for i in (0, N_TENSORS // 2, N_TENSORS - 1):
        tuned = torch.full(SHAPE, _tensor_value(0, i))
        lora_A, lora_B = (adapter[f"base_model.model.layer{i}.lora_{x}.weight"] for x in "AB")
        tuned.add_((lora_B @ lora_A) * ADAPTER_SCALING)
        expected = WEIGHTS[0] * tuned
        for seed, weight in enumerate(WEIGHTS[1:], 1):
            expected.add_(weight * torch.full(SHAPE, _tensor_value(seed, i)))
        assert torch.equal(merged[f"layer{i}.weight"], expected), i


@pytest.mark.slow
def test_stream_merge_of_bin_inputs_stays_in_the_bound(big_bin_models, tmp_path):
    """``.bin`` inputs are read from a mapping of the file; the pages of each block are let go once copied."""
    output = tmp_path / "merged"
    used, _ = merge_memory([
        "--model-type", "encoder", "--models", *map(str, big_bin_models), "--weights", *map(str, WEIGHTS),
        "-o", str(output), "--engine", "stream", "--save-format", "safetensors", "-q",
    ], tmp_path)
    assert used < BOUND, (
        f"the merge of .bin inputs used {used / MiB:.0f} MiB above its import baseline, more than "
        f"{BOUND / MiB:.0f} MiB; one input model is {MODEL_BYTES / MiB:.0f} MiB"
    )
    merged = load_file(str(output / "model.safetensors"))
    assert sorted(merged) == sorted(f"layer{i}.weight" for i in range(N_TENSORS))
    for name, tensor in merged.items():
        assert torch.equal(tensor, _expected(name)), name

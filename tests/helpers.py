"""Assertions and merges shared by the test modules."""

from __future__ import annotations

import contextlib
import gc
import http.server
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

from merge_hooks.dtypes import BY_CODE
from merge_hooks.pipeline import run_recipe
from merge_hooks.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
FAMILY = {"encoder": "bert-encoder", "reranker": "bert-reranker", "decoder": "llama-decoder"}
WEIGHTS3 = [0.5, 0.3, 0.2]


def auto_class(model_type: str):
    import transformers

    return {
        "encoder": transformers.AutoModel,
        "reranker": transformers.AutoModelForSequenceClassification,
        "decoder": transformers.AutoModelForCausalLM,
    }[model_type]


def lm_cocktail_state_dict(method: str, paths: list[Path], model_type: str, weights: list[float]) -> dict:
    """What LM_Cocktail itself merges (nothing written)."""
    import LM_Cocktail

    # mix_models_by_layers gc.collect()s per tensor; frozen objects make that cheap (results unchanged).
    gc.freeze()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = getattr(LM_Cocktail, method)([str(p) for p in paths], model_type, weights, output_path=None)
    finally:
        gc.unfreeze()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_state_dict(folder: Path, model_type: str) -> dict:
    model = auto_class(model_type).from_pretrained(str(folder))
    return model.state_dict()


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), f"tensor {name} differs"


def merge(paths, model_type, output, *, weights=None, overwrite=False, **options):
    output_keys = {k: options.pop(k) for k in ("save_format", "max_shard_size", "dtype", "onnx_quantize") if k in options}
    recipe = recipe_from_dict({
        "model_type": model_type,
        "models": [{"path": str(p), "weight": w} for p, w in zip(paths, weights or WEIGHTS3)],
        "output": {"path": str(output), **output_keys},
        **options,
    })
    return run_recipe(recipe, overwrite=overwrite, quiet=True)


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".safetensors"} or p.name.endswith(".index.json"))


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a run left beside ``name`` (staging folders)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


def merge_in_subprocess(recipe: dict, report: str) -> str:
    """Run ``recipe`` with run_recipe in a fresh Python, then ``report`` (code that prints); its last line."""
    code = (
        "import sys\n"
        "from merge_hooks.pipeline import run_recipe\n"
        "from merge_hooks.recipe import recipe_from_dict\n"
        f"run_recipe(recipe_from_dict({recipe!r}), quiet=True)\n"
        f"{report}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


# safetensors code -> torch dtype, for the dtypes this torch build has.
TORCH_DTYPES = {d.code: getattr(torch, d.name) for d in BY_CODE.values() if hasattr(torch, d.name)}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape) * 4).to(dtype)
    return torch.randint(0, 120, shape).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def all_dtypes_state_dict() -> dict[str, torch.Tensor]:
    """A matrix, an odd-length vector, a scalar and an empty tensor of every dtype (seeded)."""
    torch.manual_seed(0)
    tensors = {}
    for code, dtype in TORCH_DTYPES.items():
        tensors[f"{code}.matrix"] = random_tensor(dtype, (3, 5))
        tensors[f"{code}.odd"] = random_tensor(dtype, (7,))
        tensors[f"{code}.scalar"] = random_tensor(dtype, ())
        tensors[f"{code}.empty"] = random_tensor(dtype, (0, 4))
    return tensors


def assert_same_bits(loaded: dict, expected: dict, *, ordered: bool = False) -> None:
    """Same names (in the same order when ``ordered``), dtypes, shapes and bytes."""
    assert (list(loaded) == list(expected)) if ordered else (set(loaded) == set(expected))
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(bits(loaded[name]), bits(tensor)), name


# Prepended to the scripts run_peak_mb_script runs; they print peak_mb() differences.
PEAK_MB_CODE = """
def peak_mb():
    # Not ru_maxrss: Linux carries the spawning process's peak across exec, so under pytest it
    # would start at pytest's own peak and hide anything smaller. VmHWM starts fresh at exec.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""


def run_peak_mb_script(script: str, *args: str) -> float:
    """Run ``script`` (which may call ``peak_mb()``) in a fresh Python and return the number it prints."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MB_CODE + script, *map(str, args)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
    )
    return float(result.stdout.strip())


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with 404 and records it on the server."""

    def _answer(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def counting_hub():
    """A stand-in hub on 127.0.0.1; yields (endpoint, requests), the list of requests it received."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()


def online_env(endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a user who never set HF_HUB_OFFLINE, with the hub at ``endpoint``."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, PYTHONPATH=str(REPO), HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2", **extra)
    return env


def cli_subprocess(*args, cwd: Path = REPO, env: dict | None = None, shell_tail: str = "") -> subprocess.CompletedProcess:
    """``merge-hooks ARGS`` in a fresh Python (its own logging, warnings and stdout), optionally piped into ``shell_tail``."""
    command = [sys.executable, "-m", "merge_hooks", *map(str, args)]
    if shell_tail:
        import shlex

        command = ["bash", "-c", shlex.join(command) + " | " + shell_tail]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env or {**os.environ, "PYTHONPATH": str(REPO)})


# Added tokens of FlagEmbedding-style adapters (saved with embedding/emb.pth).
ADDED_TOKENS = ["<instruct>", "<query>", "<response>"]


def _randomise_adapter(model, seed: int) -> None:
    """peft starts B (or the embedding's A) at zero; give every adapter tensor values so deltas are non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + ("magnitude" in name))


def make_adapter(
    base: Path, out: Path, *, seed: int = 0, auto_class=None, resize: int = 0, safe_serialization: bool = True, **lora
) -> Path:
    """A peft LoRA adapter for ``base`` saved in ``out`` (with FlagEmbedding's emb.pth when ``resize``;
    as ``adapter_model.bin`` without ``safe_serialization``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = (auto_class or AutoModelForCausalLM).from_pretrained(str(base), dtype=torch.float32)
    if resize:
        # FlagEmbedding's get_model: resize for the added tokens, save the embedding module as embedding/emb.pth.
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        tokenizer.add_special_tokens({"additional_special_tokens": ADDED_TOKENS})
        model.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            model.get_input_embeddings().weight[-resize:].normal_(generator=torch.Generator().manual_seed(seed + 99))
        (out / "embedding").mkdir(parents=True)
        torch.save(model.get_input_embeddings(), out / "embedding" / "emb.pth")
        tokenizer.save_pretrained(str(out))
    peft_model = get_peft_model(model, LoraConfig(**lora))
    _randomise_adapter(peft_model, seed)
    if lora.get("bias") == "all":  # trained biases are saved with the adapter and replace the base's
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if name.endswith(".bias"):
                    parameter.add_(1.0)
    peft_model.save_pretrained(str(out), safe_serialization=safe_serialization)
    return out


def fail_verification(monkeypatch) -> None:
    """Make the next merge write a config.json that wants one layer more than its weights hold, so that
    ``--verify`` fails on it."""
    import json

    import merge_hooks.pipeline as pipeline

    real_write_sidecars = pipeline.write_sidecars

    def bad_sidecars(source, directory, **kwargs):
        real_write_sidecars(source, directory, **kwargs)
        config = json.loads((directory / "config.json").read_text())
        config["num_hidden_layers"] += 1  # the config now wants a layer the weights lack
        (directory / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(pipeline, "write_sidecars", bad_sidecars)

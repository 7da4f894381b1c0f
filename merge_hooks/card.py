"""Provenance written into every merged folder: model card, recipe, merge facts and a manifest of every file.

- ``README.md``: a model card whose YAML front matter the Hugging Face Hub reads (``base_model``,
  ``tags``, ``library_name``), then the method, engine, models and weights, format, dtype, versions
  and how to load the model.
- ``merge_recipe.yaml``: the recipe exactly as it ran.
- ``merge_info.json``: the same facts for programs, among them the weights actually used (computed
  from the examples for ``mix_models_with_data``), which ``merge-hooks verify --against`` needs.
- ``merge_manifest.json``: size and digest (BLAKE3) of every other file of the folder, written last.

Nothing here imports torch or transformers: versions come from the installed package metadata.
"""

from __future__ import annotations

import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import yaml

from . import __version__
from .heads import HEAD_FILES
from .io.hashing import ALGORITHM, ALGORITHMS, hash_file

if TYPE_CHECKING:
    from .preflight import InputModel
    from .recipe import Recipe

README_NAME = "README.md"
RECIPE_NAME = "merge_recipe.yaml"
INFO_NAME = "merge_info.json"
MANIFEST_NAME = "merge_manifest.json"

# hashlib and blake3 release the GIL while hashing, so shards hash in parallel.
HASH_WORKERS = 4

# Distributions whose versions a card records, when installed (read from metadata, never imported).
VERSIONED_PACKAGES = (
    "torch",
    "safetensors",
    "huggingface-hub",
    "transformers",
    "sentence-transformers",
    "lm-cocktail",
    "FlagEmbedding",
)

_PIPELINE_TAGS = {"encoder": "sentence-similarity", "reranker": "text-classification", "decoder": "text-generation"}
_ENGINES = {
    "stream": "merge-hooks' streaming engine (LM_Cocktail's arithmetic, one tensor at a time from the checkpoint files)",
    "cocktail": "LM_Cocktail's own merge function",
}


def installed_versions() -> dict[str, str]:
    """merge-hooks, Python and the installed versions of :data:`VERSIONED_PACKAGES`."""
    versions = {"merge-hooks": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class MergeInfo:
    """What a merge did, as recorded in ``merge_info.json`` and rendered in the model card."""

    model_type: str
    method: str
    engine: str
    models: list[str]
    weights: list[float]
    save_format: str
    dtype: Optional[str]
    m3_heads: bool = False
    # Per model, the LoRA adapters merged into it first (see merge_hooks.adapters.Adapter.describe).
    adapters: list[list[dict]] = field(default_factory=list)
    seed: Optional[int] = None
    versions: dict[str, str] = field(default_factory=installed_versions)

    @classmethod
    def read(cls, folder: Path) -> Optional["MergeInfo"]:
        """The ``merge_info.json`` of ``folder``; None when there is none.

        Raises:
            ValueError: the file exists but is not a merge-hooks merge_info.json.
        """
        path = Path(folder) / INFO_NAME
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a valid {INFO_NAME}: {exc}") from None


def recorded_recipe(recipe: "Recipe", models: list["InputModel"], *, output: Path) -> "Recipe":
    """The recipe as ``merge_recipe.yaml`` records it: replayable from any folder.

    Local models and the examples file become absolute paths, hub ids get the commit that was read,
    and the output is where the folder was written.
    """
    entries = []
    for entry, model in zip(recipe.models, models):
        if entry.adapter is not None:
            adapters = [str(Path(a).expanduser().absolute()) if Path(a).expanduser().exists() else a for a in entry.adapters]
            entry = entry.model_copy(update={"adapter": adapters[0] if isinstance(entry.adapter, str) else adapters})
        if Path(entry.path).expanduser().exists():
            entries.append(entry.model_copy(update={"path": str(model.path)}))
        elif model.path.parent.name == "snapshots":  # the hub cache's <repo>/snapshots/<commit> folder
            entries.append(entry.model_copy(update={"revision": model.path.name}))
        else:
            entries.append(entry)
    update = {"models": entries, "output": recipe.output.model_copy(update={"path": Path(output)})}
    if isinstance(recipe.examples, Path):
        update["examples"] = recipe.examples.absolute()
    return recipe.model_copy(update=update)


def front_matter(info: MergeInfo) -> dict:
    """The model card metadata the Hub understands (``base_model``, ``tags``, ``library_name``, ...)."""
    encoder = info.model_type == "encoder"
    return {
        "base_model": list(info.models),
        "base_model_relation": "merge",
        "library_name": "sentence-transformers" if encoder else "transformers",
        "pipeline_tag": _PIPELINE_TAGS[info.model_type],
        "tags": ["merge", "lm-cocktail", *(["sentence-transformers"] if encoder else []),
                 *(["lora"] if any(info.adapters) else [])],
    }


def _load_snippet(info: MergeInfo, location: str) -> str:
    if info.model_type == "encoder":
        lines = [
            "from sentence_transformers import SentenceTransformer",
            "",
            f"model = SentenceTransformer({location!r})",
            'embeddings = model.encode(["a query", "a passage"])',
        ]
        if info.m3_heads:
            lines += [
                "",
                "# dense, sparse (lexical weights) and ColBERT outputs, with the merged heads",
                "from FlagEmbedding import BGEM3FlagModel",
                "",
                f"m3 = BGEM3FlagModel({location!r})",
                'output = m3.encode(["a query"], return_dense=True, return_sparse=True, return_colbert_vecs=True)',
            ]
    elif info.model_type == "reranker":
        lines = [
            "from FlagEmbedding import FlagReranker",
            "",
            f"reranker = FlagReranker({location!r})",
            'scores = reranker.compute_score([["a query", "a passage"]])',
            "",
            "# or with transformers alone",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f"model = AutoModelForSequenceClassification.from_pretrained({location!r})",
        ]
    else:
        lines = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"tokenizer = AutoTokenizer.from_pretrained({location!r})",
            f"model = AutoModelForCausalLM.from_pretrained({location!r})",
        ]
    return "\n".join(lines)


def _adapter_lines(info: MergeInfo) -> list[str]:
    lines = []
    for model, adapters in zip(info.models, info.adapters):
        for adapter in adapters:
            scaling = ", ".join(
                f"r={s['r']} alpha={s['lora_alpha']:g} scaling={s['scaling']:.6g}" for s in adapter["scaling"]
            )
            variant = "".join([", rsLoRA" if adapter["use_rslora"] else "", ", DoRA" if adapter["use_dora"] else ""])
            extra = ", resized embedding from embedding/emb.pth" if adapter["resized_embedding"] else ""
            lines.append(
                f"- LoRA adapter `{adapter['adapter']}` merged into `{model}` first (as peft's merge_and_unload): "
                f"{adapter['modules']} modules, {scaling}{variant}{extra}"
            )
    return lines


def _examples(recipe: "Recipe") -> str:
    if isinstance(recipe.examples, list):
        return f"the {len(recipe.examples)} examples recorded in `{RECIPE_NAME}`"
    return f"the examples in `{recipe.examples}`"


def render_card(info: MergeInfo, recipe: "Recipe", *, location: str) -> str:
    """The ``README.md`` of a merged folder: YAML front matter, then a description of the merge.

    Example:
        >>> print(render_card(info, recipe, location="./merged"))
        ---
        base_model:
        - ./bge-base-finetuned
        ...
    """
    name = Path(location).name or location
    if recipe.method == "mix_models_with_data":
        how = (
            f"LM_Cocktail's `mix_models_with_data`: each model's weight comes from its loss on {_examples(recipe)} "
            f"(softmax of -loss / temperature {recipe.temperature:g}"
            f"{'' if info.seed is None else f', negatives sampled with seed {info.seed}'}), then every tensor is "
            "the weighted sum of the models' tensors."
        )
    elif recipe.method == "mix_models_by_layers":
        how = "LM_Cocktail's `mix_models_by_layers`: every tensor is the weighted sum of the models' tensors, layer by layer."
    else:
        how = "LM_Cocktail's `mix_models`: every tensor is the weighted sum of the models' tensors."
    rows = "\n".join(f"| `{model}` | {weight:.6g} |" for model, weight in zip(info.models, info.weights))
    details = [
        f"- Model type: `{info.model_type}`",
        f"- Engine: `{info.engine}`, {_ENGINES.get(info.engine, info.engine)}",
        f"- Output format: `{info.save_format}`, dtype `{info.dtype or 'as the source'}`",
    ]
    if info.m3_heads:
        details.append(
            f"- bge-m3 heads: {' and '.join(f'`{h}`' for h in HEAD_FILES)} merged with the same weights "
            "(LM_Cocktail alone leaves them out, and FlagEmbedding would then initialise them randomly)"
        )
        if "gguf" in info.save_format.split(","):
            details.append("- GGUF: the `.gguf` file holds the dense model only; GGUF cannot hold the sparse and "
                           "ColBERT heads, which stay beside it as `.pt` files")
    details += _adapter_lines(info)
    versions = "\n".join(f"| {package} | {ver} |" for package, ver in info.versions.items())
    metadata = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True)
    return f"""---
{metadata}---

# {name}

A merge of {len(info.models)} models, made with merge-hooks using {how}

| model | weight |
|---|---|
{rows}

{chr(10).join(details)}

The exact recipe is in `{RECIPE_NAME}`, the same facts for programs in `{INFO_NAME}`, and the size and
BLAKE3 digest of every file in `{MANIFEST_NAME}`. Check the folder with `merge-hooks verify {location}`
(add `--against {Path(location) / RECIPE_NAME}` to recompute a sample of tensors from the input models).

## Versions

| package | version |
|---|---|
{versions}

## How to load

```python
{_load_snippet(info, location)}
```
"""


def write_provenance(directory: Path, info: MergeInfo, recipe: "Recipe", *, location: str) -> list[Path]:
    """Write the model card, the recipe and ``merge_info.json`` into ``directory``; return their paths.

    ``location`` is where the folder will live (the card's loading examples use it).
    """
    directory = Path(directory)
    files = {
        README_NAME: render_card(info, recipe, location=location),
        RECIPE_NAME: recipe.to_yaml(),
        INFO_NAME: json.dumps(asdict(info), indent=2) + "\n",
    }
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return [directory / name for name in files]


# --- manifest -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileDigest:
    """Size, modification time and digest (:data:`~merge_hooks.io.hashing.ALGORITHM`) of one file, as hashed."""

    size: int
    mtime_ns: int
    digest: str


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file: what the Hub names a file by, recorded for adapter weights."""
    return hash_file(path, "sha256")


def _digest(path: Path) -> FileDigest:
    before = path.stat()
    return FileDigest(size=before.st_size, mtime_ns=before.st_mtime_ns, digest=hash_file(path))


def hash_files(paths: Iterable[Path], *, root: Path, known: Optional[dict[Path, str]] = None) -> dict[str, FileDigest]:
    """Hash ``paths`` (several at once) and key the digests by their path relative to ``root``.

    Call it right after writing large files, while their bytes are still in the page cache. Files whose
    digest is in ``known`` (hashed while they were written) are not read again.

    Example:
        >>> digests = {}
        >>> written = fmt.write(source, staging, WriteOptions(max_shard_size, digests=digests))
        >>> hashed = hash_files(written, root=staging, known=digests)
    """
    paths = [Path(p) for p in paths]
    known = {Path(p): sha for p, sha in (known or {}).items() if sha is not None}

    def digest(path: Path) -> FileDigest:
        if path not in known:
            return _digest(path)
        stat = path.stat()
        return FileDigest(size=stat.st_size, mtime_ns=stat.st_mtime_ns, digest=known[path])

    with ThreadPoolExecutor(max_workers=max(1, min(HASH_WORKERS, len(paths), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, paths))
    return {path.relative_to(root).as_posix(): d for path, d in zip(paths, digests)}


def folder_files(directory: Path) -> list[str]:
    """Every file of ``directory`` (recursively, as POSIX relative paths) except the manifest itself."""
    directory = Path(directory)
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_NAME
    )


def write_manifest(directory: Path, *, hashed: Optional[dict[str, FileDigest]] = None) -> Path:
    """Write ``merge_manifest.json``: size and digest of every other file of ``directory``.

    Files in ``hashed`` whose size and modification time are unchanged are not read again.

    Example:
        >>> write_manifest(Path("merged"))
        PosixPath('merged/merge_manifest.json')
    """
    directory = Path(directory)
    hashed = dict(hashed or {})
    names = folder_files(directory)
    stale = []
    for name in names:
        known = hashed.get(name)
        stat = (directory / name).stat()
        if known is None or (known.size, known.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            stale.append(directory / name)
    hashed.update(hash_files(stale, root=directory))
    manifest = {
        "merge_hooks": __version__,
        "algorithm": ALGORITHM,
        "files": {name: {"size": hashed[name].size, ALGORITHM: hashed[name].digest} for name in names},
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path) -> Optional[tuple[str, dict[str, dict]]]:
    """The algorithm and ``files`` of ``directory``'s manifest (name -> size and digest under the
    algorithm's name); None when it has none.

    Raises:
        ValueError: the manifest is not valid JSON, names an algorithm merge-hooks does not know, or
            lacks a size or digest for a file.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files, algorithm = manifest["files"], manifest.get("algorithm", "sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{MANIFEST_NAME} is not a valid manifest: {type(exc).__name__}: {exc}") from None
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{MANIFEST_NAME} names the digest algorithm {algorithm!r}; merge-hooks knows {', '.join(ALGORITHMS)}")
    if not isinstance(files, dict):
        raise ValueError(f"{MANIFEST_NAME} is not a valid manifest: 'files' is not a mapping")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get(algorithm), str)):
            raise ValueError(f"{MANIFEST_NAME} is not a valid manifest: entry {name!r} needs an integer size and a {algorithm}")
    return algorithm, files

"""``merge-hooks verify``: is a model folder complete, does it load, and is it what its recipe makes?

Checks, each reported as a problem rather than raised, so one run lists everything that is wrong:

- weights: every index names only existing shards, every tensor of every shard is in the index,
  every tensor can be read; where ``safetensors`` and ``.bin`` lie side by side they hold the same tensors;
- manifest (``merge_manifest.json``, when present): every listed file exists with its size and digest,
  and no file is unlisted;
- bge-m3 heads (when present): both files, readable with ``weights_only=True``, shaped for the model;
- loaders: transformers (the Auto class of the config's architecture, missing or unexpected weights
  are problems), sentence-transformers when ``modules.json`` exists, FlagEmbedding's ``BGEM3FlagModel``
  when bge-m3 heads exist and FlagEmbedding imports;
- ``against`` a recipe: a deterministic sample of tensors (and the heads) recomputed from the recipe's
  inputs with the streaming engine and compared bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from .card import MANIFEST_NAME, MergeInfo, folder_files, read_manifest
from .io.hashing import hash_file
from .checkpoint import BIN_NAME, SAFETENSORS_NAME, Checkpoint
from .errors import MergeHooksError
from .heads import COLBERT_FILE, HEAD_FILES, SPARSE_FILE, heads_present, load_head
from .paths import inside
from .progress import library_warnings_hidden, loader_progress_bars

if TYPE_CHECKING:
    import torch

    from .recipe import Recipe
    from .tensors import TensorSpec

logger = logging.getLogger(__name__)

# Tensors recomputed by --against: the largest, the smallest and this many more spread over the names.
SAMPLE_SPREAD = 4
PROBE_TEXT = "merge-hooks checks that this model loads"


@dataclass
class VerifyReport:
    """What :func:`verify_folder` found: checks that held, problems, and checks it could not run."""

    folder: Path
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        """A short text report: ``OK: folder`` and the checks, or ``FAILED: folder`` and the problems."""
        if self.ok:
            lines = [f"OK: {self.folder}", *(f"  {line}" for line in self.passed)]
        else:
            lines = [f"FAILED: {self.folder} ({len(self.problems)} problems)", *(f"  - {p}" for p in self.problems)]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def verify_folder(
    folder: Path | str,
    *,
    against: Optional["Recipe"] = None,
    loaders: bool = True,
    hashes: bool = True,
    trust_remote_code: bool = False,
) -> VerifyReport:
    """Check ``folder`` and return a report; raise only when there is no folder to check.

    Args:
        against: a recipe whose inputs are merged again for a sample of tensors, compared bit for bit.
        loaders: load the model with transformers, sentence-transformers and FlagEmbedding where they apply.
        hashes: compare digests with the manifest (sizes and presence are always compared).
        trust_remote_code: let transformers run the folder's custom code (otherwise such folders are not loaded).

    Example:
        >>> report = verify_folder("merged", against=load_recipe("merged/merge_recipe.yaml"))
        >>> report.ok, report.problems
        (True, [])
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeHooksError(f"{folder} is not a folder" if folder.exists() else f"folder {folder} does not exist")
    report = VerifyReport(folder)
    config = _check_config(folder, report)
    _check_manifest(folder, report, hashes=hashes)
    formats_found = _check_formats(folder, report)
    weights_ok = _check_weights(folder, report, required=not formats_found)
    heads_ok = _check_heads(folder, config, report)
    if loaders:
        if formats_found and not _has_torch_weights(folder):
            report.notes.append(
                f"transformers loaders not tried: the folder holds {', '.join(formats_found)} weights only"
            )
        elif not (weights_ok and config is not None):
            report.notes.append("loaders not tried: the weights or config.json are broken")
        else:
            # Absolute: a relative "dir/name" looks like a hub id to the loaders, which then ask the hub.
            local = folder.absolute()
            with loader_progress_bars(enabled=False), library_warnings_hidden():
                _check_transformers(local, config, report, trust_remote_code=trust_remote_code)
                if (folder / "modules.json").is_file():
                    _check_sentence_transformers(local, report, trust_remote_code=trust_remote_code)
                if heads_ok:
                    _check_flagembedding(local, report)
    if against is not None:
        if weights_ok:
            _check_against(folder, against, report)
        else:
            report.notes.append("tensors not compared with the recipe: the weights are broken")
    return report


# --- config, manifest -----------------------------------------------------------------------------------


def _check_config(folder: Path, report: VerifyReport) -> Optional[dict]:
    path = folder / "config.json"
    if not path.is_file():
        report.problems.append("config.json is missing")
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        report.problems.append(f"config.json is not valid JSON: {exc}")
        return None
    if not isinstance(config, dict):
        report.problems.append("config.json is not a JSON object")
        return None
    return config


def _check_manifest(folder: Path, report: VerifyReport, *, hashes: bool) -> None:
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:
        report.problems.append(str(exc))
        return
    if manifest is None:
        report.notes.append(f"no {MANIFEST_NAME}: file sizes and hashes not checked")
        return
    algorithm, listed = manifest
    problems = []
    for name, entry in sorted(listed.items()):
        path = folder / name
        if not inside(folder, name):
            problems.append(f"{name!r} is listed in {MANIFEST_NAME} but lies outside the folder; it was not opened")
        elif not path.is_file():
            problems.append(f"{name} is listed in {MANIFEST_NAME} but missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {MANIFEST_NAME} says {entry['size']}")
        elif hashes and hash_file(path, algorithm) != entry[algorithm]:
            problems.append(f"{name} does not match its {algorithm} in {MANIFEST_NAME} (the file changed or is corrupt)")
    # Hidden files are what git, the Hub and caches add beside a model (.gitattributes, .cache/).
    unlisted = [n for n in folder_files(folder) if n not in listed and not any(p.startswith(".") for p in n.split("/"))]
    problems += [f"{name} is not listed in {MANIFEST_NAME}" for name in unlisted]
    report.problems += problems
    if not problems:
        what = f"sizes and {algorithm}" if hashes else "sizes"
        report.passed.append(f"{len(listed)} files match {MANIFEST_NAME} ({what})")


# --- weights --------------------------------------------------------------------------------------------


def _open_reader(path: Path):
    if path.suffix == ".safetensors":
        from .io.safetensors_io import SafetensorsReader

        return SafetensorsReader(path)
    from .io.torch_io import TorchReader

    return TorchReader(path)


def _layout_files(folder: Path, weights_name: str, report: VerifyReport) -> Optional[dict[str, Optional[list[str]]]]:
    """Weight file -> tensor names its index assigns to it (None for a single file).

    None when the layout is absent, or when it is broken (then with problems added to ``report``).
    """
    index_name = f"{weights_name}.index.json"
    stem, ext = weights_name.rsplit(".", 1)
    shards_on_disk = sorted(
        p.name for p in folder.iterdir() if p.name.startswith(f"{stem}-") and p.name.endswith(f".{ext}")
    )
    single, index = (folder / weights_name).is_file(), (folder / index_name).is_file()
    if single and index:
        report.problems.append(f"both {weights_name} and {index_name} exist; loaders read only {weights_name}")
        return None
    if single:
        report.problems += [f"{name} lies beside {weights_name} and no index names it" for name in shards_on_disk]
        if not inside(folder, weights_name):
            report.problems.append(f"{weights_name} is a symlink out of the folder; it was not opened")
            return None
        return {weights_name: None}
    if not index:
        report.problems += [f"shard {name} has no {index_name}" for name in shards_on_disk]
        return None
    try:
        weight_map = json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        report.problems.append(f"{index_name} is not a valid index: {type(exc).__name__}: {exc}")
        return None
    files: dict[str, Optional[list[str]]] = {}
    for name, filename in weight_map.items():
        if not inside(folder, filename):
            report.problems.append(f"{index_name} names {filename!r}, which lies outside the folder; it was not opened")
            return None
        files.setdefault(filename, []).append(name)
    report.problems += [f"shard {name} is not named in {index_name}" for name in shards_on_disk if name not in files]
    missing = {f: names for f, names in files.items() if not (folder / f).is_file()}
    report.problems += [
        f"{index_name} names shard {f} ({len(names)} tensors), which is missing" for f, names in missing.items()
    ]
    return None if missing else files


def _read_layout(
    folder: Path,
    weights_name: str,
    files: dict[str, Optional[list[str]]],
    report: VerifyReport,
    *,
    reference: Optional[Checkpoint] = None,
) -> dict[str, "TensorSpec"]:
    """Read every tensor of every file, checking each file against its index; compare with ``reference``."""
    specs: dict[str, "TensorSpec"] = {}
    for filename, indexed in files.items():
        try:
            reader = _open_reader(folder / filename)
        except (ValueError, OSError, RuntimeError) as exc:
            report.problems.append(f"cannot read {filename}: {exc}")
            continue
        with reader:
            if indexed is not None:
                missing = sorted(set(indexed) - set(reader.keys()))
                extra = sorted(set(reader.keys()) - set(indexed))
                if missing:
                    report.problems.append(
                        f"{weights_name}.index.json puts {len(missing)} tensors in {filename}, which lacks them, "
                        f"e.g. {missing[0]!r}"
                    )
                if extra:
                    report.problems.append(
                        f"{filename} holds {len(extra)} tensors that {weights_name}.index.json does not name, "
                        f"e.g. {extra[0]!r}"
                    )
            for spec in reader.specs:
                try:
                    tensor = reader.get(spec.name)
                except (ValueError, OSError, RuntimeError) as exc:
                    report.problems.append(f"cannot read tensor {spec.name!r} of {filename}: {exc}")
                    continue
                specs[spec.name] = spec
                if reference is not None and spec.name in reference and not _same_bits(tensor, reference.get(spec.name)):
                    report.problems.append(f"tensor {spec.name!r} differs between {filename} and the safetensors weights")
    return specs


def _check_formats(folder: Path, report: VerifyReport) -> list[str]:
    """Run the checks of formats that bring their own (GGUF, ONNX, ...); return the names of those found."""
    from .formats import available_formats

    found = []
    for name, fmt in sorted(available_formats().items()):
        if fmt.check is None:
            continue
        result = fmt.check(folder)
        if result is None:
            continue
        found.append(name)
        report.passed += [f"{name}: {line}" for line in result.passed]
        report.problems += [f"{name}: {line}" for line in result.problems]
    return found


def _has_torch_weights(folder: Path) -> bool:
    return any((folder / name).is_file() or (folder / f"{name}.index.json").is_file()
               for name in (SAFETENSORS_NAME, BIN_NAME))


def _check_weights(folder: Path, report: VerifyReport, *, required: bool = True) -> bool:
    """Check each weight layout present; True when every one is complete and readable.

    Without ``required`` (the folder holds another format's weights), no torch weights is no problem.
    """
    before = len(report.problems)
    layouts = {}
    for weights_name in (SAFETENSORS_NAME, BIN_NAME):
        files = _layout_files(folder, weights_name, report)
        if files is not None:
            layouts[weights_name] = files
    if not layouts:
        if not required:
            return False
        if len(report.problems) == before:
            report.problems.append(f"no weights found (looked for {SAFETENSORS_NAME} and {BIN_NAME}, single or sharded)")
        return False
    tensors = {}
    for weights_name, files in layouts.items():
        start = len(report.problems)
        # Beside sound safetensors weights (format "both"), the .bin ones must hold the same tensors.
        compare = weights_name == BIN_NAME and SAFETENSORS_NAME in tensors and len(report.problems) == before
        with (Checkpoint(folder) if compare else contextlib.nullcontext()) as reference:
            tensors[weights_name] = _read_layout(folder, weights_name, files, report, reference=reference)
        if len(report.problems) == start:
            report.passed.append(
                f"{weights_name}: {len(tensors[weights_name])} tensors in {len(files)} "
                f"file{'s' if len(files) > 1 else ''}, all readable"
            )
    if len(tensors) == 2 and set(tensors[SAFETENSORS_NAME]) != set(tensors[BIN_NAME]):
        only = sorted(set(tensors[SAFETENSORS_NAME]) ^ set(tensors[BIN_NAME]))
        report.problems.append(f"the safetensors and .bin weights hold different tensors, e.g. {only[0]!r}")
    return len(report.problems) == before


# --- bge-m3 heads ---------------------------------------------------------------------------------------


def _check_heads(folder: Path, config: Optional[dict], report: VerifyReport) -> bool:
    """True when both bge-m3 heads are present and sound; problems when only one is, or they are broken."""
    try:
        present = heads_present(folder)
    except MergeHooksError as exc:
        report.problems.append(str(exc))
        return False
    if not present:
        return False
    if len(present) < len(HEAD_FILES):
        missing = [name for name in HEAD_FILES if name not in present]
        report.problems.append(
            f"{present[0]} is present but {missing[0]} is missing: FlagEmbedding then initialises both heads randomly"
        )
        return False
    hidden = (config or {}).get("hidden_size")
    ok = True
    for name in HEAD_FILES:
        try:
            head = load_head(folder / name)
        except MergeHooksError as exc:
            report.problems.append(str(exc))
            ok = False
            continue
        if set(head) != {"weight", "bias"}:
            report.problems.append(f"{name} holds {sorted(head)}, not the weight and bias of a Linear layer")
            ok = False
            continue
        weight, bias = head["weight"], head["bias"]
        # The sparse head maps hidden -> 1; the ColBERT head hidden -> colbert_dim (hidden unless set).
        rows = 1 if name == SPARSE_FILE else (weight.shape[0] if weight.dim() == 2 else -1)
        if tuple(weight.shape) != (rows, hidden or weight.shape[-1]) or tuple(bias.shape) != (rows,):
            report.problems.append(
                f"{name} has weight {list(weight.shape)} and bias {list(bias.shape)}; expected "
                f"[{rows if rows > 0 else 'n'}, {hidden}] and [{rows if rows > 0 else 'n'}] for hidden_size {hidden}"
            )
            ok = False
    if ok:
        report.passed.append(f"bge-m3 heads {COLBERT_FILE} and {SPARSE_FILE} present and shaped for the model")
    return ok


# --- loaders --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def auto_class_name(config: dict) -> str:
    """The transformers Auto class for a config's architecture (AutoModel unless it names a task head)."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    if architecture.endswith("ForCausalLM"):
        return "AutoModelForCausalLM"
    return "AutoModel"


def _check_transformers(folder: Path, config: dict, report: VerifyReport, *, trust_remote_code: bool) -> None:
    if "auto_map" in config and not trust_remote_code:
        report.notes.append("transformers load not tried: the model uses custom code (pass --trust-remote-code)")
        return
    import transformers

    name = auto_class_name(config)
    try:
        model, info = getattr(transformers, name).from_pretrained(
            str(folder), output_loading_info=True, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as exc:  # any failure to load is the finding; its type varies by transformers release
        report.problems.append(f"transformers {name} cannot load the folder: {_first_line(exc)}")
        return
    del model
    problems = []
    for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "in the weights but unused"),
                      ("mismatched_keys", "of the wrong shape")):
        keys = sorted(str(k) for k in info.get(key) or ())
        if keys:
            problems.append(f"transformers {name}: {len(keys)} weights {what}, e.g. {keys[0]}")
    problems += [f"transformers {name}: {msg}" for msg in info.get("error_msgs") or ()]
    report.problems += problems
    if not problems:
        report.passed.append(f"loads with transformers {name} ({transformers.__version__}), no missing or unexpected weights")


def _check_sentence_transformers(folder: Path, report: VerifyReport, *, trust_remote_code: bool) -> None:
    import sentence_transformers

    try:
        model = sentence_transformers.SentenceTransformer(
            str(folder), device="cpu", trust_remote_code=trust_remote_code, local_files_only=True
        )
        embedding = model.encode([PROBE_TEXT], convert_to_tensor=True)
    except Exception as exc:  # any failure to load or encode is the finding
        report.problems.append(f"sentence-transformers cannot load or run the folder: {_first_line(exc)}")
        return
    if not bool(embedding.isfinite().all()):
        report.problems.append("sentence-transformers embeds a probe text to non-finite values")
        return
    report.passed.append(
        f"loads with sentence-transformers {sentence_transformers.__version__} (embedding size {embedding.shape[-1]})"
    )


def _check_flagembedding(folder: Path, report: VerifyReport) -> None:
    import torch

    try:
        from FlagEmbedding import BGEM3FlagModel
    except Exception as exc:  # stack B fails inside transformers, not with ImportError alone
        report.notes.append(f"FlagEmbedding BGEM3FlagModel not tried: FlagEmbedding does not import ({_first_line(exc)})")
        return
    try:
        m3 = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu")
        output = m3.encode([PROBE_TEXT], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    except Exception as exc:  # any failure to load or encode is the finding
        report.problems.append(f"FlagEmbedding BGEM3FlagModel cannot load or run the folder: {_first_line(exc)}")
        return
    for name in HEAD_FILES:
        loaded = getattr(m3.model, name.removesuffix(".pt")).state_dict()
        written = load_head(folder / name)
        if loaded.keys() != written.keys() or not all(
            torch.equal(loaded[k], written[k].to(loaded[k].dtype)) for k in written
        ):
            report.problems.append(f"FlagEmbedding BGEM3FlagModel does not use the weights of {name}")
            return
    if not all(v is not None for v in output.values()):
        report.problems.append("FlagEmbedding BGEM3FlagModel returns no dense, sparse or ColBERT output")
        return
    report.passed.append("loads with FlagEmbedding BGEM3FlagModel, with the heads of the folder")


# --- against a recipe -----------------------------------------------------------------------------------


def sample_names(specs: Sequence["TensorSpec"], *, spread: int = SAMPLE_SPREAD) -> list[str]:
    """A deterministic sample: the largest tensor, the smallest, and ``spread`` more evenly spaced by name.

    Example:
        >>> sample_names(Checkpoint("merged").specs.values())
        ['embeddings.word_embeddings.weight', 'pooler.dense.bias', ...]
    """
    ordered = sorted(specs, key=lambda s: s.name)
    if not ordered:
        return []
    by_size = sorted(ordered, key=lambda s: s.nbytes)
    chosen = [by_size[-1].name, by_size[0].name]
    if len(ordered) > 1:
        chosen += [ordered[round(i * (len(ordered) - 1) / max(1, spread - 1))].name for i in range(spread)]
    return list(dict.fromkeys(chosen))


def _same_bits(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _recorded_weights(folder: Path, recipe: "Recipe", report: VerifyReport) -> Optional[list[float]]:
    try:
        info = MergeInfo.read(folder)
    except ValueError as exc:
        report.problems.append(str(exc))
        return None
    if recipe.method == "mix_models_with_data":
        if info is None:
            report.problems.append(
                "cannot recompute a mix_models_with_data merge: the folder has no merge_info.json with the weights used"
            )
            return None
        weights = list(info.weights)
    else:
        weights = list(recipe.weights)
        if info is not None and list(info.weights) != weights:
            report.problems.append(f"merge_info.json records weights {info.weights}, the recipe has {weights}")
    if len(weights) != len(recipe.models):
        report.problems.append(f"{len(weights)} weights are known for the recipe's {len(recipe.models)} models")
        return None
    return weights


def _check_against(folder: Path, recipe: "Recipe", report: VerifyReport) -> None:
    from .adapters import adapted_names, adapter_requests
    from .engines import output_dtype
    from .engines.stream import stream_merge
    from .heads import merge_heads
    from .preflight import load_inputs, prefix_map

    weights = _recorded_weights(folder, recipe, report)
    if weights is None:
        return
    models = load_inputs(recipe.model_paths, trust_remote_code=recipe.trust_remote_code,
                         adapters=adapter_requests(recipe), revisions=recipe.revisions)
    result = stream_merge(models, weights, dtype=output_dtype(recipe.output.dtype, models[0].checkpoint.dtype))
    problems = []
    try:
        with Checkpoint(folder) as merged:
            planned = {s.name: s for s in result.source.specs}
            names = {name: name for name in merged.specs if name in planned}
            if len(names) < len(merged.specs):
                names = prefix_map(set(merged.specs), set(planned)) or names
            unplanned = sorted(set(merged.specs) - set(names))
            if unplanned:
                problems.append(f"tensor {unplanned[0]!r} of the folder is not a tensor of the recipe's first model")
            missing = sorted(set(planned) - set(names.values()))
            if missing:
                problems.append(f"tensor {missing[0]!r} of the recipe's merge is missing from the folder")
            sample = sample_names([merged.specs[n] for n in names])
            adapted = adapted_names(models, names)
            sample += [n for n in adapted if n not in sample]
            for name in sample:
                expected, actual = result.source.get(names[name]), merged.get(name)
                if not _same_bits(actual, expected):
                    diff = ""
                    if actual.shape == expected.shape and actual.is_floating_point() and expected.is_floating_point():
                        diff = f", max abs difference {(actual.double() - expected.double()).abs().max().item():.3g}"
                    problems.append(
                        f"tensor {name!r} differs from the recipe's merge ({actual.dtype} {list(actual.shape)} vs "
                        f"{expected.dtype} {list(expected.shape)}{diff})"
                    )
        compared = f"{len(sample)} sampled tensors" + (" (with the adapter deltas)" if adapted else "")
        if heads_present(models[0].path):
            heads = merge_heads([m.path for m in models], weights, dtype=result.dtype)
            for name, expected_head in heads.items():
                if not (folder / name).is_file():
                    problems.append(f"{name} is missing, the recipe's models have bge-m3 heads")
                    continue
                try:
                    actual_head = load_head(folder / name)
                except MergeHooksError as exc:
                    problems.append(str(exc))
                    continue
                if actual_head.keys() != expected_head.keys() or not all(
                    _same_bits(actual_head[k], expected_head[k]) for k in expected_head
                ):
                    problems.append(f"{name} differs from the heads merged from the recipe's models")
            compared += " and the bge-m3 heads"
    finally:
        result.close()
    report.problems += problems
    if not problems:
        report.passed.append(f"{compared} equal the recipe's merge bit for bit")

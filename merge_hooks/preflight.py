"""Every check that can fail before heavy work starts: inputs, recipe consistency, output location, disk."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .checkpoint import Checkpoint
from .errors import MergeHooksError
from .heads import check_heads
from .paths import check_output_location, read_json
from .sidecar import check_sidecars
from .units import format_size

if TYPE_CHECKING:
    from .adapters import AdapterRequest

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class InputModel:
    """One resolved input: where it lives, its config and its lazily read weights."""

    spec: str
    path: Path
    config: dict
    checkpoint: Checkpoint
    # Output (model 1) tensor name -> this model's tensor name, when a checkpoint prefix differs.
    names: dict[str, str] = field(default_factory=dict)

    def tensor_name(self, name: str) -> str:
        return self.names.get(name, name)


def resolve_model_path(spec: str, *, revision: Optional[str] = None) -> Path:
    """A local folder as given, or a hub id (at ``revision``, else the newest cached) through the local Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MergeHooksError(f"model {spec!r} is a file; give the folder that holds config.json")
        # Absolute: loaders take a relative "dir/name" that is not a folder of *their* cwd for a hub id.
        return path.absolute()
    if not _HUB_ID.match(spec) or spec.startswith("."):
        raise MergeHooksError(f"model path {spec!r} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise MergeHooksError(
                f"model {spec!r} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                "and HF_HUB_OFFLINE is set: download it first or give a local path"
            ) from None
    logger.info("downloading %s from the Hugging Face Hub", spec)
    try:
        return Path(snapshot_download(spec, revision=revision))
    except Exception as exc:  # the hub raises many kinds; the user needs the reason, not the type
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MergeHooksError(f"cannot download model {spec!r}: {reason}") from None


def read_config(path: Path, spec: str) -> dict:
    if not (path / "config.json").is_file():
        raise MergeHooksError(f"model {spec!r} has no config.json in {path}")
    return read_json(path, "config.json")


# Files whose ``auto_map`` makes transformers import the model's own Python code.
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                "feature_extractor_config.json", "image_processor_config.json", "video_preprocessor_config.json")


def custom_code(path: Path) -> list[str]:
    """Why loading the model folder ``path`` would run code of its own: one line per file that asks for it.

    transformers imports the model's Python files for an ``auto_map`` in any of :data:`CODE_CONFIGS`;
    sentence-transformers imports the module classes ``modules.json`` names outside its own package.
    """
    reasons = []
    for name in CODE_CONFIGS:
        if (path / name).is_file() and "auto_map" in read_json(path, name):
            reasons.append(f"auto_map in its {name}")
    if (path / "modules.json").is_file():
        for module in read_json(path, "modules.json", kind=list):
            kind = module.get("type") if isinstance(module, dict) else None
            if isinstance(kind, str) and not kind.startswith("sentence_transformers."):
                reasons.append(f"module type {kind} in its modules.json")
    return reasons


def check_remote_code(models: list[InputModel], *, trust_remote_code: bool) -> None:
    """Custom code runs only when the user opted in (LM_Cocktail always allows it, for every load)."""
    if trust_remote_code:
        return
    for model in models:
        reasons = custom_code(model.path)
        if reasons:
            raise MergeHooksError(
                f"model {model.spec!r} uses custom code ({', '.join(reasons)}); merge-hooks runs it only "
                "with 'trust_remote_code: true' in the recipe or --trust-remote-code"
            )


def prefix_map(base: set[str], other: set[str]) -> Optional[dict[str, str]]:
    """Map base names onto other names when they differ by one leading module prefix (``bert.``).

    That is how the same weights look when saved from ``BertModel`` and from ``BertForMaskedLM``;
    transformers loads either into ``AutoModel``. Extra tensors of the other model (its heads) are ignored.
    """
    prefixes = {n.split(".", 1)[0] + "." for n in base ^ other if "." in n}
    for prefix in sorted(prefixes):
        mapping = {}
        for name in base:
            for candidate in (name, prefix + name, name.removeprefix(prefix)):
                if candidate in other:
                    mapping[name] = candidate
                    break
        renamed = any(k != v for k, v in mapping.items())
        if renamed and len(mapping) == len(base) and len(set(mapping.values())) == len(base):
            return mapping
    return None


def dtype_kind(dtype) -> str:
    """floating, integer, bool or complex: values of different kinds cannot be mixed."""
    if dtype.name.startswith("complex"):
        return "complex"
    if dtype.name == "bool":
        return "bool"
    return "floating" if dtype.is_floating_point else "integer"


def check_same_architecture(models: list[InputModel]) -> None:
    """Architectures, tensor names and shapes agree; otherwise name the first thing that differs."""
    first = models[0]
    for model in models[1:]:
        for key in ("model_type", "architectures"):
            if first.config.get(key) != model.config.get(key):
                raise MergeHooksError(
                    f"models {first.spec!r} and {model.spec!r} differ in {key}: "
                    f"{first.config.get(key)!r} vs {model.config.get(key)!r}"
                )
        base, other = set(first.checkpoint.specs), set(model.checkpoint.specs)
        if base != other:
            mapping = prefix_map(base, other)
            if mapping is None:
                missing = sorted(base - other)
                name = missing[0] if missing else sorted(other - base)[0]
                where = model.spec if missing else first.spec
                raise MergeHooksError(
                    f"models {first.spec!r} and {model.spec!r} have different tensors: {name!r} is missing from {where!r}"
                )
            model.names = {k: v for k, v in mapping.items() if k != v}
        for name, spec in first.checkpoint.specs.items():
            theirs = model.checkpoint.specs[model.tensor_name(name)]
            if theirs.shape != spec.shape:
                raise MergeHooksError(
                    f"models {first.spec!r} and {model.spec!r} differ in tensor {name!r}: "
                    f"shape {list(spec.shape)} vs {list(theirs.shape)}"
                )
            if dtype_kind(theirs.dtype) != dtype_kind(spec.dtype):
                raise MergeHooksError(
                    f"models {first.spec!r} and {model.spec!r} differ in tensor {name!r}: "
                    f"{spec.dtype} ({dtype_kind(spec.dtype)}) vs {theirs.dtype} ({dtype_kind(theirs.dtype)}); "
                    "a merge needs the same kind of values in every model"
                )


def load_inputs(
    specs: list[str],
    *,
    trust_remote_code: bool,
    adapters: Optional[list["AdapterRequest"]] = None,
    revisions: Optional[list[Optional[str]]] = None,
) -> list[InputModel]:
    """Resolve, read and cross-check every input model (tensors and bge-m3 heads); nothing heavy is loaded.

    ``adapters`` (one request per model, see :func:`merge_hooks.adapters.adapter_requests`) puts LoRA
    adapters in front of the models' checkpoints, so that every later check sees the merged tensors.
    ``revisions`` pins hub ids to a commit, one entry per spec (None for the newest cached / local folders).
    """
    models = []
    for spec, revision in zip(specs, revisions or [None] * len(specs)):
        path = resolve_model_path(spec, revision=revision)
        config = read_config(path, spec)
        models.append(InputModel(spec=spec, path=path, config=config, checkpoint=Checkpoint(path)))
    try:
        if adapters:
            from .adapters import attach_requests

            attach_requests(models, adapters)
        check_remote_code(models, trust_remote_code=trust_remote_code)
        check_sidecars(models[0].path)
        check_same_architecture(models)
        check_heads(models)
    except BaseException:
        for model in models:
            model.checkpoint.close()
        raise
    return models


def check_output(
    path: Optional[Path], *, overwrite: bool, force: bool = False, inputs: tuple[Path, ...] = ()
) -> Path:
    """The output location is usable; see :func:`merge_hooks.paths.check_output_location`. Returns it resolved."""
    return check_output_location(path, overwrite=overwrite, force=force, inputs=inputs)


def check_disk_space(directory: Path, needed: int) -> None:
    """Fail early, with both numbers, when the output will not fit."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise MergeHooksError(
            f"not enough disk space in {probe}: the output needs {needed} bytes ({format_size(needed)}), "
            f"{free} bytes ({format_size(free)}) are available"
        )

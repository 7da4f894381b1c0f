"""Every check that can fail before heavy work starts: inputs, recipe consistency, output location, disk."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .checkpoint import Checkpoint
from .errors import MergeHooksError
from .heads import check_heads
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


def resolve_model_path(spec: str) -> Path:
    """A local folder as given, or a hub id through the local Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MergeHooksError(f"model {spec!r} is a file; give the folder that holds config.json")
        return path
    if not _HUB_ID.match(spec) or spec.startswith("."):
        raise MergeHooksError(f"model path {spec!r} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise MergeHooksError(
                f"model {spec!r} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                "and HF_HUB_OFFLINE is set: download it first or give a local path"
            ) from None
    logger.info("downloading %s from the Hugging Face Hub", spec)
    try:
        return Path(snapshot_download(spec))
    except Exception as exc:  # the hub raises many kinds; the user needs the reason, not the type
        raise MergeHooksError(f"cannot download model {spec!r}: {exc}") from None


def read_config(path: Path, spec: str) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise MergeHooksError(f"model {spec!r} has no config.json in {path}")
    try:
        return json.loads(config_path.read_text())
    except ValueError as exc:
        raise MergeHooksError(f"{config_path} is not valid JSON: {exc}") from None


def check_remote_code(models: list[InputModel], *, trust_remote_code: bool) -> None:
    """Custom modelling code runs only when the user opted in (LM_Cocktail always runs it)."""
    if trust_remote_code:
        return
    for model in models:
        if "auto_map" in model.config:
            raise MergeHooksError(
                f"model {model.spec!r} uses custom code (auto_map in its config.json); merge-hooks runs it only "
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


def load_inputs(
    specs: list[str], *, trust_remote_code: bool, adapters: Optional[list["AdapterRequest"]] = None
) -> list[InputModel]:
    """Resolve, read and cross-check every input model (tensors and bge-m3 heads); nothing heavy is loaded.

    ``adapters`` (one request per model, see :func:`merge_hooks.adapters.adapter_requests`) puts LoRA
    adapters in front of the models' checkpoints, so that every later check sees the merged tensors.
    """
    models = []
    for spec in specs:
        path = resolve_model_path(spec)
        config = read_config(path, spec)
        models.append(InputModel(spec=spec, path=path, config=config, checkpoint=Checkpoint(path)))
    try:
        if adapters:
            from .adapters import attach_requests

            attach_requests(models, adapters)
        check_remote_code(models, trust_remote_code=trust_remote_code)
        check_same_architecture(models)
        check_heads(models)
    except BaseException:
        for model in models:
            model.checkpoint.close()
        raise
    return models


def check_output(path: Optional[Path], *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """The output location is usable: not a file, empty or absent unless ``overwrite``, not an input."""
    if path is None:
        raise MergeHooksError("no output folder given: set output.path in the recipe or pass --output")
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise MergeHooksError(f"output path {path} is a file; give a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MergeHooksError(f"output folder {path} exists and is not empty; pass --overwrite to replace it")
    for source in inputs:
        if path == source.absolute() or path in source.absolute().parents:
            raise MergeHooksError(f"output folder {path} would replace input model {source}")
    return path


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

"""The output-format stage: a small registry of ways to write a merged model's weights.

A format is one :class:`OutputFormat` object named ``FORMAT`` in a module of this package
(adding a built-in format means adding one file here), or one registered by another package
through the ``merge_hooks.formats`` entry-point group::

    [project.entry-points."merge_hooks.formats"]
    gguf = "my_package.gguf_format:FORMAT"

Format modules must not import torch at import time: ``merge-hooks formats`` lists them
without loading torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import MergeHooksError

if TYPE_CHECKING:
    from ..tensors import TensorSource

ENTRY_POINT_GROUP = "merge_hooks.formats"


@dataclass(frozen=True)
class WriteOptions:
    """What every format receives besides the tensors."""

    max_shard_size: int
    metadata: dict[str, str] = field(default_factory=dict)
    progress: Callable[[int], None] | None = None
    #: When set, formats that can hash files while writing them record each file's sha256 here
    #: (by path), so the manifest need not read them again; files left out are hashed afterwards.
    digests: dict[Path, str] | None = None


@dataclass(frozen=True)
class OutputFormat:
    """One output format.

    Args:
        name: what users pass as ``save_format``.
        description: one line for ``merge-hooks formats``.
        write: ``write(source, directory, options) -> list of written paths``; writes the weights
            (and index files) into ``directory``, which exists and is empty of weight files.
        size_factor: how many bytes are written per byte of tensors (2 for a format writing two copies),
            used to check free disk space before writing.
        takes_arrays: ``write`` also accepts sources whose ``get`` returns numpy arrays (see
            :class:`~merge_hooks.tensors.TensorSource`); such merges need not import torch.
    """

    name: str
    description: str
    write: Callable[["TensorSource", Path, WriteOptions], list[Path]]
    size_factor: int = 1
    takes_arrays: bool = False


@lru_cache(maxsize=1)
def available_formats() -> dict[str, OutputFormat]:
    """All registered formats by name: the built-in modules first, then entry points."""
    formats: dict[str, OutputFormat] = {}
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        fmt = getattr(module, "FORMAT", None)
        if isinstance(fmt, OutputFormat):
            formats[fmt.name] = fmt
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in formats:
            continue
        fmt = ep.load()
        if not isinstance(fmt, OutputFormat):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a merge_hooks.formats.OutputFormat")
        formats[ep.name] = fmt
    return formats


def get_format(name: str) -> OutputFormat:
    """The format called ``name``, or a :class:`MergeHooksError` listing the known ones."""
    formats = available_formats()
    if name not in formats:
        known = ", ".join(sorted(formats))
        raise MergeHooksError(f"unknown save format {name!r}; known formats: {known}")
    return formats[name]

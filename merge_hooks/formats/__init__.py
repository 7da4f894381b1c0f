"""The output-format stage: a small registry of ways to write a merged model's weights.

A format is one :class:`OutputFormat` object named ``FORMAT`` in a module (or package) of this
package (adding a built-in format means adding one file or folder here), or one registered by
another package through the ``merge_hooks.formats`` entry-point group::

    [project.entry-points."merge_hooks.formats"]
    gguf = "my_package.gguf_format:FORMAT"

Format modules must not import torch (or any runtime they write for) at import time:
``merge-hooks formats`` lists them without loading torch.

One merge may write several formats into one folder (``save_format: [safetensors, gguf]``):
:func:`expand_formats` turns the names into formats, :func:`write_formats` writes all of them from
one pass over the merged tensors.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..errors import MergeHooksError

if TYPE_CHECKING:
    from ..recipe import OutputOptions
    from ..tensors import TensorSource, TensorSpec

ENTRY_POINT_GROUP = "merge_hooks.formats"


@dataclass(frozen=True)
class WriteOptions:
    """What every format receives besides the tensors."""

    max_shard_size: int
    metadata: dict[str, str] = field(default_factory=dict)
    progress: Callable[[int], None] | None = None
    #: When set, formats that can hash files while writing them record each file's hex digest here (by
    #: path; :data:`merge_hooks.io.hashing.ALGORITHM`, see :class:`~merge_hooks.io.hashing.WeightFile`),
    #: so the manifest need not read them again; files left out are hashed afterwards.
    digests: dict[Path, str] | None = None
    #: Every format written in this run, by name (a format learns whether torch weights were asked for).
    formats: tuple[str, ...] = ()
    #: The first input model's folder (config, tokenizer, sentence-transformers files, heads), or the
    #: source folder of ``convert``.
    model_dir: Optional[Path] = None
    #: The first model's config.json.
    config: dict[str, Any] = field(default_factory=dict)
    #: Every input model as the recipe names it (a folder or a hub id), in order; empty for ``convert``.
    models: tuple[str, ...] = ()
    #: encoder | reranker | decoder; None for ``convert``.
    model_type: Optional[str] = None
    #: The final output folder's name (``merged`` for ``./out/merged``), for file names such as ``merged-F16.gguf``.
    output_name: str = ""
    #: The recipe's output options, so a format reads its own keys.
    output: Optional["OutputOptions"] = None


@dataclass(frozen=True)
class FormatCheck:
    """What a format's own check found in a folder: checks that held and problems."""

    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PreflightContext:
    """What a format may look at before any merge work starts."""

    model_dir: Path
    config: dict[str, Any]
    model_type: Optional[str]
    output: Optional["OutputOptions"]
    formats: tuple[str, ...]


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
        size: ``size(context, specs) -> bytes`` the format writes for tensors ``specs`` (as merged), for
            formats whose size is not ``size_factor`` times theirs (a GGUF's depends on its type); see
            :func:`output_size`.
        takes_arrays: ``write`` also accepts sources whose ``get`` returns numpy arrays (see
            :class:`~merge_hooks.tensors.TensorSource`); such merges need not import torch.
        alias_of: a name for a list of other formats (``both`` = safetensors and bin); ``write`` is then unused.
        preflight: ``preflight(context)`` runs before any merge work and raises :class:`MergeHooksError`
            for inputs the format cannot write (an architecture it does not know, a missing extra).
        finish: ``finish(directory, options) -> paths written`` runs after every format's ``write``, once
            the config, tokenizer and other sidecar files are in ``directory``, before provenance files;
            for formats made from the written model (an exporter loading it back).
        check: ``check(folder)`` for ``merge-hooks verify``: None when the folder holds none of the
            format's files, else a :class:`FormatCheck`.
    """

    name: str
    description: str
    write: Optional[Callable[["TensorSource", Path, WriteOptions], list[Path]]] = None
    size_factor: int = 1
    size: Optional[Callable[[PreflightContext, Sequence["TensorSpec"]], int]] = None
    takes_arrays: bool = False
    alias_of: tuple[str, ...] = ()
    preflight: Optional[Callable[[PreflightContext], None]] = None
    finish: Optional[Callable[[Path, WriteOptions], list[Path]]] = None
    check: Optional[Callable[[Path], Optional[FormatCheck]]] = None


@lru_cache(maxsize=1)
def builtin_formats() -> dict[str, OutputFormat]:
    """The formats of merge-hooks' own modules by name."""
    formats: dict[str, OutputFormat] = {}
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        fmt = getattr(module, "FORMAT", None)
        if isinstance(fmt, OutputFormat):
            formats[fmt.name] = fmt
    return formats


@lru_cache(maxsize=1)
def available_formats() -> dict[str, OutputFormat]:
    """All registered formats by name: the built-in modules first, then entry points."""
    from importlib.metadata import entry_points

    formats = dict(builtin_formats())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in formats:
            continue
        fmt = ep.load()
        if not isinstance(fmt, OutputFormat):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a merge_hooks.formats.OutputFormat")
        formats[ep.name] = fmt
    return formats


def get_format(name: str) -> OutputFormat:
    """The format called ``name``, or a :class:`MergeHooksError` listing the known ones.

    A built-in name is found without looking through the installed packages' entry points (a plugin cannot
    take a built-in name), which a merge would otherwise pay for at start-up.
    """
    fmt = builtin_formats().get(name)
    if fmt is not None:
        return fmt
    formats = available_formats()
    if name not in formats:
        known = ", ".join(sorted(formats))
        raise MergeHooksError(f"unknown save format {name!r}; known formats: {known}")
    return formats[name]


def format_names(value: str | Sequence[str]) -> list[str]:
    """The format names of a ``save_format`` value: a name, ``"a,b"`` or a list; order kept, duplicates dropped.

    Aliases (``both``) are expanded; unknown names are a :class:`MergeHooksError` listing the known ones.

    Example:
        >>> format_names("both,gguf")
        ['safetensors', 'bin', 'gguf']
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise MergeHooksError(f"save format names are strings, got {item!r}")
        name = item.strip()
        if not name:
            raise MergeHooksError(f"empty save format name in {value!r}")
        fmt = get_format(name)
        names += list(fmt.alias_of) or [fmt.name]
    if not names:
        raise MergeHooksError("no save format given; known formats: " + ", ".join(sorted(available_formats())))
    return list(dict.fromkeys(names))


def expand_formats(value: str | Sequence[str]) -> list[OutputFormat]:
    """The formats of a ``save_format`` value (see :func:`format_names`)."""
    return [get_format(name) for name in format_names(value)]


def preflight_formats(formats: Sequence[OutputFormat], context: PreflightContext) -> None:
    """Run every format's ``preflight`` check (before any merge work)."""
    for fmt in formats:
        if fmt.preflight is not None:
            fmt.preflight(context)


def output_size(formats: Sequence[OutputFormat], context: PreflightContext, specs: Sequence["TensorSpec"]) -> int:
    """Bytes of weight files ``formats`` write for tensors ``specs`` (their written dtypes), for the disk-space check.

    Example:
        >>> output_size(expand_formats("safetensors,gguf"), context, specs)  # 1x the tensors, plus the GGUF's size
    """
    tensor_bytes = sum(spec.nbytes for spec in specs)
    return sum(fmt.size(context, specs) if fmt.size is not None else fmt.size_factor * tensor_bytes
               for fmt in formats)


def finish_formats(directory: Path, formats: Sequence[OutputFormat], options: WriteOptions) -> list[Path]:
    """Run every format's ``finish`` step, once the weights and sidecar files are in ``directory``."""
    return [path for fmt in formats if fmt.finish is not None for path in fmt.finish(directory, options)]


def write_formats(
    source: "TensorSource", directory: Path, formats: Sequence[OutputFormat], options: WriteOptions
) -> list[Path]:
    """Write every format that takes tensors, from one pass over ``source``; return the paths written.

    With one such format this is its ``write``. With several, each writes in a thread of its own from
    a :func:`~merge_hooks.tensors.tee` of ``source``: every merged tensor is computed once and handed
    to all of them, and memory stays bounded (a writer that runs ahead waits for the others).
    """
    writers = [fmt for fmt in formats if fmt.write is not None]
    if len(writers) <= 1:
        return [path for fmt in writers for path in fmt.write(source, directory, options)]
    from concurrent.futures import ThreadPoolExecutor

    from ..tensors import TeeAborted, tee

    branches = tee(source, len(writers))
    pool = ThreadPoolExecutor(max_workers=len(writers), thread_name_prefix="merge-hooks-writer")
    try:
        futures = [pool.submit(_write_branch, fmt, branch, directory, options) for fmt, branch in zip(writers, branches)]
        pool.shutdown(wait=True)
    except BaseException:
        # Ctrl-C or SIGTERM in the main thread: stop the writers at their next tensor, then let staging clean up.
        branches[0].abort()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        # The writer that failed first raised its own error; the others only saw that it failed.
        raise next((e for e in errors if not isinstance(e, TeeAborted)), errors[0])
    return [path for future in futures for path in future.result()]


def _write_branch(fmt: OutputFormat, branch, directory: Path, options: WriteOptions) -> list[Path]:
    try:
        return fmt.write(branch, directory, options)
    except BaseException:
        branch.abort()
        raise
    finally:
        branch.close()  # the others must not wait for a writer that has stopped

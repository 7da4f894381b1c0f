"""Where merge-hooks may read and write: one policy for merge, convert, verify and the Python API.

- The output location is resolved (symlinks followed) and refused when replacing it could destroy
  something the user did not ask to replace: an input model (or a folder holding one, or a folder
  inside one), the current directory or a folder above it, the filesystem root, a home directory.
- ``overwrite`` replaces only a folder merge-hooks wrote (it holds ``merge_info.json`` or
  ``merge_manifest.json``); any other non-empty folder needs ``force`` as well.
- Every file read from a model folder must resolve inside that folder (:func:`confined`), with one
  allowance: a Hugging Face cache snapshot, whose files are symlinks into the same repo's ``blobs/``.
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Union

from .errors import MergeHooksError

# What merge-hooks writes into every merge output (see card.py); convert carries them along.
OUTPUT_MARKERS = ("merge_info.json", "merge_manifest.json")

PathLike = Union[str, os.PathLike]


def real(path: PathLike) -> Path:
    """``path`` made absolute with every symlink resolved (as far as it exists)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _readable_roots(root: Path) -> list[Path]:
    """Where files of the model folder ``root`` may resolve: the folder, and for a Hugging Face cache
    snapshot (``models--org--name/snapshots/<rev>``) the same repo's ``blobs/``."""
    root = real(root)
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(root.parent.parent / "blobs")
    return roots


def inside(root: PathLike, name: str) -> bool:
    """Whether the relative file name ``name`` (as a model folder's JSON files give it) stays in ``root``.

    Absolute names and ``..`` are refused outright; symlinks must resolve into ``root`` or, for a
    Hugging Face cache snapshot, into its repo's ``blobs/``.

    Example:
        >>> inside("bge-base", "1_Pooling/config.json"), inside("bge-base", "../other/model.safetensors")
        (True, False)
    """
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        return False
    resolved = real(Path(root) / name)
    return any(_within(resolved, allowed) for allowed in _readable_roots(Path(root)))


def confined(root: PathLike, name: str, *, what: str = "file") -> Path:
    """``root / name``, or a :class:`MergeHooksError` naming the file when it would leave ``root``.

    Example:
        >>> confined(Path("bge-base"), "tokenizer.json")
        PosixPath('bge-base/tokenizer.json')
    """
    if not inside(root, name):
        raise MergeHooksError(
            f"{what} {name!r} of {root} lies outside that folder (an absolute path, '..' or a symlink out of it); "
            "merge-hooks reads only files inside a model's folder"
        )
    return Path(root) / name


def check_tree(root: PathLike, name: str, *, what: str = "folder") -> Path:
    """``root / name`` after checking that it and everything under it stays inside ``root``.

    A symlinked folder inside is refused (copying would follow it out of the tree); symlinked files
    must resolve inside, as :func:`confined` checks.
    """
    top = confined(root, name, what=what)
    for dirpath, dirnames, filenames in os.walk(top):
        for entry in (*dirnames, *filenames):
            path = Path(dirpath) / entry
            relative = path.relative_to(root).as_posix()
            if path.is_symlink() and path.is_dir():
                raise MergeHooksError(
                    f"{relative} in {root} is a symlink to a folder; merge-hooks copies only real folders inside a model"
                )
            confined(root, relative, what=what)
    return top


def read_json(root: PathLike, name: str, *, kind: type = dict, what: Optional[str] = None) -> Union[dict, list]:
    """Parse the JSON file ``name`` of the folder ``root``, which must hold a ``kind`` (object or list).

    The file must lie inside ``root`` (see :func:`confined`); any problem is one :class:`MergeHooksError`.

    Example:
        >>> read_json(Path("bge-base"), "config.json")["model_type"]
        'bert'
    """
    path = confined(root, name)
    label = what or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeHooksError(f"cannot read {label}: {getattr(exc, 'strerror', None) or exc}") from None
    except ValueError as exc:
        raise MergeHooksError(f"{label} is not valid JSON: {exc}") from None
    if not isinstance(data, kind):
        expected = "object" if kind is dict else "list"
        raise MergeHooksError(f"{label} must hold a JSON {expected}, not {type(data).__name__}")
    return data


def is_merge_output(folder: PathLike) -> bool:
    """Whether ``folder`` holds what merge-hooks writes (``merge_info.json`` or ``merge_manifest.json``)."""
    folder = Path(folder)
    return any((folder / name).is_file() and not (folder / name).is_symlink() for name in OUTPUT_MARKERS)


def _home_folders() -> set[Path]:
    homes = {real(Path.home())}
    try:
        homes.update(real(entry.pw_dir) for entry in pwd.getpwall() if entry.pw_dir)
    except OSError:
        pass
    return homes


def _protected(target: Path) -> Optional[str]:
    """Why replacing ``target`` could destroy what the user did not name, or None."""
    if target == Path(target.anchor):
        return "is the filesystem root"
    cwd = real(Path.cwd())
    if _within(cwd, target):
        return "is the current directory" if target == cwd else "holds the current directory"
    for home in _home_folders():
        if _within(home, target):
            return "is a home directory" if target == home else f"holds the home directory {home}"
    return None


def resolve_output(path: Optional[PathLike]) -> Path:
    """The output folder as it will be written: absolute, its parent's symlinks resolved.

    The last component itself must not be a symlink (dangling or not): what would be replaced is
    then ambiguous.
    """
    if path is None:
        raise MergeHooksError("no output folder given: set output.path in the recipe or pass --output")
    if not isinstance(path, (str, os.PathLike)):
        raise MergeHooksError(f"the output path must be a string or path, not {type(path).__name__}")
    raw = os.fspath(path)
    if not isinstance(raw, str) or not raw.strip():
        raise MergeHooksError("the output path is empty (an unset shell variable?); give the folder to write")
    # Not os.path.abspath: it drops "a/.." lexically, where the system resolves a symlinked "a" first.
    parent, name = os.path.split(os.path.join(os.getcwd(), os.path.expanduser(raw)).rstrip("/"))
    if name in ("", ".", ".."):
        raise MergeHooksError(f"output path {raw!r} names no folder of its own; give a new folder such as ./merged")
    given = Path(parent) / name
    if given.is_symlink():
        pointee = os.readlink(given)
        state = "a dangling symlink" if not given.exists() else "a symlink"
        raise MergeHooksError(f"output path {given} is {state} (to {pointee}); give the real folder instead")
    return real(given.parent) / given.name


def check_output_location(
    path: Optional[PathLike],
    *,
    overwrite: bool = False,
    force: bool = False,
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Resolve the output folder and refuse any location a write could destroy something at.

    ``inputs`` are the model folders read, given as typed and as resolved (both are compared, so a
    symlinked input is caught through either name). Returns the resolved output path.

    Raises:
        MergeHooksError: the output is empty, a symlink, a file, protected (root, current directory, a home),
            overlaps an input, is not empty without ``overwrite``, or is a folder merge-hooks did not write
            and ``force`` is not given; or its location is not writable.

    Example:
        >>> check_output_location("merged", overwrite=True, inputs=[Path("bge-base")])
        PosixPath('/home/me/work/merged')
    """
    target = resolve_output(path)
    why = _protected(target)
    if why is not None:
        raise MergeHooksError(f"refusing to write the output to {target}: it {why}; give a new folder such as ./merged")
    for source in inputs:
        for form in {Path(os.path.abspath(os.path.expanduser(os.fspath(source)))), real(source)}:
            if _within(form, target) or _within(target, form):
                relation = "is" if form == target else "holds" if _within(form, target) else "lies inside"
                raise MergeHooksError(
                    f"output folder {target} {relation} input model {source}; write the merge to a separate folder"
                )
    if target.exists() and not target.is_dir():
        raise MergeHooksError(f"output path {target} is a file; give a folder")
    try:
        occupied = target.is_dir() and any(target.iterdir())
    except OSError as exc:
        raise MergeHooksError(f"cannot look into the output folder {target}: {exc.strerror or exc}") from None
    if occupied:
        if not overwrite:
            raise MergeHooksError(f"output folder {target} exists and is not empty; pass --overwrite to replace it")
        if not force and not is_merge_output(target):
            raise MergeHooksError(
                f"output folder {target} was not written by merge-hooks (no {' or '.join(OUTPUT_MARKERS)}); "
                "--overwrite replaces only merge-hooks outputs: pass --force as well to replace it anyway"
            )
    probe = target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise MergeHooksError(f"cannot write the output to {target}: {probe} is not a writable folder")
    return target

"""Atomic output: write into a staging folder beside the target, then move it into place in one step.

A crash, Ctrl-C, SIGTERM or a full disk leaves either no output folder or the previous one untouched.
A run holds a lock file beside the target (``.NAME.merge-hooks.lock``) from preflight to commit, and
commits only if the target still is what preflight saw; otherwise the new result is kept beside it
under a name the error gives, and nothing is deleted. Staging folders and lock files left by a killed
process (SIGKILL cannot be caught) are removed by the next run that writes into the same parent folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .errors import MergeHooksError
from .paths import OUTPUT_MARKERS

logger = logging.getLogger(__name__)

STAGING_MARK = ".merge-hooks-staging-"
LOCK_SUFFIX = ".merge-hooks.lock"
KEPT_MARK = ".merge-hooks-new-"
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _staging_name(target: Path) -> str:
    return f".{target.name}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(path: Path) -> Optional[int]:
    """An open, exclusively flock-ed descriptor of the lock file ``path``, or None while another run holds it.

    A lock file is unlinked by its holder when it finishes; a run that opened the old file just
    before that would lock an unlinked file, so the lock counts only if ``path`` is still that file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)  # closing drops the flock


def remove_stale_staging(target: Path) -> None:
    """Delete staging folders and lock files in ``target``'s parent folder whose run is gone.

    Any run in the same parent cleans up after killed runs, whatever output they were writing.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        name = entry.name
        if STAGING_MARK in name and name.startswith("."):
            pid = name.split(STAGING_MARK, 1)[1].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)) and entry.is_dir() and not entry.is_symlink():
                logger.info("removing %s left by an interrupted run", entry)
                shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(".") and name.endswith(LOCK_SUFFIX) and entry != _lock_path(target):
            with contextlib.suppress(OSError):
                fd = _try_lock(entry)
                if fd is not None:
                    _unlock(entry, fd)


@dataclass(frozen=True)
class TargetState:
    """What the output location held when the run began: nothing (or an empty folder), or a folder
    identified by its inode and its merge-hooks provenance."""

    inode: Optional[tuple[int, int]]
    markers: Optional[str]

    @classmethod
    def of(cls, target: Path) -> "TargetState":
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return cls(None, None)
        if os.path.isdir(target) and not os.path.islink(target) and not any(target.iterdir()):
            return cls(None, None)
        digest = hashlib.sha256()
        for name in OUTPUT_MARKERS:
            with contextlib.suppress(OSError):
                digest.update(name.encode() + b"\0" + (target / name).read_bytes())
        return cls((st.st_dev, st.st_ino), digest.hexdigest())


@dataclass
class Claim:
    """A run's hold on its output location: the lock, what the target held, folders created for it."""

    target: Path
    state: TargetState
    created: list[Path]


def _make_parents(target: Path) -> list[Path]:
    """Create the missing parent folders of ``target``; return them, deepest first."""
    missing = []
    probe = target.parent
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        raise MergeHooksError(f"cannot create the output folder's parent {target.parent}: {exc.strerror or exc}") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def claimed_output(target: Path) -> Iterator[Claim]:
    """Hold ``target``'s lock for the whole run and remember what it holds now.

    Parent folders created for the output are removed again when the run fails. SIGTERM becomes
    an exception inside, so the lock file and staging folders are cleaned up.

    Raises:
        MergeHooksError: another run holds the lock, or the location is not writable.

    Example:
        >>> with claimed_output(Path("merged").absolute()) as claim, staged_output(claim.target, claim=claim) as staging:
        ...     (staging / "config.json").write_text("{}")
    """
    target = Path(target)
    created = _make_parents(target)
    lock = _lock_path(target)
    try:
        fd = _try_lock(lock)
    except OSError as exc:
        _remove_empty(created)
        raise MergeHooksError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    if fd is None:
        _remove_empty(created)
        raise MergeHooksError(
            f"another merge-hooks run is writing {target} (it holds {lock}); wait for it to finish or choose another output"
        )
    ok = False
    try:
        with _sigterm_raises():
            remove_stale_staging(target)
            yield Claim(target, TargetState.of(target), created)
            ok = True
    finally:
        _unlock(lock, fd)
        if not ok:
            _remove_empty(created)


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2 with ``flags`` (RENAME_NOREPLACE, RENAME_EXCHANGE); False where unsupported.

    Python's os module has no renameat2, hence ctypes.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _kept_name(target: Path, what: str) -> Path:
    return target.parent / f"{target.name}{what}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _keep_new_result(staging: Path, target: Path) -> None:
    kept = _kept_name(target, KEPT_MARK)
    os.rename(staging, kept)
    raise MergeHooksError(
        f"{target} changed while this run was writing (another program wrote to it); nothing there was replaced "
        f"or deleted, and the new result is in {kept}"
    )


def commit(staging: Path, target: Path, *, expected: Optional[TargetState] = None) -> None:
    """Move a complete staging folder to ``target``, replacing what is there in one step.

    With ``expected`` (what the target held when the run began), a target that changed since is
    left alone: the staging folder is kept beside it and a :class:`MergeHooksError` says where.
    """
    _fsync_tree(staging)
    if expected is not None and TargetState.of(target) != expected:
        _keep_new_result(staging, target)
    if expected is None or expected.inode is None:
        with contextlib.suppress(FileNotFoundError):
            if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
                target.rmdir()
        try:
            if not _rename2(staging, target, _RENAME_NOREPLACE):
                os.rename(staging, target)  # replaces at most an empty folder
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            _keep_new_result(staging, target)
    elif _rename2(staging, target, _RENAME_EXCHANGE):
        previous = os.lstat(staging)
        if (previous.st_dev, previous.st_ino) == expected.inode:
            shutil.rmtree(staging)
        else:  # replaced in the instant between the check and the swap: keep it, delete nothing
            kept = _kept_name(target, ".merge-hooks-previous-")
            os.rename(staging, kept)
            logger.warning("%s changed just before the commit; what was there is now in %s", target, kept)
    else:
        backup = target.parent / _staging_name(target)
        os.rename(target, backup)
        os.rename(staging, target)
        shutil.rmtree(backup)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Terminated(BaseException):
    """SIGTERM turned into an exception so cleanup runs."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged_output(target: Path, *, claim: Optional[Claim] = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it becomes ``target``.

    ``claim`` is the run's :func:`claimed_output` (taken before preflight looked at the target);
    without one, the target is claimed here. On any exception (including Ctrl-C and SIGTERM) the
    staging folder is removed and ``target`` is left as it was. A full disk becomes a
    :class:`MergeHooksError`.

    Example:
        >>> with staged_output(Path("merged")) as staging:
        ...     (staging / "config.json").write_text("{}")
    """
    if claim is None:
        with claimed_output(Path(target).absolute()) as own, staged_output(own.target, claim=own) as staging:
            yield staging
        return
    target = claim.target
    staging = target.parent / _staging_name(target)
    staging.mkdir()
    try:
        with _sigterm_raises():
            yield staging
            commit(staging, target, expected=claim.state)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MergeHooksError(f"disk full while writing {target}; nothing was written") from None
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

"""Atomic output: write into a staging folder beside the target, then move it into place in one step.

A crash, Ctrl-C, SIGTERM or a full disk leaves either no output folder or the previous one untouched.
Staging folders left by a killed process (SIGKILL cannot be caught) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from .errors import MergeHooksError

logger = logging.getLogger(__name__)

STAGING_MARK = ".merge-hooks-staging-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _staging_name(target: Path) -> str:
    return f".{target.name}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: Path) -> None:
    """Delete staging folders for ``target`` whose process is gone."""
    prefix = f".{target.name}{STAGING_MARK}"
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    Python's os module has no renameat2, hence ctypes.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
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


def commit(staging: Path, target: Path) -> None:
    """Move a complete staging folder to ``target``, replacing what is there in one step."""
    _fsync_tree(staging)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # now holds the previous output
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
def staged_output(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it becomes ``target``.

    On any exception (including Ctrl-C and SIGTERM) the staging folder is removed and ``target``
    is left as it was. A full disk becomes a :class:`MergeHooksError`.

    Example:
        >>> with staged_output(Path("merged")) as staging:
        ...     (staging / "config.json").write_text("{}")
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = target.parent / _staging_name(target)
    staging.mkdir()
    try:
        with _sigterm_raises():
            yield staging
            commit(staging, target)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MergeHooksError(f"disk full while writing {target}; nothing was written") from None
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

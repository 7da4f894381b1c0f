"""Weight files as they are written: hashed for the manifest from the bytes handed to the file, and
written back to disk as they go.

The manifest records a digest of every file. Reading each file back after writing it cost a third
of a BERT-base merge; reading it back right behind the writer still copied every byte out of the page
cache once more. A :class:`HashingFile` instead passes every buffer written to a thread that hashes it
from memory: the
writer goes on at once, and the thread holds at most :data:`PENDING` buffers, which the writer was
holding anyway (row blocks of a few MiB, so memory stays bounded).

The digest is BLAKE3 (the ``blake3`` package): as collision-resistant as SHA-256 for this purpose and
4x faster on this kind of machine (4.3 GB/s against 1.0 GB/s with SHA extensions, one core), which
matters when every byte of a multi-GB merge is hashed. Manifests written with ``sha256`` still verify.

The output is fsynced before it is committed (see :mod:`merge_hooks.staging`); left to the end, that
fsync waited for the whole file to reach the disk (a quarter of a BERT-base merge). A
:class:`HashingFile` asks the kernel to start writing back every :data:`WRITEBACK_BYTES` as soon as they
are written (``sync_file_range``, which does not wait), so the disk works while the merge goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Optional

from .libc import errno, libc_function

#: The algorithm new manifests record (``"algorithm"``, and the key of each file's digest).
ALGORITHM = "blake3"
#: Algorithms a manifest may name: ``sha256`` is what merge-hooks 0.1 manifests used.
ALGORITHMS = ("blake3", "sha256")
#: Buffers written but not yet hashed before the writer waits for the hashing thread.
PENDING = 4
#: Bytes read at a time when a whole file is hashed.
CHUNK = 4 * 2**20
#: Written bytes after which the kernel is asked to start writing them back.
WRITEBACK_BYTES = 32 * 2**20

logger = logging.getLogger(__name__)


def new_hash(algorithm: str = ALGORITHM) -> Any:
    """A fresh hash object (``update``, ``hexdigest``) of ``algorithm``."""
    if algorithm == "blake3":
        from blake3 import blake3

        return blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}; merge-hooks knows {', '.join(ALGORITHMS)}")


def hash_file(path: str | Path, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file, read in :data:`CHUNK` pieces into one reused buffer."""
    digest = new_hash(algorithm)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


class HashingFile:
    """Wraps a binary file open for writing: ``write`` writes and hashes (in a thread), ``tell`` passes through.

    Buffers given to ``write`` must not change afterwards (the thread may still be reading them);
    writers hand over blocks they are done with, and bytes. A writer that reuses its buffers passes
    ``reuses_buffers=True``: each buffer is then hashed before ``write`` returns. Bytes already in the
    file (a header another library wrote) are read back and hashed first.

    Example:
        >>> with open(path, "wb") as raw, HashingFile(raw) as f:
        ...     f.write(header)
        ...     f.write(block)
        ...     digest = f.hexdigest()
    """

    def __init__(self, f, algorithm: str = ALGORITHM, *, reuses_buffers: bool = False):
        self._f = f
        self._written_back = self._unflushed = 0
        self._hash = new_hash(algorithm)
        self._error: Optional[BaseException] = None
        self._digest: Optional[str] = None
        if f.tell():
            f.flush()
            with open(f.name, "rb", buffering=0) as existing:  # f itself is open for writing only
                self._hash_prefix(existing.fileno(), f.tell())
        self._pending: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        if not reuses_buffers:
            self._pending = queue.Queue(maxsize=PENDING)
            self._thread = threading.Thread(target=self._run, name="merge-hooks-hash", daemon=True)
            self._thread.start()

    def _hash_prefix(self, fd: int, size: int) -> None:
        view = memoryview(bytearray(min(CHUNK, size)))
        done = 0
        while done < size:
            n = os.preadv(fd, [view[: min(len(view), size - done)]], done)
            if not n:
                raise OSError(f"file ended at byte {done} while hashing its first {size} bytes")
            self._hash.update(view[:n])
            done += n

    def write(self, data) -> int:
        n = self._f.write(data)
        if self._error is not None:
            raise self._error
        if self._pending is None:
            self._hash.update(memoryview(data).cast("B"))
        else:
            self._pending.put(memoryview(data).cast("B"))
        self._unflushed += n
        if self._unflushed >= WRITEBACK_BYTES:
            self._f.flush()
            end = self._f.tell()
            start_writeback(self._f.fileno(), self._written_back, end - self._written_back)
            self._written_back, self._unflushed = end, 0
        return n

    def tell(self) -> int:
        return self._f.tell()

    def hexdigest(self) -> str:
        """The digest of everything written; no more writes after this."""
        if self._digest is None:
            self._stop()
            if self._error is not None:
                raise self._error
            self._digest = self._hash.hexdigest()
        return self._digest

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (view := self._pending.get()) is not None:
            if self._error is None:
                try:
                    self._hash.update(view)
                except BaseException as exc:  # raised again in the writer's thread
                    self._error = exc
            del view

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop()


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk, without waiting.

    Only a head start for a later fsync, which is what makes the data durable: where the call is
    missing or fails, nothing changes but speed.
    """
    function = libc_function("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")
    if function is not None and function(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        logger.debug("sync_file_range failed (errno %d); the fsync at commit writes everything", errno())

"""Weight files as they are written: hashed for the manifest from the bytes handed to the file, and
sent to the disk as they go.

The manifest records a digest of every file. Reading each file back after writing it cost a third
of a BERT-base merge; reading it back right behind the writer still copied every byte out of the page
cache once more. A :class:`WeightFile` instead hashes every buffer from memory as it is written: in
the writer's thread when the bytes have just been copied for ``O_DIRECT`` (see below; blake3 lets go
of the GIL, and the writer mostly waits for the merge anyway), otherwise in a thread that holds at
most :data:`PENDING` buffers, which the writer was holding anyway (row blocks of a few MiB, so memory
stays bounded).

The digest is BLAKE3 (the ``blake3`` package): as collision-resistant as SHA-256 for this purpose and
4x faster on this kind of machine (4.3 GB/s against 1.0 GB/s with SHA extensions, one core), which
matters when every byte of a multi-GB merge is hashed. Manifests written with ``sha256`` still verify.

The output is fsynced before it is committed (see :mod:`merge_hooks.staging`), so the commit waits until
every byte is on the disk; the disk is what a merge's speed is bound by at the end. Where the file
system allows it, a :class:`WeightFile` writes with ``O_DIRECT``: the bytes are gathered into a few
aligned :data:`DIRECT_CHUNK` buffers and a thread hands each full one to the disk while the writer fills
the next, so the disk works from the first block on and the page cache is left alone. Written through
the page cache instead (BERT-base, 438 MB, on this kind of machine), the kernel's copy into new cache
pages took 0.1-1.8 s from one run to the next and the fsync at the end waited another 0.15 s for the
disk; ``O_DIRECT`` took the disk's own 0.29 s every time, with a tenth of the CPU. Where ``O_DIRECT``
is refused (tmpfs, other systems), the file is written through the page cache, and a thread asks the
kernel every :data:`WRITEBACK_BYTES` to start writing back (``sync_file_range``, which can block while
the device's queue is full, so never in the writer's thread).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
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
PENDING = 2
#: Bytes read at a time when a whole file is hashed.
CHUNK = 4 * 2**20
#: Written bytes after which the kernel is asked to start writing them back (page-cache writes only).
WRITEBACK_BYTES = 32 * 2**20
#: Size of each aligned buffer ``O_DIRECT`` writes go through, and how many there are: one being filled,
#: the others on their way to the disk.
DIRECT_CHUNK = 4 * 2**20
DIRECT_BUFFERS = 3
#: File offsets, lengths and buffer addresses of ``O_DIRECT`` writes are multiples of this (the largest
#: logical block size in use; a probe write at open checks it).
DIRECT_ALIGNMENT = 4096
#: Set to 0 to write every file through the page cache.
DIRECT_ENV = "MERGE_HOOKS_DIRECT_IO"

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


class WeightFile:
    """Wraps a binary file open for writing and empty: ``write`` appends, hashing when given an ``algorithm``;
    ``tell`` counts the bytes written.

    Buffers given to ``write`` must not change afterwards (the thread may still be reading them);
    writers hand over blocks they are done with, and bytes. A writer that reuses its buffers passes
    ``reuses_buffers=True``: each buffer is then hashed before ``write`` returns. Bytes already in the
    file (a header another library wrote) are read back and hashed first; such a file is written
    through the page cache. Leaving the ``with`` block normally (or :meth:`hexdigest`) writes the last
    bytes and waits for the threads; leaving it with an exception only stops them.

    Example:
        >>> with open(path, "wb") as raw, WeightFile(raw) as f:
        ...     f.write(header)
        ...     f.write(block)
        ...     digest = f.hexdigest()
    """

    def __init__(self, f, algorithm: Optional[str] = ALGORITHM, *, reuses_buffers: bool = False):
        self._f = f
        self._written_back = self._unflushed = 0
        self._hash = new_hash(algorithm) if algorithm else None
        self._error: Optional[BaseException] = None
        self._digest: Optional[str] = None
        self._finished = False
        start = f.tell()
        if start and self._hash is not None:
            f.flush()
            with open(f.name, "rb", buffering=0) as existing:  # f itself is open for writing only
                self._hash_prefix(existing.fileno(), start)
        self._direct = None if start else _DirectSink.open(f.name)
        # Hashed in the writer's thread: a buffer about to be reused, or one already copied for O_DIRECT (the
        # writer waits for the merge most of the time, blake3 lets go of the GIL, and the block is let go at once).
        self._hash_inline = reuses_buffers or self._direct is not None
        # Buffers to hash (memoryviews) and ranges to write back ((offset, length)), in the order written.
        self._pending: queue.Queue = queue.Queue(maxsize=PENDING)
        self._thread: Optional[threading.Thread] = None
        if (self._hash is not None and not self._hash_inline) or self._direct is None:
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
        if self._error is not None:
            raise self._error
        view = memoryview(data).cast("B")
        if self._direct is not None:
            self._direct.write(view)
        else:
            self._f.write(view)
            self._unflushed += view.nbytes
            if self._unflushed >= WRITEBACK_BYTES:
                self._f.flush()
                end = self._f.tell()
                self._pending.put((self._written_back, end - self._written_back))
                self._written_back, self._unflushed = end, 0
        if self._hash is not None:
            if self._hash_inline:
                self._hash.update(view)
            else:
                self._pending.put(view)
        return view.nbytes

    def tell(self) -> int:
        return self._direct.tell() if self._direct is not None else self._f.tell()

    def hexdigest(self) -> str:
        """The digest of everything written; no more writes after this."""
        self.finish()
        if self._hash is None:
            raise ValueError("this file is not hashed (no algorithm was given)")
        if self._digest is None:
            self._digest = self._hash.hexdigest()
        return self._digest

    def finish(self) -> None:
        """Write what is still buffered and wait for the threads; no more writes after this."""
        if self._finished:
            return
        self._finished = True
        try:
            if self._direct is not None:
                self._direct.finish()
        finally:
            self._stop()
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()
        if self._direct is not None:
            self._direct.close()

    def _run(self) -> None:
        fd = self._f.fileno()
        while (item := self._pending.get()) is not None:
            if self._error is not None:
                continue
            try:
                if isinstance(item, tuple):
                    start_writeback(fd, *item)
                else:
                    self._hash.update(item)
            except BaseException as exc:  # raised again in the writer's thread
                self._error = exc
            del item

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.finish()
        else:
            self._finished = True
            self._stop()


class _DirectSink:
    """Appends to a file through ``O_DIRECT``: bytes are copied into aligned buffers, and a thread writes each
    full buffer at its offset while the writer fills the next. :meth:`finish` writes the last, partial
    buffer padded to the alignment and cuts the file to its length.

    Written by hand: Python's file objects have no ``O_DIRECT`` mode (it needs aligned memory, offsets
    and lengths), and no library offers one for plain files.
    """

    @classmethod
    def open(cls, path: str) -> Optional["_DirectSink"]:
        """A sink for the empty file ``path``, or None where ``O_DIRECT`` is off, missing or refused."""
        if os.environ.get(DIRECT_ENV, "1") == "0" or not hasattr(os, "O_DIRECT"):
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            return None
        with mmap.mmap(-1, DIRECT_ALIGNMENT) as probe:  # anonymous maps are page-aligned
            try:
                written = os.pwrite(fd, probe, 0)
            except OSError as exc:
                written = 0
                logger.debug("O_DIRECT write refused (%s); writing %s through the page cache", exc, path)
        if written != DIRECT_ALIGNMENT:
            os.close(fd)
            return None
        return cls(fd)

    def __init__(self, fd: int) -> None:
        import numpy as np

        self._np = np
        self._fd = fd
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(DIRECT_BUFFERS):
            self._free.put(np.frombuffer(mmap.mmap(-1, DIRECT_CHUNK), np.uint8))
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        self._buffer: Any = None
        self._used = 0  # bytes of self._buffer filled
        self._offset = 0  # file offset of self._buffer
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="merge-hooks-write", daemon=True)
        self._thread.start()

    def tell(self) -> int:
        return self._offset + self._used

    def write(self, view: memoryview) -> None:
        done = 0
        while done < view.nbytes:
            if self._error is not None:
                raise self._error
            if self._buffer is None:
                self._buffer = self._free.get()
            n = min(DIRECT_CHUNK - self._used, view.nbytes - done)
            # numpy's copy lets go of the GIL (a slice assignment would hold it, and stall the merge's threads)
            self._np.copyto(self._buffer[self._used:self._used + n], self._np.frombuffer(view[done:done + n], self._np.uint8))
            self._used += n
            done += n
            if self._used == DIRECT_CHUNK:
                self._send(DIRECT_CHUNK)

    def _send(self, length: int) -> None:
        self._full.put((self._buffer, length, self._offset))
        self._offset += self._used
        self._buffer, self._used = None, 0

    def finish(self) -> None:
        size = self.tell()
        if self._used:
            padded = -(-self._used // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
            self._buffer[self._used:padded] = 0
            self._send(padded)
        self._full.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        os.ftruncate(self._fd, size)

    def close(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, length, offset = item
            try:
                if self._error is None:
                    view = memoryview(buffer)
                    done = 0
                    while done < length:  # O_DIRECT writes to a regular file are whole, but a short one goes on
                        done += os.pwrite(self._fd, view[done:length], offset + done)
                    del view
            except BaseException as exc:  # raised again in the writer's thread
                self._error = exc
            self._free.put(buffer)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk, without waiting.

    Only a head start for a later fsync, which is what makes the data durable: where the call is
    missing or fails, nothing changes but speed.
    """
    function = libc_function("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")
    if function is not None and function(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        logger.debug("sync_file_range failed (errno %d); the fsync at commit writes everything", errno())

"""Hash a file while it is being written, from the page cache, in a background thread.

The manifest needs the sha256 of every weight file. Reading each file again after writing it cost a
third of a BERT-base merge; hashing the bytes right behind the writer overlaps that work with reading
and merging the next tensors. The hasher reads the file back (the pages are still cached) into one
small buffer instead of holding on to the writer's tensors, so memory does not grow with tensor size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Optional

# hashlib and os.preadv release the GIL for buffers this large.
CHUNK = 4 * 2**20


class TrailingHasher:
    """sha256 of a file, hashed in a background thread up to the offset the writer says is final.

    Example:
        >>> with open(path, "wb") as f, TrailingHasher(path) as hasher:
        ...     f.write(data)
        ...     f.flush()
        ...     hasher.advance(f.tell())
        ...     digest = hasher.finish(f.tell())
    """

    def __init__(self, path: str | os.PathLike):
        self._fd = os.open(path, os.O_RDONLY)
        self._digest = hashlib.sha256()
        self._final = 0
        self._closing = False
        self._abandoned = False
        self._error: Optional[BaseException] = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="merge-hooks-hash", daemon=True)
        self._thread.start()

    def advance(self, offset: int) -> None:
        """Bytes before ``offset`` are written (flushed to the OS) and will not change again."""
        with self._changed:
            if offset > self._final:
                self._final = offset
                self._changed.notify()

    def finish(self, size: int) -> str:
        """Hash up to ``size`` (the final file size) and return the hex digest."""
        self.advance(size)
        self._stop()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def _stop(self, *, abandon: bool = False) -> None:
        if self._fd < 0:
            return
        with self._changed:
            self._closing = True
            self._abandoned = abandon
            self._changed.notify()
        self._thread.join()
        os.close(self._fd)
        self._fd = -1

    def _run(self) -> None:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        done = 0
        try:
            while True:
                with self._changed:
                    while done >= self._final and not self._closing:
                        self._changed.wait()
                    if self._abandoned or (done >= self._final and self._closing):
                        return
                    final = self._final
                while done < final:
                    n = os.preadv(self._fd, [view[: min(CHUNK, final - done)]], done)
                    if not n:
                        raise OSError(f"file ended at byte {done} while hashing up to byte {final}")
                    self._digest.update(view[:n])
                    done += n
        except BaseException as exc:  # raised again in the writer's thread by finish()
            self._error = exc

    def __enter__(self) -> "TrailingHasher":
        return self

    def __exit__(self, *exc_info) -> None:
        # After finish() this does nothing; after an error it stops the thread without hashing the rest.
        self._stop(abandon=True)

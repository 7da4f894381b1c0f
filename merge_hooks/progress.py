"""Progress bars (tqdm, on stderr) for the long steps."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def byte_progress(total: int, description: str, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)`` that moves a byte-counting bar; a no-op when ``quiet``."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
              dynamic_ncols=True, leave=False) as bar:
        yield bar.update

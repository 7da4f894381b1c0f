"""Progress bars (tqdm, on stderr) for the long steps."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def byte_progress(total: int, description: str, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)`` that moves a byte-counting bar; a no-op when ``quiet``."""
    if quiet:
        # Without importing tqdm: tqdm.auto pulls in asyncio and ssl, a noticeable part of a small merge's start-up.
        yield lambda nbytes: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1000,
              dynamic_ncols=True, leave=False) as bar:
        yield bar.update


@contextlib.contextmanager
def loader_progress_bars(*, enabled: bool) -> Iterator[None]:
    """Switch transformers' model-loading bars (transformers 5 draws one per load) on or off for a block.

    Imports transformers only when bars are to be switched off, so the stream engine never loads it.
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

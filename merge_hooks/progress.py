"""Progress bars (tqdm, on stderr) for the long steps."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from types import ModuleType
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


@contextlib.contextmanager
def silenced_tqdm(module: ModuleType, *, quiet: bool) -> Iterator[None]:
    """Draw no bars from ``module``'s ``tqdm`` for a block when ``quiet``.

    LM_Cocktail imports ``tqdm`` by name and offers no switch, and tqdm reads its ``TQDM_DISABLE``
    setting only when tqdm is imported, so the name is swapped for a disabled tqdm instead.
    """
    if not quiet:
        yield
        return
    original = module.tqdm
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


@contextlib.contextmanager
def library_warnings_hidden() -> Iterator[None]:
    """transformers', sentence-transformers' and Python warnings off for a block, unless logging shows INFO (-v).

    Loaders warn about their own affairs while a report is being made; what matters to the report
    (missing weights, failures) is collected from their return values instead.
    """
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    st_logger = logging.getLogger("sentence_transformers")
    st_level = st_logger.level
    hf_logging.set_verbosity_error()
    st_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        st_logger.setLevel(st_level)

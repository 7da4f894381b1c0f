"""System calls Python's os module does not offer, from the C library through ctypes."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional


@functools.lru_cache(maxsize=None)
def libc_function(name: str, *argtypes: str) -> Optional[Callable[..., int]]:
    """The C library's function ``name`` with ctypes argument types named by ``argtypes`` (``"c_int"``, ...),
    or None where there is no such function (another OS, another C library). Errors set ``ctypes.get_errno()``.

    Example:
        >>> madvise = libc_function("madvise", "c_void_p", "c_size_t", "c_int")
    """
    import ctypes

    try:
        function: Any = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = tuple(getattr(ctypes, t) for t in argtypes)
    return function


def errno() -> int:
    """The errno the last failed :func:`libc_function` call left."""
    import ctypes

    return ctypes.get_errno()

"""The API process's allocator, tuned for request bodies of megabytes (glibc only).

By default glibc gives each allocation over its (moving) threshold fresh pages from the kernel
and returns freed memory at the top of the heap soon after, so every request with a picture
faults in new pages for the body, its copies and the decoded image: measured here, half of
what a cache hit on a re-encoded 4 MB picture cost (``bench/multimodal.py``). :func:`tune`
takes allocations of up to 32 MiB (more than a body) from the heap and keeps up to
``retain`` bytes of freed memory for reuse instead; that memory stays in the process's
resident size (``malloc_retain_bytes``: 0 leaves glibc's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024**2
"""glibc's largest accepted M_MMAP_THRESHOLD on 64-bit (half its 64 MiB heap size)."""
log = logging.getLogger(__name__)


def tune(retain: int) -> bool:
    """Apply the tuning; whether it was applied (not on other C libraries, not when the
    environment sets glibc's own ``MALLOC_*`` tunables, which the operator chose)."""
    if retain <= 0 or not sys.platform.startswith("linux"):
        return False
    if any(k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok: bool = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, min(retain, 2**31 - 1)) == 1 and ok
    if not ok:
        log.warning("malloc tuning refused by the C library; glibc's defaults stay")
    return ok

"""Keep the process's memory near what it holds: large buffers go straight back to the system.

Instances arrive as buffers of hundreds of KB to hundreds of MB, and the cache drops them in another
order than they came. glibc's allocator raises its mmap threshold each time such a buffer is freed
(the "dynamic mmap threshold"), after which these buffers are carved from the heaps of several
arenas, whose holes are rarely given back: the benchmark saw a gateway holding 512 MB of cache sit at
1.3 GB of RSS. A fixed threshold keeps every buffer of 128 KiB or more in its own mapping, unmapped
when freed, so RSS follows what is live (the same run: 630 MB), for a little more CPU per buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gateway")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, made fixed
TRIM_THRESHOLD = 1 << 20


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold (and so turn its dynamic growth off). False where there is no
    glibc (another libc, or a platform without ``mallopt``): nothing changes there."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("could not set the allocator's mmap threshold; memory may stay above what is in use")
    return ok

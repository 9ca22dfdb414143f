"""glibc's malloc told to keep freed memory for the next burst.

With large bodies a process allocates and frees megabytes all the time: on
the relay every turn (a SEND's frame, its bodies, the segment write), on a
node every send (the packed body, the SEND frame).  glibc's defaults hand
freed memory at the top of the heap back to the OS at once and serve big
blocks from fresh mmaps, so the next burst takes the same pages again as
page faults: with 64 KiB bodies about 22 faults per message on the relay,
30 on a sending node, most of their system CPU (and on a virtual machine
each fault is dearer).  Keeping up to `trim_threshold` of freed heap (and
serving blocks up to MMAP_THRESHOLD from the heap) takes that to about 5
and 1.

The relay calls keep_freed_memory() at start.  A node never changes its
process's allocator by itself: an application that sends large bodies
calls murano_zmq.keep_freed_memory() (docs/operations.md).  An operator's
own MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ win; other C libraries
are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("murano_zmq")

# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 64 << 20  # freed heap kept before any goes back to the OS
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's largest allowed)
OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Tune glibc's malloc as above; False when not glibc or the operator
    set it through the environment.  `trim_threshold`: bytes of freed heap
    kept (a sender that holds more large bodies at once than this still
    faults them in again)."""
    if any(name in os.environ for name in OPERATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    gnu.restype = ctypes.c_char_p
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.debug("glibc %s malloc: trim threshold %d, mmap threshold %d: %s", gnu().decode(), trim_threshold,
              MMAP_THRESHOLD, "set" if done else "refused")
    return done

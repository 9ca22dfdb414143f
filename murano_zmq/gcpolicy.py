"""Python's cyclic garbage collector, told to run less often on the relay.

The relay makes container objects by the thousand per turn (a SEND's
records are lists, its rows tuples) and frees nearly all of them by
reference counting within a commit or two; it makes few reference cycles.
CPython's default runs a young collection every 700 net allocations, so
objects still alive mid-turn are walked there, promoted, and walked again
by the older generations' collections: several per cent of the relay's
loop on the pipelined workload (docs/performance.md).  A young collection
per GEN0_THRESHOLD allocations finds most of them already freed, and what
start-up made (modules, configuration) is frozen out of every collection.
Cycles are still collected, later: once GEN0_THRESHOLD more container
objects are alive than at the last collection (a bound in objects, not
bytes: a cycle holding a large body waits as long as any other).  The
relay calls collect_less() at start; a node never changes its process's
collector by itself: an application with a high message rate may call
murano_zmq.collect_less() (docs/operations.md).
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000  # net allocations of container objects between young collections
GEN1_THRESHOLD = 20  # young collections between middle ones (CPython's default: 10)
GEN2_THRESHOLD = 100  # middle collections between full ones (default 10; a full one also waits for growth)


def collect_less() -> None:
    """Set the thresholds above and freeze what exists now (call it at start;
    garbage there now is collected first, not frozen for good)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)

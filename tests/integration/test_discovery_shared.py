"""Every Discovery of a process shares one asyncio loop thread
(discovery/zeroconf.py): asyncio allows one running loop per OS thread, and
under eventlet all green threads are one OS thread (tests/oslo/test_eventlet.py
runs that case).  Here: sharing, closing one of several, and fork."""

from __future__ import annotations

import subprocess
import sys
import threading

from murano_zmq.discovery import Advert, Discovery

from ..helpers import free_tcp_endpoint, wait_for


def loop_threads() -> int:
    return sum(t.name == "murano-zmq-discovery" for t in threading.enumerate())


def test_discoverys_share_one_loop_and_one_closing_leaves_the_others_working():
    before = loop_threads()
    a, b, c = Discovery("127.0.0.1"), Discovery("127.0.0.1"), Discovery("127.0.0.1")
    try:
        assert loop_threads() == max(before, 1)
        a.advertise(Advert("shared-a", "node", free_tcp_endpoint()))
        wait_for(lambda: any(ad.name == "shared-a" for ad in c.peers.values()), 15, what="a seen by c")
        a.close()
        b.advertise(Advert("shared-b", "node", free_tcp_endpoint()))
        wait_for(lambda: any(ad.name == "shared-b" for ad in c.peers.values()), 15,
                 what="b seen by c after a closed")
        wait_for(lambda: not any(ad.name == "shared-a" for ad in c.peers.values()), 15, what="a gone")
    finally:
        for d in (b, c):
            d.close()
    wait_for(lambda: loop_threads() == before, 15, what="the loop thread to end with its last user")


FORKING = r"""
import os
from murano_zmq.discovery import Discovery
parent = Discovery("127.0.0.1")
pid = os.fork()
if pid == 0:
    child = Discovery("127.0.0.1", timeout=10)  # the parent's loop thread is not in the child
    child.close()
    os._exit(0)
_, status = os.waitpid(pid, 0)
parent.close()
print("child exit", status, flush=True)
"""


def test_a_forked_child_starts_its_own_loop():
    out = subprocess.run([sys.executable, "-c", FORKING], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "child exit 0" in out.stdout, out.stderr

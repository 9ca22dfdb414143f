"""A direct link whose TCP connection drops while the consumer's application
holds a message: the CONFIRM must still reach the sender (issue 12, item 8).

Before ROUTER_MANDATORY (and a routing id kept across the link's
reconnects), the consumer's ROUTER dropped that CONFIRM silently; the
sender then timed out or was told "say HELLO first", and gave the acked
message to the relay, which could hand it to a second consumer."""

from __future__ import annotations

import socket
import threading

from ..helpers import wait_for
from .test_direct import consumers_of, counters


class CuttableProxy:
    """A TCP proxy on loopback whose connections the test can cut."""

    def __init__(self, upstream: str):
        host, port = upstream.replace("tcp://", "").rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = "tcp://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=5)
            except OSError:  # the consumer is gone
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns += [client, server]
                self.accepted += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


def test_a_confirm_survives_the_links_reconnect(make_node):
    svc = make_node("svc", heartbeat=0.2)
    proxy = CuttableProxy(svc.endpoint)
    try:
        getattr(svc, "node", svc)._core.endpoint = proxy.endpoint  # senders reach svc through the proxy
        inbox = svc.consume("work", prefetch=10)
        other = make_node("other").consume("work", prefetch=10, direct=False)  # a second consumer
        client = make_node("client", heartbeat=0.2, direct_timeout=4.0)
        wait_for(lambda: consumers_of(client, "work") == 2, 10, what="two consumers")

        def probe_went_direct() -> bool:  # the client learns svc's (proxied) endpoint
            before = counters(client)["received"]
            sent = client.send_async("work", "probe")  # a direct send returns once svc acks it
            wait_for(lambda: (collect_any(inbox, other), sent.done())[1], 10, interval=0, what="the probe")
            return counters(client)["received"] == before

        wait_for(probe_went_direct, 30, interval=0, what="the direct path")
        before = counters(client)["received"]
        held = client.send_async("work", "held")
        m = inbox.get(timeout=10)
        while m is not None and m.body == "probe":
            m.ack()
            m = inbox.get(timeout=10)
        assert m is not None and m.body == "held"
        accepted = proxy.accepted
        proxy.cut()  # the link's TCP connection drops while the application holds "held"
        m.ack()
        wait_for(lambda: proxy.accepted > accepted, 10, what="the link to reconnect")
        assert held.result(10) is not None
        assert other.get(timeout=1.0) is None, "an acked message reached a second consumer"
        # The cut may make the link look stalled, and a stalled link's
        # records get a copy at the relay (docs/protocol.md, Direct links):
        # that copy must be settled by the direct ack, never handed on.
        if counters(client)["received"] != before:
            wait_for(lambda: _depth(client, "work") == 0, 10, what="the relay's copy settled")
            assert other.get(timeout=1.0) is None, "the relay's copy of an acked message reached a second consumer"
    finally:
        proxy.close()


def _depth(node, mailbox: str) -> int:
    return sum(mb["depth"] for mb in node.status()["mailboxes"] if mb["name"] == mailbox)


def collect_any(*consumers) -> list:
    got = []
    for c in consumers:
        while (m := c.get(timeout=0.05)) is not None:
            got.append(m.body)
            m.ack()
    return got

"""Node options on both runners: path counts exported through prometheus-client
(murano_zmq.metrics, for nodes that opt in), and a consumer's byte credit."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from murano_zmq.metrics import register_node

from ..helpers import wait_for


def _sample(registry: CollectorRegistry, node: str, path: str) -> float:
    wanted = f'murano_zmq_node_messages_sent_total{{node="{node}",path="{path}"}} '
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {wanted!r} in the scrape")


def test_path_counts_are_scraped_per_path(make_node):
    svc, client = make_node("svc"), make_node("client")
    registry = CollectorRegistry()
    register_node(client, registry)
    assert _sample(registry, "client", "direct") == 0 and _sample(registry, "client", "relay") == 0
    direct_box = svc.consume("metrics.direct")
    relay_box = svc.consume("metrics.relay", direct=False)  # the relay only
    for i in range(20):
        client.send("metrics.relay", i)
    sent = [0]

    def one_more_direct() -> bool:
        client.send("metrics.direct", sent[0])
        sent[0] += 1
        return client.path_counts["direct"] > 0

    wait_for(one_more_direct, 20, 0.01, "a send on the direct path")
    for box, count in ((relay_box, 20), (direct_box, sent[0])):
        for _ in range(count):
            msg = box.get(timeout=15)
            assert msg is not None
            msg.ack()
    counts = client.path_counts
    assert counts["relay"] >= 20 and counts["direct"] >= 1
    assert counts["direct"] + counts["relay"] >= 20 + sent[0]
    assert _sample(registry, "client", "direct") == counts["direct"]
    assert _sample(registry, "client", "relay") == counts["relay"]


def test_prefetch_bytes_bounds_what_a_consumer_holds_unacked(make_node):
    node = make_node("holder", direct=False)
    node.send_many([("bytes.box", b"x" * 1000) for _ in range(5)])
    box = node.consume("bytes.box", prefetch=100, prefetch_bytes=2500)  # two 1 KB bodies fit, not three
    held = [box.get(timeout=15), box.get(timeout=15)]
    assert all(m is not None for m in held)
    assert box.get(timeout=1.0) is None, "a third body would pass the byte credit"
    held[0].ack()
    third = box.get(timeout=15)
    assert third is not None, "an ack frees credit for the next"
    for m in (held[1], third):
        m.ack()


def test_prefetch_bytes_is_checked(make_node):
    node = make_node("checker", direct=False)
    for bad in (0, -5, 1.5, "10"):
        try:
            node.consume("bytes.box", prefetch_bytes=bad)
        except ValueError as exc:
            assert "prefetch_bytes" in str(exc)
        else:
            raise AssertionError(f"prefetch_bytes={bad!r} accepted")

"""Prometheus metrics for nodes that opt in: which path their messages took.

    from prometheus_client import start_http_server
    from murano_zmq import Node
    from murano_zmq.metrics import register_node

    node = Node("conductor-1")
    register_node(node)          # prometheus-client's default registry
    start_http_server(9571, addr="127.0.0.1")

exports `murano_zmq_node_messages_sent_total{node="conductor-1",path="direct"}`
and `{path="relay"}`: records handed to each path (one that falls back from
a direct link to the relay counts on both).  The counts are read from the
node on each scrape; the send path only bumps two ints.  The relay's own
metrics are `murano-zmq relay --metrics` (docs/operations.md).
prometheus-client is the `metrics` extra.
"""

from __future__ import annotations


class NodeCollector:
    """A prometheus-client collector over one or more nodes (Node or AsyncNode)."""

    def __init__(self, *nodes) -> None:
        self.nodes = list(nodes)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        sent = CounterMetricFamily("murano_zmq_node_messages_sent",
                                   "Messages this node handed to the direct path or to the relay.",
                                   labels=["node", "path"])
        for node in self.nodes:
            for path, count in sorted(node.path_counts.items()):
                sent.add_metric([node.name, path], count)
        yield sent


def register_node(node, registry=None) -> NodeCollector:
    """Export `node`'s path counts through `registry` (default: prometheus-
    client's REGISTRY).  Returns the collector, for registry.unregister()."""
    try:
        from prometheus_client import REGISTRY
    except ImportError as exc:
        raise RuntimeError("node metrics need prometheus-client: pip install 'murano-zmq[metrics]'") from exc
    collector = NodeCollector(node)
    (registry or REGISTRY).register(collector)
    return collector

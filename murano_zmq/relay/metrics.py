"""Prometheus metrics for the relay: `murano-zmq relay --metrics HOST:PORT`.

Nothing here runs on the relay's hot path.  The engine keeps plain int
counters (RelayEngine.counters) and per-mailbox fields (relay/state.py);
the only per-commit work is CommitStats bumping a few ints in buckets.  On
each scrape, RelayCollector (called in prometheus-client's HTTP thread)
reads them and builds the families.  The reads are of ints and of lists
copied under the GIL, so a scrape never blocks or locks the loop.

Names follow RabbitMQ's Prometheus plugin (rabbitmq_prometheus), so its
dashboards and alerts map over: a mailbox is a queue (label `queue`, and
`vhost="/"`).  What RabbitMQ has no name for is prefixed murano_zmq_.
docs/operations.md lists the mapping.

prometheus-client is the `metrics` extra; without it --metrics fails with
a clear message.
"""

from __future__ import annotations

import bisect
import functools
import logging
import time

from ..protocol.errors import StartupError
from . import metrics_http

log = logging.getLogger("murano_zmq.relay")

# Commit (one fsync) latency buckets, seconds, and rows per commit.
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_ROWS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

VHOST = "/"  # murano-zmq has no vhosts; RabbitMQ dashboards filter on one

# (engine counter, metric name without _total, help).  Counters the engine
# does not have yet read as 0.
GLOBAL_COUNTERS = (
    ("received", "rabbitmq_global_messages_received", "Messages received from publishers (records of SEND)."),
    ("received", "rabbitmq_global_messages_received_confirm",
     "Messages received from publishers expecting confirmations (every SEND is confirmed)."),
    ("confirmed", "rabbitmq_global_messages_confirmed", "Messages confirmed to publishers (stored durably)."),
    ("delivered", "rabbitmq_global_messages_delivered", "Messages delivered to consumers."),
    ("delivered", "rabbitmq_global_messages_delivered_consume_manual_ack",
     "Messages delivered to consumers (always with manual acknowledgement)."),
    ("redelivered", "rabbitmq_global_messages_redelivered",
     "Delivered messages that had been delivered before (the redelivered flag)."),
    ("acked", "rabbitmq_global_messages_acknowledged", "Messages acknowledged by consumers."),
    ("dead_lettered", "murano_zmq_messages_dead_lettered", "Messages dead-lettered, every reason."),
    ("expired", "murano_zmq_messages_expired", "Messages whose TTL passed (dead-lettered or dropped)."),
    ("rejected", "murano_zmq_messages_refused_full", "Sends refused because the mailbox was full."),
)

# RabbitMQ's per-channel counters, aggregated (what its default /metrics
# gives and its Grafana "RabbitMQ-Overview" dashboard reads): a node session
# is a connection with one channel.
CHANNEL_COUNTERS = (
    ("received", "rabbitmq_channel_messages_published", "Messages published (records of SEND)."),
    ("confirmed", "rabbitmq_channel_messages_confirmed", "Messages confirmed to publishers."),
    ("delivered", "rabbitmq_channel_messages_delivered_ack",
     "Messages delivered to consumers in manual acknowledgement mode (all of them)."),
    ("redelivered", "rabbitmq_channel_messages_redelivered", "Messages redelivered to consumers."),
    ("acked", "rabbitmq_channel_messages_acked", "Messages acknowledged by consumers."),
)

# rabbitmq_global_messages_dead_lettered_<reason>_total, labelled as RabbitMQ
# labels them: dead_letter_strategy "at_least_once" for messages moved to a
# dead-letter mailbox (in the same commit that removes them), "disabled" for
# those dropped (no dead-letter mailbox set, or it was full).
DEAD_LETTER_REASONS = (
    ("expired", "Messages dead-lettered or dropped because their TTL passed."),
    ("rejected", "Messages dead-lettered or dropped because a consumer rejected them (NACK without requeue)."),
    ("maxlen", "Messages dead-lettered or dropped because their mailbox overflowed (drop-head)."),
    ("delivery_limit", "Messages dead-lettered or dropped because they came back after their mailbox's "
                       "delivery_limit of deliveries."),
)
QUEUE_TYPE = "murano_zmq_mailbox"  # RabbitMQ's queue_type label: rabbit_classic_queue, ...


class IntHistogram:
    """A histogram kept as plain ints; observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        counts = list(self.counts)
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class CommitStats:
    """Commit latency and rows per commit, measured by wrapping the store's
    insert/delete/commit on this one instance (the store stays unaware)."""

    def __init__(self) -> None:
        self.latency = IntHistogram(COMMIT_SECONDS_BUCKETS)
        self.rows = IntHistogram(BATCH_ROWS_BUCKETS)
        self._pending = 0

    def instrument(self, store) -> None:
        insert, delete, commit = store.insert, store.delete, store.commit

        def counted_insert(rows):
            self._pending += len(rows)
            return insert(rows)

        def counted_delete(seqs):
            self._pending += len(seqs)
            return delete(seqs)

        def timed_commit():
            rows, self._pending = self._pending, 0
            started = time.perf_counter()
            try:
                return commit()
            finally:
                self.latency.observe(time.perf_counter() - started)
                self.rows.observe(rows)

        store.insert, store.delete, store.commit = counted_insert, counted_delete, timed_commit


class RelayCollector:
    """A prometheus-client collector reading a live RelayEngine on scrape.
    `engine`: the engine, or a callable returning the one in service (the
    relay replaces its engine when it reloads after a store failure)."""

    def __init__(self, engine, commits: CommitStats | None = None) -> None:
        self._engine = engine if callable(engine) else (lambda: engine)
        self.commits = commits

    def describe(self):
        return []  # unchecked collector: families are built on scrape

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        engine = self._engine()
        mailboxes = list(engine.mailboxes.values())  # one C-level copy: the loop may add or drop one
        counters = dict(engine.counters)
        peers = list(engine.peers.values())

        per_queue = (
            ("rabbitmq_queue_messages_ready", "Messages ready to be delivered.", lambda m: m.ready_count),
            ("rabbitmq_queue_messages_unacked", "Messages delivered and not yet acknowledged.",
             lambda m: m.unacked_count),
            ("rabbitmq_queue_messages", "Ready and unacknowledged messages (mailbox depth).", lambda m: m.count),
            ("rabbitmq_queue_messages_bytes", "Body bytes of ready and unacknowledged messages.",
             lambda m: m.nbytes),
            ("rabbitmq_queue_messages_ready_bytes", "Body bytes of ready messages.", lambda m: m.ready_bytes),
            ("rabbitmq_queue_messages_unacked_bytes", "Body bytes of unacknowledged messages.",
             lambda m: m.unacked_bytes),
            ("rabbitmq_queue_consumers", "Consumers on the mailbox.", lambda m: len(m.consumers)),
        )
        for name, text, value in per_queue:
            family = GaugeMetricFamily(name, text, labels=["vhost", "queue"])
            for mb in mailboxes:
                family.add_metric([VHOST, mb.name], value(mb))
            yield family

        yield identity("rabbitmq_identity_info", "The relay's name, as RabbitMQ's node and cluster name.",
                       rabbitmq_node=engine.name, rabbitmq_cluster=engine.name, rabbitmq_endpoint="metrics")
        yield identity("rabbitmq_build_info", "murano-zmq and prometheus-client versions.",
                       murano_zmq_version=_version(), prometheus_client_version=_version("prometheus-client"))

        for key, name, text in GLOBAL_COUNTERS + CHANNEL_COUNTERS:
            yield CounterMetricFamily(name, text, value=counters.get(key, 0))
        for reason, text in DEAD_LETTER_REASONS:
            family = CounterMetricFamily(f"rabbitmq_global_messages_dead_lettered_{reason}", text,
                                         labels=["queue_type", "dead_letter_strategy"])
            family.add_metric([QUEUE_TYPE, "at_least_once"], counters.get(f"dead_lettered_{reason}", 0))
            family.add_metric([QUEUE_TYPE, "disabled"], counters.get(f"dropped_{reason}", 0))
            yield family

        yield GaugeMetricFamily("rabbitmq_queues", "Mailboxes.", value=len(mailboxes))
        yield GaugeMetricFamily("rabbitmq_consumers", "Consumers, every mailbox.",
                                value=sum(len(mb.consumers) for mb in mailboxes))
        yield GaugeMetricFamily("rabbitmq_connections", "Node sessions (as murano_zmq_sessions).",
                                value=len(peers))
        yield GaugeMetricFamily("rabbitmq_channels", "Node sessions (one channel each).", value=len(peers))
        yield GaugeMetricFamily("rabbitmq_channel_consumers", "Consumers, every mailbox (as rabbitmq_consumers).",
                                value=sum(len(mb.consumers) for mb in mailboxes))
        yield GaugeMetricFamily("murano_zmq_sessions", "Node sessions the relay holds.", value=len(peers))

        if self.commits is not None:
            for name, text, hist in (
                ("murano_zmq_commit_seconds", "Time of one store commit (one fsync).", self.commits.latency),
                ("murano_zmq_commit_batch_rows", "Rows (messages stored and settled) per commit.",
                 self.commits.rows),
            ):
                yield HistogramMetricFamily(name, text, buckets=hist.cumulative(), sum_value=hist.total)


def identity(name: str, text: str, **labels: str):
    """A RabbitMQ-style info gauge: value 1, the facts in its labels."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, text, labels=list(labels))
    family.add_metric(list(labels.values()), 1)
    return family


@functools.lru_cache(maxsize=None)
def _version(dist: str = "murano-zmq") -> str:
    from importlib.metadata import PackageNotFoundError, version

    if dist == "murano-zmq":
        from .. import __version__

        return __version__
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9570' -> ('127.0.0.1', 9570); ':9570' binds 0.0.0.0."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"--metrics wants HOST:PORT, got {text!r}")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--metrics port is not a number: {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--metrics port out of range: {text!r}")
    return host.strip("[]") or "0.0.0.0", number


class MetricsServer:
    """The HTTP endpoint serving one relay's metrics; close() stops it."""

    def __init__(self, address: str, engine, store=None) -> None:
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
            from prometheus_client.process_collector import ProcessCollector
        except ImportError:
            raise ValueError("--metrics needs prometheus-client: pip install 'murano-zmq[metrics]'") from None
        host, port = parse_address(address)
        self.commits = CommitStats()
        if store is None:
            store = (engine() if callable(engine) else engine).store
        self.commits.instrument(store)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(engine, self.commits))
        ProcessCollector(registry=self.registry)
        try:
            self._server, self._thread = metrics_http.serve(host, port, make_wsgi_app(self.registry))
        except OSError as exc:
            raise StartupError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from None
        self.address = f"{host}:{self._server.server_address[1]}"
        log.info("metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

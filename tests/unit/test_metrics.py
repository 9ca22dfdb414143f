"""relay/metrics.py on the fake link: what the collector reads from a live
engine, the integer histograms, and --metrics address parsing.  (A real
relay is scraped over HTTP in tests/integration/test_ops.py.)"""

from __future__ import annotations

import pytest

from murano_zmq.relay.metrics import CommitStats, IntHistogram, RelayCollector, parse_address

from test_engine import FakeNet  # noqa: E402  (tests/unit is on sys.path, as pytest puts it)

pytest.importorskip("prometheus_client")


@pytest.fixture
def net(tmp_path):
    n = FakeNet(tmp_path)
    yield n
    n.store.close()


moved = (("dead_letter_strategy", "at_least_once"), ("queue_type", "murano_zmq_mailbox"))
dropped = (("dead_letter_strategy", "disabled"), ("queue_type", "murano_zmq_mailbox"))


def samples(engine, commits=None) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in RelayCollector(engine, commits).collect() for s in family.samples}


def expire_drop_and_reject(net, **dead_letter) -> dict:
    """One message each expired, dropped at max_length and rejected, with
    `dead_letter` (dead_letter="dlx") or none; the samples after."""
    app = net.node("app")
    if dead_letter:
        app.declare(dead_letter["dead_letter"])
    app.declare("short", message_ttl=1.0, **dead_letter)
    app.declare("tiny", max_length=1, overflow="drop-head", **dead_letter)
    app.declare("picky", **dead_letter)
    app.send("short", "expires")
    app.send("tiny", "dropped", "kept")
    app.send("picky", "rejected")
    app.consume("picky")
    net.settle()
    (msg,) = [m for m in app.messages if m.mailbox == "picky"]
    msg.nack(requeue=False)
    net.settle()
    net.run(seconds=2.0, step=0.5)  # the TTL passes
    return samples(net.engine)


def test_dead_letters_are_counted_by_reason(net):
    m = expire_drop_and_reject(net, dead_letter="dlx")
    for reason in ("expired", "maxlen", "rejected"):
        assert m[(f"rabbitmq_global_messages_dead_lettered_{reason}_total", moved)] == 1
        assert m[(f"rabbitmq_global_messages_dead_lettered_{reason}_total", dropped)] == 0
    assert m[("murano_zmq_messages_dead_lettered_total", ())] == 3
    assert m[("murano_zmq_messages_expired_total", ())] == 1
    assert m[("rabbitmq_queue_messages_ready", (("queue", "dlx"), ("vhost", "/")))] == 3
    assert m[("rabbitmq_global_messages_received_total", ())] == 4
    assert m[("rabbitmq_global_messages_confirmed_total", ())] == 4


def test_messages_dropped_with_no_dead_letter_mailbox_are_counted_as_rabbitmq_does(net):
    """RabbitMQ counts them too, with dead_letter_strategy="disabled"."""
    m = expire_drop_and_reject(net)
    for reason in ("expired", "maxlen", "rejected"):
        assert m[(f"rabbitmq_global_messages_dead_lettered_{reason}_total", dropped)] == 1
        assert m[(f"rabbitmq_global_messages_dead_lettered_{reason}_total", moved)] == 0
    assert m[("murano_zmq_messages_dead_lettered_total", ())] == 0
    assert m[("murano_zmq_messages_expired_total", ())] == 1


def test_the_overview_dashboard_finds_its_names(net):
    """RabbitMQ's Grafana dashboard joins every panel on rabbitmq_identity_info
    and reads the channel counters, aggregated."""
    app = net.node("app")
    app.send("work", "a", "b")
    app.consume("work")
    net.settle()
    for msg in list(app.messages):
        msg.ack()
    net.settle()
    m = samples(net.engine)
    assert m[("rabbitmq_identity_info", (("rabbitmq_cluster", net.engine.name), ("rabbitmq_endpoint", "metrics"),
                                         ("rabbitmq_node", net.engine.name)))] == 1
    assert any(name == "rabbitmq_build_info" and value == 1 for (name, _), value in m.items())
    assert m[("rabbitmq_channel_messages_published_total", ())] == 2
    assert m[("rabbitmq_channel_messages_confirmed_total", ())] == 2
    assert m[("rabbitmq_channel_messages_delivered_ack_total", ())] == 2
    assert m[("rabbitmq_channel_messages_acked_total", ())] == 2
    assert m[("rabbitmq_channel_consumers", ())] == 1 and m[("rabbitmq_channels", ())] >= 1


def test_refused_sends_are_not_confirmed(net):
    app = net.node("app")
    app.declare("full", max_length=1)
    app.send("full", "in", "refused")
    net.settle()
    m = samples(net.engine)
    assert m[("rabbitmq_global_messages_received_total", ())] == 2
    assert m[("rabbitmq_global_messages_confirmed_total", ())] == 1
    assert m[("murano_zmq_messages_refused_full_total", ())] == 1


def test_commit_stats_time_every_commit_and_count_its_rows(net):
    stats = CommitStats()
    stats.instrument(net.store)
    app = net.node("app")
    app.send("work", *range(7))
    net.settle()
    assert stats.latency.count >= 1 and stats.rows.total >= 7
    m = samples(net.engine, stats)
    assert m[("murano_zmq_commit_batch_rows_count", ())] == stats.rows.count
    assert m[("murano_zmq_commit_seconds_bucket", (("le", "+Inf"),))] == stats.latency.count


def test_int_histogram_is_cumulative_with_an_inf_bucket():
    h = IntHistogram((1, 5, 10))
    for v in (0, 1, 2, 5, 11, 100):
        h.observe(v)
    assert h.cumulative() == [("1.0", 2), ("5.0", 4), ("10.0", 4), ("+Inf", 6)]
    assert (h.count, h.total) == (6, 119)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9570", ("127.0.0.1", 9570)),
    (":9570", ("0.0.0.0", 9570)),
    ("[::1]:9570", ("::1", 9570)),
])
def test_metrics_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9570", "host:port", "host:70000", ""])
def test_bad_metrics_addresses_are_clear_errors(text):
    with pytest.raises(ValueError, match="--metrics"):
        parse_address(text)


def test_the_collector_reads_the_engine_in_service(net, tmp_path):
    """The relay replaces its engine when it reloads after a store failure:
    a collector given a callable follows it."""
    net.node("app").send("before", 1)
    net.settle()
    current = [net.engine]
    collector_samples = lambda: {s.name: s.value for f in RelayCollector(lambda: current[0]).collect()  # noqa: E731
                                 for s in f.samples if not s.labels}
    assert collector_samples()["rabbitmq_global_messages_received_total"] == 1
    net.restart()  # a new engine over the same store: its counters start again
    current[0] = net.engine
    assert collector_samples()["rabbitmq_global_messages_received_total"] == 0
    assert collector_samples()["rabbitmq_queues"] == 1

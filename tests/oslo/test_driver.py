"""The zmqrelay oslo.messaging driver against real relay processes, through
oslo.messaging's public API (RPC clients and servers, notifiers and
notification listeners, threading executor)."""

from __future__ import annotations

import queue
import time
from urllib.parse import urlsplit

import pytest

from ..helpers import send_raw_body, wait_for
from .conftest import CustomError, NotificationRecorder, Recorder, drain, zmqrelay_url

oslo_messaging = pytest.importorskip("oslo_messaging")

from murano_zmq import Node  # noqa: E402
from murano_zmq.oslo.driver import ZmqRelayDriver  # noqa: E402
from murano_zmq.oslo.names import MailboxNames  # noqa: E402


def rpc_server(transport, topic, name, endpoint=None, exchange=None, sink=None):
    endpoint = endpoint or Recorder(name, sink)
    target = oslo_messaging.Target(topic=topic, server=name, exchange=exchange)
    server = oslo_messaging.get_rpc_server(transport, target, [endpoint], executor="threading")
    return server, endpoint


def client(transport, topic, timeout=10, **target):
    return oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic=topic, **target), timeout=timeout)


def mailbox(relay, name: str) -> dict | None:
    with Node("inspector", relay=relay.endpoint, timeout=10) as node:
        return next((mb for mb in node.status()["mailboxes"] if mb["name"] == name), None)


# --- the driver is what oslo.messaging loads ------------------------------------------------


def test_entry_point_loads_the_driver(transports, url):
    transport = transports(url)
    assert isinstance(transport._driver, ZmqRelayDriver)


def test_bad_url_option_is_refused(relay):
    from oslo_config import cfg

    with pytest.raises(oslo_messaging.InvalidTransportURL, match="prefetchh"):
        oslo_messaging.get_rpc_transport(cfg.CONF, url=zmqrelay_url(relay, query="prefetchh=3"))


@pytest.mark.parametrize("query, says", [
    ("heartbeat=nan", "finite"), ("relay_timeout=inf", "relay_timeout"), ("transient_ttl=nan", "finite"),
    ("heartbeat=0.01", "heartbeat"), ("prefetch=20000", "prefetch"), ("direct=true&direct_bind=bogus", "direct_bind"),
])
def test_url_option_values_a_node_could_not_use_are_refused(relay, query, says):
    """Each was taken, then every cast failed after relay_timeout (nan: for ever)."""
    from oslo_config import cfg

    with pytest.raises(oslo_messaging.InvalidTransportURL, match=says):
        oslo_messaging.get_rpc_transport(cfg.CONF, url=zmqrelay_url(relay, query=query))


# --- RPC -----------------------------------------------------------------------------------------


def test_call_returns_the_result_and_cast_is_delivered(transports, servers, url, topic):
    transport = transports(url)
    servers(rpc_server(transport, topic, "s1")[0])
    server, endpoint = rpc_server(transport, topic, "s2")
    servers(server)
    c = client(transport, topic, server="s2")
    result = c.call({"user": "alice"}, "echo", value=[1, "two", {"3": None}])
    assert result == {"server": "s2", "value": [1, "two", {"3": None}], "ctxt": {"user": "alice"}}
    c.cast({}, "record", value="cast-1")
    assert endpoint.taken(2) == [("echo", [1, "two", {"3": None}]), ("record", "cast-1")]


def test_calls_to_a_server_reach_only_that_server(transports, servers, url, topic):
    transport = transports(url)
    recorders = {}
    for name in ("a", "b", "c"):
        server, recorders[name] = rpc_server(transport, topic, name)
        servers(server)
    c = client(transport, topic, server="b")
    assert [c.call({}, "echo", value=i)["server"] for i in range(5)] == ["b"] * 5
    assert recorders["a"].calls.empty() and recorders["c"].calls.empty()


def test_servers_of_a_topic_share_its_calls_and_casts(transports, servers, url, topic):
    transport = transports(url)
    sink: queue.Queue = queue.Queue()
    for name in ("a", "b", "c"):
        servers(rpc_server(transport, topic, name, sink=sink)[0])
    c = client(transport, topic)
    answered = [c.call({}, "echo", value=i)["server"] for i in range(9)]
    assert set(answered) == {"a", "b", "c"}  # round robin among consumers
    assert len([sink.get(timeout=10) for _ in range(9)]) == 9
    for i in range(9):
        c.cast({}, "record", value=i)
    casts = [sink.get(timeout=10) for _ in range(9)]
    assert sorted(value for _, _, value in casts) == list(range(9))  # each cast once
    assert {name for name, _, _ in casts} == {"a", "b", "c"}
    assert drain(sink) == []


def assert_each_got_both_once(recorders) -> None:
    """Each recorder got the casts "hello" and "again" once each, in either
    order: oslo's threading executor runs each message in a pool thread of
    its own (as it does with rabbit)."""
    for r in recorders:
        assert sorted(r.taken(2)) == [("record", "again"), ("record", "hello")]
    assert all(drain(r.calls) == [] for r in recorders)


def test_fanout_reaches_every_server_of_the_topic_once(transports, servers, url, topic):
    transport = transports(url)
    recorders = []
    for name in ("a", "b", "c"):
        server, recorder = rpc_server(transport, topic, name)
        servers(server)
        recorders.append(recorder)
    other, other_recorder = rpc_server(transport, topic + ".x", "a")  # a prefix-sharing topic
    servers(other)
    fan = client(transport, topic, fanout=True)
    fan.cast({}, "record", value="hello")
    fan.cast({}, "record", value="again")
    assert_each_got_both_once(recorders)
    assert other_recorder.calls.empty()


def test_fanout_reaches_every_worker_that_shares_a_server_name(transports, servers, url, topic):
    """The workers of one service all listen as server=CONF.host: they
    shared one fanout mailbox and each got half the fanouts.  As with
    rabbit (a fanout queue per listener), each gets every one."""
    recorders = []
    for _ in range(2):  # two worker processes: a transport each
        server, recorder = rpc_server(transports(url), topic, "host-1")
        servers(server)
        recorders.append(recorder)
    fan = client(transports(url), topic, fanout=True)
    fan.cast({}, "record", value="hello")
    fan.cast({}, "record", value="again")
    assert_each_got_both_once(recorders)


def test_fanout_with_no_server_is_dropped_not_stored(transports, url, topic, relay):
    transport = transports(url)
    client(transport, topic, fanout=True).cast({}, "record", value=1)
    names = MailboxNames()
    with Node("inspector", relay=relay.endpoint, timeout=10) as node:
        prefix = names.fanout_prefix("openstack", topic)
        assert not [mb for mb in node.status()["mailboxes"] if mb["name"].startswith(prefix)]


def test_exchanges_keep_topics_apart(transports, servers, url, topic):
    transport = transports(url)
    server_a, rec_a = rpc_server(transport, topic, "s", exchange="ex-a")
    server_b, rec_b = rpc_server(transport, topic, "s", exchange="ex-b")
    servers(server_a)
    servers(server_b)
    assert client(transport, topic, exchange="ex-b").call({}, "echo", value=1)["value"] == 1
    assert rec_b.taken(1) == [("echo", 1)] and rec_a.calls.empty()


def test_call_without_a_server_times_out_and_its_request_expires(transports, url, topic, relay):
    transport = transports(url)
    c = client(transport, topic, timeout=1)
    started = time.monotonic()
    with pytest.raises(oslo_messaging.MessagingTimeout):
        c.call({}, "echo", value=1)
    assert 0.9 <= time.monotonic() - started < 5
    name = MailboxNames().topic("openstack", topic)
    # the request expired with the call: no server that comes later runs it
    wait_for(lambda: (mailbox(relay, name) or {}).get("depth", 0) == 0, 10, 0.1, "the request to expire")


def test_a_call_with_timeout_0_times_out_before_anything_is_sent(transports, url, topic, relay):
    """(It was sent with no TTL: a server that came later ran it.)"""
    with pytest.raises(oslo_messaging.MessagingTimeout, match="nothing was sent"):
        client(transports(url), topic, timeout=0).call({}, "echo", value=1)
    assert mailbox(relay, MailboxNames().topic("openstack", topic)) is None


def test_a_call_keeps_its_timeout_while_no_relay_answers(transports, topic):
    """Opening the reply mailbox waited relay_timeout (30 s by default),
    on every call, whatever the call's own timeout."""
    from murano_zmq.testing import free_tcp_endpoint

    nowhere = urlsplit(free_tcp_endpoint()).netloc
    transport = transports(f"zmqrelay://{nowhere}/?relay_timeout=20")
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(oslo_messaging.MessagingTimeout):
            client(transport, topic, timeout=1).call({}, "echo", value=1)
        assert time.monotonic() - started < 5


def test_a_call_with_a_huge_timeout_returns_its_result(transports, servers, url, topic):
    """(A wait past threading.TIMEOUT_MAX raised OverflowError.)"""
    transport = transports(url)
    server, _ = rpc_server(transport, topic, "s")
    servers(server)
    assert client(transport, topic, timeout=1e10).call({}, "echo", value="far")["value"] == "far"


def test_a_reply_after_the_timeout_is_dropped_and_later_calls_work(transports, servers, url, topic):
    transport = transports(url)
    server, _ = rpc_server(transport, topic, "s")
    servers(server)
    slow = client(transport, topic, timeout=1, server="s")
    with pytest.raises(oslo_messaging.MessagingTimeout):
        slow.call({}, "slow", seconds=2)
    assert client(transport, topic, timeout=10, server="s").call({}, "echo", value="next")["value"] == "next"


def test_messages_the_driver_cannot_read_are_dropped_and_its_threads_go_on(transports, servers, url, topic,
                                                                           relay, caplog):
    """A body nested past Python's stack ("[[[[...": a RecursionError) or
    not msgpack (a raw client's) ended the listener's pump, and the reply
    mailbox's router: every later call timed out, and the message, never
    acked, came first again after a restart."""
    transport = transports(url)
    server, _ = rpc_server(transport, topic, "s")
    servers(server)
    c = client(transport, topic, timeout=10)
    assert c.call({}, "echo", value=1)["value"] == 1
    request_mailbox = MailboxNames().topic("openstack", topic)
    with Node("hostile", relay=relay.endpoint, discovery=False, direct=False, timeout=10) as hostile:
        reply_mailboxes = [mb["name"] for mb in hostile.status()["mailboxes"] if mb["name"].startswith("oslo.reply:")]
        assert reply_mailboxes
        for name in [request_mailbox, *reply_mailboxes]:
            hostile.send(name, "[" * 100_000)
            send_raw_body(relay.endpoint, name, b"\xc1 not msgpack")
    wait_for(lambda: (mailbox(relay, request_mailbox) or {}).get("depth", 1) == 0, 20, 0.1,
             "the unreadable requests dropped")
    assert c.call({}, "echo", value=2)["value"] == 2
    assert "RecursionError" in caplog.text and "not msgpack" in caplog.text


def test_remote_exceptions_come_back(transports, servers, url, topic):
    transport = transports(url)
    server, _ = rpc_server(transport, topic, "s")
    servers(server)
    c = client(transport, topic)
    with pytest.raises(ValueError, match="no good"):  # builtins are allowed
        c.call({}, "fail", text="no good")
    with pytest.raises(oslo_messaging.RemoteError) as info:  # not an allowed module
        c.call({}, "fail_custom", text="custom")
    assert info.value.exc_type == CustomError.__name__
    with pytest.raises(oslo_messaging.RemoteError, match="NoSuchMethod"):
        c.call({}, "no_such_method")


def test_allowed_remote_exmods_rebuild_the_exception(transports, servers, url, topic):
    transport = transports(url, allowed_remote_exmods=[CustomError.__module__])
    servers(rpc_server(transport, topic, "s")[0])
    with pytest.raises(CustomError, match="custom"):
        client(transport, topic).call({}, "fail_custom", text="custom")


def test_call_monitor_heartbeats_keep_a_long_call_alive(transports, servers, url, topic):
    transport = transports(url)
    server, _ = rpc_server(transport, topic, "s")
    servers(server)
    c = oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic=topic, server="s"),
                                      timeout=60, call_monitor_timeout=2)
    assert c.call({}, "slow", seconds=3) == 3  # longer than the monitor timeout


def test_at_least_once_refuses_a_call_nobody_consumes(transports, url, topic):
    transport = transports(url)
    options = oslo_messaging.TransportOptions(at_least_once=True)
    c = oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic=topic, server="nobody"),
                                      timeout=30, transport_options=options)
    started = time.monotonic()
    with pytest.raises(oslo_messaging.MessageUndeliverable):
        c.call({}, "echo", value=1)
    assert time.monotonic() - started < 5  # at once, not after the timeout


def test_several_relays_share_the_mailboxes(relay_factory, tmp_path, transports, servers):
    relays = [relay_factory(data_dir=str(tmp_path / f"data-{i}")) for i in range(2)]
    transport = transports(zmqrelay_url(*relays))
    topics = [f"topic-{i}" for i in range(8)]
    recorders = []
    for topic in topics:
        server, recorder = rpc_server(transport, topic, "s")
        servers(server)
        recorders.append(recorder)
    for topic in topics:
        assert client(transport, topic).call({}, "echo", value=topic)["value"] == topic
        client(transport, topic, fanout=True).cast({}, "record", value="fan")
    for recorder in recorders:
        assert recorder.taken(2)[1] == ("record", "fan")
    counts = []
    for r in relays:
        with Node("inspector", relay=r.endpoint, timeout=10) as node:
            counts.append(sum(mb["name"].startswith("oslo.rpc:") for mb in node.status()["mailboxes"]))
    assert all(counts) and sum(counts) == 2 * len(topics)  # topic and server mailboxes, on both relays


# --- notifications ----------------------------------------------------------------------------------------


def listener(transport, topics, endpoint, pool=None, allow_requeue=False):
    targets = [oslo_messaging.Target(topic=t) for t in topics]
    return oslo_messaging.get_notification_listener(transport, targets, [endpoint], executor="threading",
                                                    pool=pool, allow_requeue=allow_requeue)


def notifier(transport, topic, publisher="tests"):
    return oslo_messaging.Notifier(transport, publisher, driver="messaging", topics=[topic])


def test_notifications_reach_a_listener_by_priority(transports, servers, url, topic):
    transport = transports(url, "notification")
    endpoint = NotificationRecorder()
    servers(listener(transport, [topic], endpoint))
    n = notifier(transport, topic)
    n.info({}, "compute.start", {"id": 1})
    n.error({}, "compute.fail", {"id": 2})
    n.warn({}, "compute.warn", {"id": 3})  # the endpoint has no warn(): not for it
    got = sorted([endpoint.events.get(timeout=10) for _ in range(2)])
    assert got == [("error", "compute.fail", {"id": 2}), ("info", "compute.start", {"id": 1})]
    assert drain(endpoint.events) == []


def test_notifications_are_stored_until_a_listener_comes(transports, servers, url, topic):
    transport = transports(url, "notification")
    notifier(transport, topic).info({}, "early", {"n": 1})
    endpoint = NotificationRecorder()
    servers(listener(transport, [topic], endpoint))
    assert endpoint.events.get(timeout=10) == ("info", "early", {"n": 1})


def test_each_pool_gets_every_notification_and_its_listeners_share_them(transports, servers, url, topic):
    transport = transports(url, "notification")
    groups = {None: ["shared-1", "shared-2"], "audit": ["audit-1", "audit-2"], "billing": ["billing-1"]}
    sinks = {pool: queue.Queue() for pool in groups}
    for pool, names in groups.items():
        for name in names:
            servers(listener(transport, [topic], NotificationRecorder(name, sink=sinks[pool]), pool=pool))
    n = notifier(transport, topic)
    sent = [f"event-{i}" for i in range(12)]
    for event_type in sent:
        n.info({}, event_type, {})
    for pool, names in groups.items():
        got = [sinks[pool].get(timeout=10) for _ in sent]
        assert sorted(event for _, event in got) == sorted(sent)  # every one, once per group
        assert {name for name, _ in got} == set(names)  # listeners of a group share them
        assert drain(sinks[pool], idle=0.2) == []


def test_a_requeued_notification_comes_again(transports, servers, url, topic):
    transport = transports(url, "notification")
    endpoint = NotificationRecorder(requeue_first=True)
    servers(listener(transport, [topic], endpoint, allow_requeue=True))
    notifier(transport, topic).info({}, "retry.me", {"k": "v"})
    assert endpoint.events.get(timeout=10) == ("requeued", "retry.me", {"k": "v"})
    assert endpoint.events.get(timeout=10) == ("info", "retry.me", {"k": "v"})
    assert drain(endpoint.events) == []


def test_a_batch_larger_than_a_relay_window_still_listens(transports, servers, url, topic):
    """batch_size past the relay's largest prefetch (10,000) failed start()
    with a bare ValueError: the window is the largest, the batch fills in
    its batch_timeout."""
    transport = transports(url, "notification")
    got = queue.Queue()

    class Endpoint:
        def info(self, messages):
            got.put([m["event_type"] for m in messages])

    servers(oslo_messaging.get_batch_notification_listener(
        transport, [oslo_messaging.Target(topic=topic)], [Endpoint()], executor="threading",
        batch_size=20_000, batch_timeout=0.5))
    notifier(transport, topic).info({}, "e0", {})
    assert got.get(timeout=10) == ["e0"]


def test_a_name_the_relay_would_refuse_is_an_invalid_url(relay):
    from oslo_config import cfg

    with pytest.raises(oslo_messaging.InvalidTransportURL, match="name"):
        oslo_messaging.get_rpc_transport(cfg.CONF, url=zmqrelay_url(relay, query="name=" + "n" * 300))


def test_batch_listener_gets_full_batches(transports, servers, url, topic):
    transport = transports(url, "notification")

    class Batches:
        def __init__(self):
            import queue

            self.batches = queue.Queue()

        def info(self, messages):
            self.batches.put([m["event_type"] for m in messages])

    endpoint = Batches()
    targets = [oslo_messaging.Target(topic=topic)]
    servers(oslo_messaging.get_batch_notification_listener(transport, targets, [endpoint], executor="threading",
                                                           batch_size=10, batch_timeout=1))
    n = notifier(transport, topic)
    for i in range(25):
        n.info({}, f"e{i}", {})
    got = []
    while sum(map(len, got)) < 25:
        got.append(endpoint.batches.get(timeout=10))
    assert sum(got, []) == [f"e{i}" for i in range(25)]
    assert max(map(len, got)) <= 10


def test_stopping_a_listener_gives_back_what_it_did_not_handle(transports, servers, url, topic, relay):
    transport = transports(url, "notification")
    n = notifier(transport, topic)
    for i in range(30):
        n.info({}, f"e{i}", {})
    first = NotificationRecorder("first")
    server = listener(transport, [topic], first)
    server.start()
    first.events.get(timeout=10)
    server.stop()
    server.wait()
    handled_first = 1 + len(drain(first.events, idle=0.1))
    second = NotificationRecorder("second")
    servers(listener(transport, [topic], second))
    rest = [second.events.get(timeout=10)[1] for _ in range(30 - handled_first)]
    assert len(set(rest)) == len(rest) == 30 - handled_first  # each once, none lost
    assert drain(second.events) == []


# --- cleanup -------------------------------------------------------------------------------------------------


def test_cleanup_closes_the_nodes_and_the_reply_mailbox_expires(relay, servers, topic):
    from oslo_config import cfg

    url = zmqrelay_url(relay, query="transient_ttl=1")
    transport = oslo_messaging.get_rpc_transport(cfg.CONF, url=url)
    server, _ = rpc_server(transport, topic, "s")
    server.start()
    try:
        assert client(transport, topic).call({}, "echo", value=1)["value"] == 1
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
    assert transport._driver.relays._nodes == {}
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match="cleaned up"):  # (a bare RuntimeError)
        client(transport, topic).cast({}, "echo", value=2)

    def transient_mailboxes(node):
        return [mb["name"] for mb in node.status()["mailboxes"]
                if mb["name"].startswith(("oslo.reply:", "oslo.fanout:"))]

    with Node("inspector", relay=relay.endpoint, timeout=10) as node:
        assert transient_mailboxes(node)  # the caller's reply mailbox, the server's fanout one
        wait_for(lambda: not transient_mailboxes(node), 15, 0.2, "transient mailboxes to expire")


# --- direct delivery (off by default) ---------------------------------------------------------------------


def test_direct_delivery_carries_calls_casts_fanouts_and_notifications(relay, transports, servers, topic):
    url = zmqrelay_url(relay, query="direct=true")
    transport = transports(url)
    assert transport._driver.options.direct
    sink: queue.Queue = queue.Queue()
    for name in ("a", "b"):  # each server on a transport (a node, a direct endpoint) of its own
        servers(rpc_server(transports(url), topic, name, sink=sink)[0])
    c = client(transport, topic)
    # Both servers compete for the topic: calls reach each of them once the
    # caller's path table knows both (from a LOOKUP made after both consumed).
    answered: list = []
    wait_for(lambda: answered.append(c.call({}, "echo", value=len(answered))["server"]) or set(answered) == {"a", "b"},
             20, 0.05, "calls answered by both servers")
    with pytest.raises(ValueError):
        c.call({}, "fail", text="direct failure")
    c.cast({}, "record", value="cast")
    client(transport, topic, fanout=True).cast({}, "record", value="fan")
    got = [sink.get(timeout=10) for _ in range(len(answered) + 3)]  # the echoes, a cast, 2 fanout copies
    assert sorted(v for _, kind, v in got if kind == "record") == ["cast", "fan", "fan"]
    assert drain(sink) == []
    notifications = transports(url, "notification")
    endpoint = NotificationRecorder(requeue_first=True)
    servers(listener(notifications, [topic], endpoint, allow_requeue=True))
    notifier(notifications, topic).info({}, "direct.event", {})
    assert endpoint.events.get(timeout=10)[0] == "requeued"
    assert endpoint.events.get(timeout=10) == ("info", "direct.event", {})


# --- the relay restarts ------------------------------------------------------------------------------------


def test_calls_and_stored_casts_survive_a_relay_restart(relay_factory, tmp_path, transports, servers, topic):
    data = str(tmp_path / "restart-data")
    relay = relay_factory(data_dir=data)
    transport = transports(zmqrelay_url(relay))
    server, recorder = rpc_server(transport, topic, "s")
    servers(server)
    c = client(transport, topic, timeout=20, server="s")
    assert c.call({}, "echo", value="before")["value"] == "before"
    other = transports(zmqrelay_url(relay))
    client(other, topic + "-later").cast({}, "record", value="kept")  # nobody consumes it yet
    assert relay.stop() == 0
    relay_factory(endpoint=relay.endpoint, data_dir=data)
    assert c.call({}, "echo", value="after")["value"] == "after"  # nodes reconnect on their own
    later, later_recorder = rpc_server(transport, topic + "-later", "s")
    servers(later)
    assert later_recorder.taken(1) == [("record", "kept")]  # stored durably across the restart

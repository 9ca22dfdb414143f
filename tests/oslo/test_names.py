"""Mailbox names and URL options of the oslo driver (no relay needed)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("oslo_messaging")

from oslo_config import cfg  # noqa: E402

from murano_zmq.oslo.names import MailboxNames, escape  # noqa: E402
from murano_zmq.oslo.options import DriverOptions, relay_endpoints  # noqa: E402

VALID = re.compile(r"^[A-Za-z0-9_.:@-]{1,255}$")


@pytest.mark.parametrize("part", ["compute", "my_topic.v2", "host-1.example.com", "a:b", "a@b", "ü ñ/x", ""])
def test_escaped_parts_are_valid_and_never_hold_the_separator(part):
    escaped = escape(part)
    assert VALID.match(escaped) and ":" not in escaped


def test_escape_is_one_to_one():
    parts = ["a:b", "a@3ab", "a@b", "a b", "a_b", "a.b", ""]
    assert len({escape(p) for p in parts}) == len(parts)


def test_names_follow_the_documented_shapes():
    names = MailboxNames()
    assert names.topic("openstack", "compute") == "oslo.rpc:openstack:compute"
    assert names.server("openstack", "compute", "host-1") == "oslo.rpc:openstack:compute:host-1"
    assert names.fanout("openstack", "compute", "host-1", "9f3c") == "oslo.fanout:openstack:compute:host-1:9f3c"
    assert names.notifications("nova", "notifications.info") == "oslo.notify:nova:notifications.info"
    assert names.pool("nova", "notifications.info", "ceilometer") == "oslo.notify:nova:notifications.info:ceilometer"
    assert MailboxNames("prod/eu").topic("x", "t") == "oslo.prod@2feu.rpc:x:t"


def test_a_fanout_prefix_matches_only_its_own_topic():
    names = MailboxNames()
    prefix = names.fanout_prefix("openstack", "compute")
    assert names.fanout("openstack", "compute", "anything.at:all", "l").startswith(prefix)
    assert not names.fanout("openstack", "compute.x", "s", "l").startswith(prefix)
    assert not names.fanout("openstack", "compute:x", "s", "l").startswith(prefix)
    pool_prefix = names.pool_prefix("nova", "n.info")
    assert names.pool("nova", "n.info", "p").startswith(pool_prefix)
    assert not names.notifications("nova", "n.info").startswith(pool_prefix)


@pytest.mark.parametrize("topic", ["a" * 232, "ж" * 40, "t" * 300, "a" * 200, "a" * 220])
def test_a_long_topics_fanout_and_pool_mailboxes_start_with_its_prefix(topic):
    """A topic escaped to 240 characters had a prefix longer than what the
    cut of a long name keeps: the listing by prefix found no fanout or pool
    mailbox, and fanouts and pool copies reached nobody, without an error."""
    names = MailboxNames()
    for server in ("s", "host-1.example.com" * 3):
        fanout = names.fanout("openstack", topic, server, "5e1f0c2a9b7d")
        pool = names.pool("openstack", topic, server)
        assert VALID.match(fanout) and VALID.match(pool)
        assert fanout.startswith(names.fanout_prefix("openstack", topic))
        assert pool.startswith(names.pool_prefix("openstack", topic))
    assert names.fanout("openstack", topic, "a", "l") != names.fanout("openstack", topic, "b", "l")
    assert names.fanout("openstack", topic, "a", "l1") != names.fanout("openstack", topic, "a", "l2")
    assert names.fanout_prefix("openstack", topic) != names.fanout_prefix("openstack", topic + "x")


def _joined(*parts: str) -> str:
    from murano_zmq.oslo.names import escape

    return ":".join(escape(p) if i else p for i, p in enumerate(parts))


@pytest.mark.parametrize("prefix_length", range(230, 255))
def test_names_that_fit_are_never_cut(prefix_length):
    """A topic whose prefix is 239-254 characters, with a short server or
    pool name, had names that fit and worked: they stay as they were (a
    pool mailbox never expires; an older sender lists by the old names)."""
    names = MailboxNames()
    topic = "t" * (prefix_length - len("oslo.notify:openstack::"))
    prefix = names.pool_prefix("openstack", topic)
    assert len(prefix) == prefix_length or prefix_length > 246
    for pool in ("p", "p" * (255 - prefix_length)):
        if len(prefix) == prefix_length and prefix_length + len(pool) <= 255:
            assert names.pool("openstack", topic, pool) == _joined("oslo.notify", "openstack", topic, pool)


def test_long_names_are_cut_to_a_valid_unique_name():
    names = MailboxNames()
    a, b = names.server("openstack", "t" * 300, "a"), names.server("openstack", "t" * 300, "b")
    assert VALID.match(a) and VALID.match(b) and a != b


def test_url_query_overrides_the_configuration():
    conf = cfg.ConfigOpts()
    options = DriverOptions.load(conf, {})
    assert options == DriverOptions()
    conf.set_override("prefetch", 7, group="oslo_messaging_zmqrelay")
    options = DriverOptions.load(conf, {"transient_ttl": "60", "direct": "true", "notification_ttl": "30"})
    assert (options.prefetch, options.transient_ttl, options.direct, options.notification_ttl) == (7, 60.0, True, 30.0)
    with pytest.raises(ValueError, match="unknown"):
        DriverOptions.load(conf, {"prefetchh": "1"})
    with pytest.raises(ValueError, match="prefetch"):
        DriverOptions.load(conf, {"prefetch": "0"})


def test_relay_endpoints_are_sorted_and_default_to_the_node_default():
    class Host:
        def __init__(self, hostname, port):
            self.hostname, self.port = hostname, port

    hosts = [Host("relay-b", 5571), Host("relay-a", None), Host("::1", 5572)]
    assert relay_endpoints(hosts) == ["tcp://[::1]:5572", "tcp://relay-a:5570", "tcp://relay-b:5571"]
    assert relay_endpoints([]) == [None]


def test_a_node_name_prefix_too_long_is_refused_when_the_transport_is_made():
    from murano_zmq.oslo.relays import Relays

    Relays(["tcp://127.0.0.1:5570"], "oslo").close()
    with pytest.raises(ValueError, match="oslo node name is .* bytes long, at most 200"):
        Relays(["tcp://127.0.0.1:5570"], "n" * 200)

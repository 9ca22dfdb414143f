"""Each method of the drop-in API, both flavours (a relay process where it takes one)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import types
import uuid
from importlib import import_module

import pytest
import zmq

from murano_zmq import Node, PreconditionFailed
from murano_zmq.compat import murano as engine
from murano_zmq.compat import muranoagent as agent
from murano_zmq.compat.common import mailbox_name
from murano_zmq.security import create_key_pair

from ..helpers import send_raw_body

FLAVOURS = {"engine": engine, "agent": agent}


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request):
    return FLAVOURS[request.param]


def make_client(flavour, relay, **kw):
    host, port = relay.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    args = dict(login="murano", password="guest", host=host, port=int(port), virtual_host="/")
    args.update(kw)
    return flavour.MqClient(**args)


def fresh_queue() -> str:
    return f"e{uuid.uuid4().hex[:12]}-h{uuid.uuid4().hex[:12]}"


@pytest.fixture
def node(shared_relay):
    with Node("inspector", shared_relay.endpoint, direct=False, discovery=False, timeout=10) as n:
        yield n


def status(node, name: str) -> dict | None:
    return next((m for m in node.status()["mailboxes"] if m["name"] == name), None)


def message(flavour, body, msg_id):
    m = flavour.Message()
    m.body, m.id = body, msg_id
    return m


# --- MqClient(...) ---------------------------------------------------------------------------


def test_host_and_port_name_the_relay(flavour):
    assert flavour.MqClient("u", "p", "relay.example.org", 5570, "/").relay == "tcp://relay.example.org:5570"
    assert flavour.MqClient("u", "p", "::1", "5570", "/").relay == "tcp://[::1]:5570"


def test_a_login_that_cannot_name_a_node_is_refused_by_the_client(flavour):
    with pytest.raises(ValueError, match="must be printable"):
        flavour.MqClient("mur\nano", "p", "h", 1, "/")
    with pytest.raises(ValueError, match="at most 200"):
        flavour.MqClient("u" * 200, "p", "h", 1, "/")


def test_virtual_host_is_a_namespace_of_mailbox_names(flavour):
    assert flavour.MqClient("u", "p", "h", 1, "/").mailbox("e1-h2") == "murano:e1-h2"
    assert flavour.MqClient("u", "p", "h", 1, "").mailbox("e1-h2") == "murano:e1-h2"
    assert flavour.MqClient("u", "p", "h", 1, "prod").mailbox("e1-h2") == "murano.prod:e1-h2"
    assert mailbox_name("/", "a:b c") == "murano:a@3ab@20c"  # ':' only separates
    with pytest.raises(ValueError, match="too long"):
        mailbox_name("/", "q" * 250)
    with pytest.raises(ValueError, match="non-empty"):
        mailbox_name("/", "")


def test_ssl_needs_the_relays_key_in_ca_certs(flavour):
    with pytest.raises(RuntimeError, match="ca_certs"):
        flavour.MqClient("u", "p", "h", 1, "/", ssl=True)
    with pytest.raises(RuntimeError, match="insecure=True cannot skip it"):
        flavour.MqClient("u", "p", "h", 1, "/", ssl=True, insecure=True)
    with pytest.raises(RuntimeError, match="ca_certs: no key file"):
        flavour.MqClient("u", "p", "h", 1, "/", ssl=True, ca_certs="/nonexistent/relay.key")


def test_ssl_key_pair_from_password_file_or_z85_else_a_fresh_one(flavour, tmp_path, caplog):
    public, secret_path = create_key_pair("agent-1", tmp_path / "keys")
    relay_public, _ = create_key_pair("relay", tmp_path / "keys")
    by_file = flavour.MqClient("u", str(secret_path), "h", 1, "/", ssl=True, ca_certs=str(relay_public),
                               ssl_version="tlsv1_2")  # ssl_version: no CURVE meaning, ignored
    own, relay_key = by_file._curve
    assert own.public == zmq.auth.load_certificate(str(public))[0]
    assert relay_key == zmq.auth.load_certificate(str(relay_public))[0]
    z85_public, z85_secret = zmq.curve_keypair()
    by_text = flavour.MqClient("u", z85_secret.decode(), "h", 1, "/", ssl=True, ca_certs=relay_key.decode())
    assert by_text._curve[0].public == z85_public and by_text._curve[1] == relay_key
    with caplog.at_level(logging.WARNING, logger="murano_zmq.compat"):
        fresh = flavour.MqClient("u", "guest", "h", 1, "/", ssl=True, ca_certs=str(relay_public))
    assert fresh._curve[0].secret and "fresh one" in caplog.text
    # In a VM, Murano writes the engine's ca_certs file to /etc/murano/certs/ca_certs: any name
    copied = tmp_path / "ca_certs"
    copied.write_bytes(relay_public.read_bytes())
    in_vm = flavour.MqClient("u", str(secret_path), "h", 1, "/", ssl=True, ca_certs=str(copied) + "\n",
                             ssl_version="", insecure=False)
    assert in_vm._curve[1] == relay_key
    assert flavour.MqClient("u", "p", "h", 1, "/")._curve is None  # ssl=False: plain TCP


# --- not connected ---------------------------------------------------------------------------


def test_every_call_before_connect_or_after_close_says_not_connected(flavour, shared_relay):
    client = make_client(flavour, shared_relay)
    calls = [lambda: client.declare("q"), lambda: client.send(message(flavour, 1, 1), "q"),
             lambda: client.open("q")]
    for call in calls:
        with pytest.raises(RuntimeError, match="^Not connected"):
            call()
    with client:
        subscription = client.open(fresh_queue())
        subscription.__enter__()
    for call in calls + [lambda: subscription.get_message(timeout=0)]:
        with pytest.raises(RuntimeError, match="^Not connected"):
            call()


def test_a_subscription_of_a_closed_client_says_so_after_a_reconnect(flavour, shared_relay):
    """After close() and connect() the subscription kept the old node's
    consumer: get_message() returned None whatever the queue held (and
    with timeout=None never returned)."""
    client = make_client(flavour, shared_relay)
    queue = fresh_queue()
    with client:
        subscription = client.open(queue)
        subscription.__enter__()
    client.connect()
    try:
        client.send(message(flavour, {"n": 1}, "m1"), queue)
        with pytest.raises(RuntimeError, match="closed with its client"):
            subscription.get_message(timeout=1)
        with subscription as again:  # opened again
            assert again.get_message(timeout=10) is not None
    finally:
        client.close()


@pytest.mark.parametrize("host", ["", None])
def test_no_host_is_this_host_as_with_kombu(flavour, shared_relay, host):
    """(tcp://:PORT was taken, and tcp://None:PORT: every call failed 30 s
    later with RelayUnavailable.  kombu connects to localhost.)"""
    client = make_client(flavour, shared_relay, host=host)
    assert client.relay.startswith("tcp://127.0.0.1:")


def test_a_subscription_entered_twice_is_refused_and_strands_nothing(flavour, shared_relay):
    """The second consumer took the next message while the first held the
    one before it, out of anyone's reach until the client closed."""
    with make_client(flavour, shared_relay) as client:
        queue = fresh_queue()
        client.declare(queue)
        for i in range(2):
            client.send(message(flavour, {"i": i}, f"m{i}"), queue)
        subscription = client.open(queue)
        with subscription:
            with pytest.raises(RuntimeError, match="open already"):
                subscription.__enter__()
            assert subscription.get_message(timeout=10).id == "m0"


# --- connect / close / context manager -------------------------------------------------------


def test_connect_close_and_the_context_manager(flavour, shared_relay):
    client = make_client(flavour, shared_relay)
    with client as entered:
        assert entered is client and client._connected
        node = client._node
        client.connect()  # again: the same node
        assert client._node is node
    assert not client._connected and client._node is None
    client.close()  # twice: nothing happens
    client.connect()
    client.declare(fresh_queue())
    client.close()


def test_exit_on_an_exception_closes_and_propagates(flavour, shared_relay):
    client = make_client(flavour, shared_relay)
    with pytest.raises(KeyError):
        with client:
            raise KeyError("boom")
    assert not client._connected and client._node is None


def test_a_message_taken_when_an_exception_leaves_the_with_goes_back_at_once(flavour, shared_relay):
    """The agent's loop: an error while it holds a plan unacked (its
    original left the consumer to the garbage collector)."""
    queue = fresh_queue()
    with make_client(flavour, shared_relay) as sender:
        sender.send(message(flavour, {"ID": "p"}, "p"), queue)
    with pytest.raises(OSError):
        with make_client(flavour, shared_relay) as client, client.open(queue) as subscription:
            assert subscription.get_message(timeout=10).id == "p"
            raise OSError("disk full")  # before msg.ack()
    with make_client(flavour, shared_relay) as client, client.open(queue) as subscription:
        again = subscription.get_message(timeout=3)  # well before a heartbeat timeout
        again.ack()
    assert again.id == "p" and again.redelivered


# --- declare ---------------------------------------------------------------------------------


def test_declare_ttl_in_milliseconds_and_redeclare(flavour, shared_relay, node):
    queue, plain = fresh_queue(), fresh_queue()
    with make_client(flavour, shared_relay) as client:
        client.declare(queue, enable_ha=True, ttl=86400000)
        client.declare(queue, enable_ha=True, ttl=86400000)  # as Murano does on every start
        client.declare(plain)  # ttl=0: never expires
        with pytest.raises(PreconditionFailed):
            client.declare(queue, ttl=1000)  # as RabbitMQ: inequivalent x-expires
        for bad in (None, "10", float("nan"), True):
            with pytest.raises(ValueError, match="milliseconds"):
                client.declare(queue, ttl=bad)
        with pytest.raises(ValueError, match="exchange"):
            client.declare(queue, exchange=None)
        client.declare(fresh_queue(), exchange="murano", ttl=500)  # a direct exchange: same mailbox rule
    assert status(node, "murano:" + queue)["ttl"] == 86400
    assert status(node, "murano:" + plain)["ttl"] is None


def test_a_result_sent_before_its_queue_is_declared_waits_and_the_declare_applies(flavour, shared_relay, node):
    results = "-execution-results-" + uuid.uuid4().hex[:8]
    with make_client(flavour, shared_relay) as client:
        client.send(message(flavour, {"SourceID": "p1"}, "p1"), results)  # the agent was quicker
        client.declare(results, enable_ha=True, ttl=86400000)  # the engine's listener, later
        with client.open(results) as subscription:
            got = subscription.get_message(timeout=10)
            got.ack()
    assert got.id == "p1"
    assert status(node, "murano:" + results)["ttl"] == 86400


# --- send ------------------------------------------------------------------------------------


def test_send_json_text_message_id_and_signature(flavour, shared_relay, node):
    queue = fresh_queue()
    signed = []

    def sign(data):
        signed.append(data)
        return b"\x00\xffsig"

    with make_client(flavour, shared_relay) as client:
        client.send(message(flavour, {"b": [1, 2], "a": "é"}, 3), queue, signing_func=sign)
        assert status(node, "murano:" + queue)["depth"] == 1  # stored when send returned
        client.send(message(flavour, "x", None), queue)
        client.send(message(flavour, None, "on-exchange"), queue, exchange="murano")
    consumer = node.consume("murano:" + queue, prefetch=3)
    got = [consumer.get(10) for _ in range(3)]
    for m in got:
        m.ack()
    assert signed == [json.dumps({"b": [1, 2], "a": "é"})]
    assert got[0].body == signed[0]  # exactly the signed text
    assert got[0].headers == {"message_id": "3", "signature": b"\x00\xffsig"}
    assert got[1].headers == {"message_id": ""} and got[1].body == '"x"'  # None id: ''
    assert got[2].headers == {"message_id": "on-exchange"} and got[2].body == "null"


def test_a_signing_func_that_returns_none_sends_a_none_signature(flavour, shared_relay):
    """Murano's Agent._sign returns None when the engine has no signing_key;
    kombu then sends the header signature = None, which the agent reads as None."""
    queue = fresh_queue()
    with make_client(flavour, shared_relay) as client:
        client.send(message(flavour, {"ID": "p"}, "p"), queue, signing_func=lambda data: None)
        with client.open(queue) as subscription:
            msg = subscription.get_message(timeout=10)
            msg.ack()
    assert msg.id == "p" and msg.signature is None


def test_send_encodes_as_the_original_flavour_did(shared_relay, node):
    queue = fresh_queue()
    with make_client(engine, shared_relay) as client:  # oslo's jsonutils: a set becomes a list
        client.send(message(engine, {"s": {1}}, 1), queue)
    with make_client(agent, shared_relay) as client:  # plain json
        with pytest.raises(TypeError):
            client.send(message(agent, {"s": {1}}, 1), queue)
    consumer = node.consume("murano:" + queue)
    got = consumer.get(10)
    got.ack()
    assert got.body == '{"s": [1]}'
    assert consumer.get(0.2) is None


# --- open / Subscription.get_message ---------------------------------------------------------


def test_get_message_timeouts(flavour, shared_relay):
    with make_client(flavour, shared_relay) as client:
        subscription = client.open(fresh_queue())
        with pytest.raises(RuntimeError, match="not open"):
            subscription.get_message(timeout=0)
        with subscription:
            start = time.monotonic()
            assert subscription.get_message(timeout=0.3) is None
            assert 0.25 <= time.monotonic() - start < 5
            start = time.monotonic()
            assert subscription.get_message(timeout=0) is None
            assert time.monotonic() - start < 1
            for bad in ("5", float("nan")):
                with pytest.raises(ValueError, match="timeout"):
                    subscription.get_message(timeout=bad)
        for bad in (-1, 1.5, "1", True):
            with pytest.raises(ValueError, match="prefetch_count"):
                client.open("q", prefetch_count=bad)
        with client.open(fresh_queue(), prefetch_count=0) as unlimited:  # AMQP's "no limit"
            assert unlimited.get_message(timeout=0) is None


def test_close_from_another_thread_ends_a_waiting_get_message(flavour, shared_relay):
    client = make_client(flavour, shared_relay)
    client.connect()
    subscription = client.open(fresh_queue()).__enter__()
    threading.Timer(0.3, client.close).start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="^Not connected"):
        subscription.get_message()  # would wait for ever
    assert time.monotonic() - start < 5


def test_get_message_waits_without_timeout(flavour, shared_relay):
    queue = fresh_queue()
    with make_client(flavour, shared_relay) as client, client.open(queue) as subscription:
        with make_client(flavour, shared_relay) as sender:
            sender.send(message(flavour, {"n": 1}, "m1"), queue)
        msg = subscription.get_message()  # timeout=None
        msg.ack()
    assert msg.id == "m1"


def test_prefetch_count_and_unacked_messages_go_back_on_exit(flavour, shared_relay):
    queue = fresh_queue()
    with make_client(flavour, shared_relay) as client:
        for i in range(2):
            client.send(message(flavour, i, f"m{i}"), queue)
        with client.open(queue, prefetch_count=1) as first:
            held = first.get_message(timeout=10)
            assert held.id == "m0" and not held.redelivered
            with make_client(flavour, shared_relay) as other, other.open(queue) as second:
                taken = second.get_message(timeout=10)
                assert taken.id == "m1"  # the first holds only one
                taken.ack()
            assert first.get_message(timeout=0.3) is None  # its credit is used
        # left without acking: m0 goes back to the queue
        with client.open(queue) as again:
            redelivered = again.get_message(timeout=10)
            redelivered.ack()
    assert redelivered.id == "m0" and redelivered.redelivered


# --- Message ---------------------------------------------------------------------------------


def test_a_new_message(flavour):
    m = flavour.Message()
    assert m.id == "" and m.body is None and m.reply_to is None and m.signature is None
    m.id, m.body = None, {"a": 1}
    assert m.id == "" and m.body == {"a": 1}
    m.id = 5
    assert m.id == 5
    with pytest.raises(RuntimeError, match="not received"):
        m.ack()


def received(flavour, node, shared_relay, body, headers):
    queue = fresh_queue()
    node.send("murano:" + queue, body, headers=headers)
    with make_client(flavour, shared_relay) as client, client.open(queue) as subscription:
        msg = subscription.get_message(timeout=10)
        msg.ack()
    return msg


def test_engine_message_decodes_json_and_a_bad_body_gives_none(shared_relay, node, caplog):
    text = '{"SourceID": "p1",  "Result": [1, 2]}'
    msg = received(engine, node, shared_relay, text, {"message_id": "p1", "reply_to": "rq", "signature": "s"})
    assert (msg.id, msg.body, msg.reply_to, msg.signature) == ("p1", {"SourceID": "p1", "Result": [1, 2]}, "rq", "s")
    with caplog.at_level(logging.ERROR, logger="murano_zmq.compat.murano"):
        bad = received(engine, node, shared_relay, "{not json", {"message_id": "p2"})
        native = received(engine, node, shared_relay, {"a": 1}, {})  # not JSON text
    assert bad.body is None and bad.id == "p2"
    assert native.body is None and native.id == ""
    assert "'p2': body is not JSON" in caplog.text and "not JSON text" in caplog.text


def test_bodies_that_cannot_be_read_reach_the_application_and_are_acked(shared_relay, node, caplog):
    """A body nested past Python's stack made the engine's get_message()
    raise RecursionError, and one that is not msgpack (a raw client's)
    ValueError: the message, never acked, came first again for ever,
    ahead of the good results behind it."""
    with caplog.at_level(logging.ERROR, logger="murano_zmq.compat.murano"):
        deep = received(engine, node, shared_relay, "[" * 100_000, {"message_id": "deep"})
    assert deep.body is None and deep.id == "deep" and "RecursionError" in caplog.text
    for flavour, expected in ((engine, {"raw": True}), (agent, '{"raw": true}')):
        queue = fresh_queue()
        send_raw_body(shared_relay.endpoint, "murano:" + queue, b'{"raw": true}')  # JSON, not msgpack
        node.send("murano:" + queue, '{"after": 1}')
        with make_client(flavour, shared_relay) as client, client.open(queue) as subscription:
            raw = subscription.get_message(timeout=10)
            raw.ack()
            after = subscription.get_message(timeout=10)
            after.ack()
        assert raw.body == expected and after.body in ({"after": 1}, '{"after": 1}')


def test_agent_message_body_is_the_exact_text(shared_relay, node):
    text = '{ "ID" : "p1",\n  "Body": "é" }'
    msg = received(agent, node, shared_relay, text, {"message_id": "p1", "signature": b"\x01\x02"})
    assert msg.body == text and msg.id == "p1" and msg.signature == b"\x01\x02" and msg.reply_to is None
    raw = received(agent, node, shared_relay, text.encode(), {})
    assert raw.body == text and raw.id == ""  # bytes of UTF-8 text: the text


# --- install() -------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour_name, original", [("engine", "murano.common.messaging"),
                                                     ("agent", "muranoagent.common.messaging")])
def test_install_answers_for_the_original_package(monkeypatch, flavour_name, original):
    flavour = FLAVOURS[flavour_name]
    parts = original.split(".")
    for i in range(1, len(parts)):  # the service's own packages, as if installed
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for name in ("", ".mqclient", ".message", ".subscription"):
        monkeypatch.delitem(sys.modules, original + name, raising=False)
    flavour.install()
    scope: dict = {}
    exec(f"from {'.'.join(parts[:-1])} import {parts[-1]} as messaging", scope)  # the agent's import
    assert scope["messaging"].MqClient is flavour.MqClient
    assert import_module(original + ".mqclient").MqClient is flavour.MqClient
    assert import_module(original + ".message").Message is flavour.Message
    assert import_module(original + ".subscription").Subscription is flavour.Subscription

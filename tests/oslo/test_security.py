"""The driver against a relay in secure mode: CURVE keys from the transport
URL, and the permissions an oslo.messaging service needs (docs/oslo.md)."""

from __future__ import annotations

import queue

import pytest

from .conftest import NotificationRecorder, Recorder, zmqrelay_url

oslo_messaging = pytest.importorskip("oslo_messaging")

from murano_zmq.security import CurveClient, create_key_pair, load_public_key, load_secret_key  # noqa: E402

PERMISSIONS = """
[identity."nova-*"]                 # what an oslo.messaging service needs
send = ["oslo.*"]
consume = ["oslo.*"]
declare = ["oslo.reply:*", "oslo.fanout:*"]
admin = ["oslo.fanout:*", "oslo.notify:*"]

[identity.limited]                  # no declare, no admin
send = ["oslo.*"]
consume = ["oslo.*"]

[identity.ops]
admin = ["*"]
"""


@pytest.fixture
def keys(tmp_path):
    key_dir, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()
    for name in ("relay", "nova-api", "nova-compute", "limited", "ops"):
        public, _ = create_key_pair(name, key_dir)
        if name != "relay":
            (authorized / public.name).write_bytes(public.read_bytes())
    permissions = tmp_path / "permissions.toml"
    permissions.write_text(PERMISSIONS)
    return key_dir, authorized, permissions


@pytest.fixture
def secure_relay(relay_factory, keys):
    key_dir, authorized, permissions = keys
    probe = CurveClient(load_secret_key(key_dir / "ops.key_secret"), load_public_key(key_dir / "relay.key"))
    return relay_factory("--key", str(key_dir / "relay.key_secret"), "--authorized-keys", str(authorized),
                         "--permissions", str(permissions), probe_curve=probe)


def url_for(relay, keys, name: str) -> str:
    key_dir = keys[0]
    return zmqrelay_url(relay, query=f"curve_key={key_dir / (name + '.key_secret')}"
                                     f"&relay_key={key_dir / 'relay.key'}&relay_timeout=5")


def test_services_with_keys_call_fan_out_and_notify(secure_relay, keys, transports, servers):
    server_transport = transports(url_for(secure_relay, keys, "nova-compute"))
    client_transport = transports(url_for(secure_relay, keys, "nova-api"))
    sink: queue.Queue = queue.Queue()
    for name in ("c1", "c2"):
        target = oslo_messaging.Target(topic="compute", server=name)
        servers(oslo_messaging.get_rpc_server(server_transport, target, [Recorder(name, sink)],
                                              executor="threading"))
    client = oslo_messaging.get_rpc_client(client_transport, oslo_messaging.Target(topic="compute"), timeout=10)
    assert client.call({}, "echo", value="secret")["value"] == "secret"
    client.prepare(fanout=True).cast({}, "record", value="all")
    got = [sink.get(timeout=10) for _ in range(3)]
    assert sorted(name for name, kind, _ in got if kind == "record") == ["c1", "c2"]

    notify_listen = transports(url_for(secure_relay, keys, "nova-compute"), "notification")
    endpoint = NotificationRecorder()
    servers(oslo_messaging.get_notification_listener(notify_listen, [oslo_messaging.Target(topic="events")],
                                                     [endpoint], executor="threading", pool="audit"))
    notify_send = transports(url_for(secure_relay, keys, "nova-api"), "notification")
    oslo_messaging.Notifier(notify_send, "api", driver="messaging", topics=["events"]).info({}, "e", {})
    assert endpoint.events.get(timeout=10) == ("info", "e", {})


def test_without_declare_and_admin_calls_and_notifications_are_refused(secure_relay, keys, transports):
    transport = transports(url_for(secure_relay, keys, "limited"))
    client = oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic="compute"), timeout=5)
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match="reply mailbox"):
        client.call({}, "echo", value=1)  # its reply mailbox needs declare
    notify = transports(url_for(secure_relay, keys, "limited"), "notification")
    driver = notify._driver
    with pytest.raises(oslo_messaging.MessageDeliveryFailure, match="pools"):  # listing needs admin
        driver.send_notification(oslo_messaging.Target(topic="events.info"), {}, {"x": 1}, 2.0)


def test_half_a_key_configuration_is_refused(relay, keys, tmp_path):
    from oslo_config import cfg

    url = zmqrelay_url(relay, query=f"curve_key={keys[0] / 'nova-api.key_secret'}")
    with pytest.raises(oslo_messaging.InvalidTransportURL, match="CURVE"):
        oslo_messaging.get_rpc_transport(cfg.CONF, url=url)

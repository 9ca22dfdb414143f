"""A murano-agent stand-in for the tests: the agent's own loop, on the drop-in.

    python -m tests.compat.agent_process RELAY INPUT_QUEUE RESULT_QUEUE MODE [PUBLIC_KEY_PEM]

Like muranoagent/app.py it opens its input queue with prefetch_count=1 and
calls get_message(timeout=5) in a loop.  It prints one JSON line per plan it
takes (body text, signature, id, redelivered, signature check) and then:
MODE "ack" stores nothing, acks and sends a result on RESULT_QUEUE;
MODE "hold" prints "holding" and never acks (the test kills it with -9).
With COMPAT_TEST_EVENTLET=1 in its environment it runs as murano-agent does,
monkey-patched by eventlet, and as in a tenant VM without oslo.messaging.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("COMPAT_TEST_EVENTLET"):
    import eventlet

    eventlet.monkey_patch()
    sys.modules["oslo_messaging"] = None  # import fails, as where the oslo extra is missing

import base64
import json
import time

from murano_zmq.compat.muranoagent import Message, MqClient


def verified(pem: str | None, queue: str, body: str, signature) -> bool | None:
    if not pem:
        return None
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    key = serialization.load_pem_public_key(pem.encode())
    try:
        key.verify(signature, (queue + body).encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
        return True
    except InvalidSignature:
        return False


def main(relay: str, input_queue: str, result_queue: str, mode: str, pem: str | None = None) -> None:
    host, port = relay.rsplit("//", 1)[1].rsplit(":", 1)
    deadline = time.monotonic() + 60
    # muranoagent/app.py's _create_rmq_client(): its config, ssl off
    connection_params = {"login": "agent", "password": "guest", "host": host, "port": int(port),
                         "virtual_host": "/", "ssl": False, "ssl_version": "", "ca_certs": None,
                         "insecure": False}
    with MqClient(**connection_params) as mq:
        with mq.open(input_queue, prefetch_count=1) as subscription:
            print("consuming", flush=True)
            while time.monotonic() < deadline:
                msg = subscription.get_message(timeout=5)
                if msg is None:
                    continue
                sig = msg.signature
                print(json.dumps({
                    "body": msg.body, "id": msg.id, "reply_to": msg.reply_to,
                    "redelivered": msg.redelivered,
                    "signature": base64.b64encode(sig).decode() if isinstance(sig, bytes) else sig,
                    "verified": verified(pem, input_queue, msg.body, sig),
                }), flush=True)
                if mode == "hold":
                    print("holding", flush=True)
                    time.sleep(120)
                    return
                try:
                    plan = json.loads(msg.body)
                finally:
                    msg.ack()
                result = Message()  # as app.py's _send_result()
                result.body = {"SourceID": plan["ID"], "ErrorCode": 0, "Body": {"echo": plan["Body"]}}
                result.id = result.body.get("SourceID")
                mq.send(message=result, key=result_queue, exchange="")  # result_exchange: ''
                print("sent result", flush=True)
                return


if __name__ == "__main__":
    main(*sys.argv[1:])

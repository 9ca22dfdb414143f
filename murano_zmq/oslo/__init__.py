"""oslo.messaging driver over murano-zmq (the ``oslo`` extra).

    [DEFAULT]
    transport_url = zmqrelay://relay-host:5570/

oslo.messaging finds `ZmqRelayDriver` through the ``oslo.messaging.drivers``
entry point ``zmqrelay``.  docs/oslo.md says what maps to what.

    names.py     mailbox names of targets, replies, notifications and pools
    options.py   the transport URL's hosts and query options
    relays.py    a Node per relay, which relay holds a mailbox, prefix listings
    codec.py     request, reply and notification bodies (JSON, as rabbit's)
    incoming.py  IncomingMessages: ack, requeue, reply, heartbeat
    listener.py  a PollStyleListener over several mailboxes
    replies.py   the caller's reply mailbox and the routing of replies
    green.py     Nodes in a process eventlet has monkey-patched
    driver.py    ZmqRelayDriver: BaseDriver wired from the above
"""

from .driver import ZmqRelayDriver

__all__ = ["ZmqRelayDriver"]

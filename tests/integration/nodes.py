"""One behaviour suite for Node and AsyncNode: a blocking facade over AsyncNode
(its loop runs in a thread) so the same test code drives both."""

from __future__ import annotations

import asyncio
import threading

from murano_zmq import AsyncNode, Node


class _AsyncMessage:
    def __init__(self, facade: "AsyncNodeFacade", message):
        self._facade = facade
        self._message = message

    def __getattr__(self, name):
        return getattr(self._message, name)

    def ack(self) -> None:
        self._facade._loop.call_soon_threadsafe(self._message.ack)

    def nack(self, requeue: bool = True) -> None:
        self._facade._loop.call_soon_threadsafe(self._message.nack, requeue)


class _AsyncConsumerFacade:
    def __init__(self, facade: "AsyncNodeFacade", consumer):
        self._facade = facade
        self._consumer = consumer

    def get(self, timeout=None):
        m = self._facade._call(self._consumer.get(timeout))
        return None if m is None else _AsyncMessage(self._facade, m)

    def cancel(self) -> None:
        self._facade._loop.call_soon_threadsafe(self._consumer.cancel)


class AsyncNodeFacade:
    """Blocking methods that run AsyncNode coroutines on a private loop."""

    def __init__(self, *args, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make():
            node = AsyncNode(*args, **kwargs)
            await node.__aenter__()
            return node

        self.node = self._call(make())

    def _call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def declare(self, *a, **kw):
        return self._call(self.node.declare(*a, **kw))

    def delete(self, *a, **kw):
        return self._call(self.node.delete(*a, **kw))

    def status(self, *a, **kw):
        return self._call(self.node.status(*a, **kw))

    def send(self, *a, **kw):
        return self._call(self.node.send(*a, **kw))

    def send_many(self, *a, **kw):
        return self._call(self.node.send_many(*a, **kw))

    def consume(self, *a, **kw):
        return _AsyncConsumerFacade(self, self._call(self.node.consume(*a, **kw)))

    def close(self) -> None:
        try:
            self._call(self.node.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


NODE_KINDS = {"sync": Node, "async": AsyncNodeFacade}

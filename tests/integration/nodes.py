"""One behaviour suite for Node and AsyncNode (as pyzmq's auth tests cover
the thread and asyncio authenticators): a blocking facade over AsyncNode
whose loop runs in a thread, so the same test code drives both runners.

Use the `make_node` fixture (tests/integration/conftest.py): it makes nodes
of the kind the test is parametrized with, and closes them."""

from __future__ import annotations

import asyncio
import concurrent.futures
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


class _Getter:
    """An AsyncConsumer or AsyncSubscription, with a blocking get()."""

    def __init__(self, facade: "AsyncNodeFacade", inner, wrap):
        self._facade = facade
        self._inner = inner
        self._wrap = wrap

    def get(self, timeout=None):
        item = self._facade._call(self._inner.get(timeout))
        return None if item is None else self._wrap(item)

    def cancel(self) -> None:
        self._facade._loop.call_soon_threadsafe(self._inner.cancel)


class AsyncNodeFacade:
    """Blocking methods that run AsyncNode coroutines on a private loop."""

    def __init__(self, *args, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make():
            node = AsyncNode(*args, **kwargs)
            await node.start()
            return node

        try:
            self.node = self._call(make())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro, timeout: float = 90):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _on_loop(self, fn, *args, **kwargs):
        async def run():
            return fn(*args, **kwargs)
        return self._call(run())

    def __getattr__(self, name):  # endpoint, relay, pending, peers, _core, _topics ...
        return getattr(self.node, name)

    def declare(self, *a, **kw):
        return self._call(self.node.declare(*a, **kw))

    def delete(self, *a, **kw):
        return self._call(self.node.delete(*a, **kw))

    def status(self, *a, **kw):
        return self._call(self.node.status(*a, **kw))

    def send(self, *a, **kw):
        return self._call(self.node.send(*a, **kw))

    def send_async(self, *a, **kw) -> concurrent.futures.Future:
        inner = self._on_loop(self.node.send_nowait, *a, **kw)
        outer: concurrent.futures.Future = concurrent.futures.Future()

        def copy(f) -> None:
            if f.cancelled():
                outer.cancel()
            elif f.exception() is not None:
                outer.set_exception(f.exception())
            else:
                outer.set_result(f.result())

        self._loop.call_soon_threadsafe(inner.add_done_callback, copy)
        return outer

    def send_many(self, *a, **kw):
        return self._call(self.node.send_many(*a, **kw))

    def consume(self, *a, **kw):
        consumer = self._call(self.node.consume(*a, **kw))
        return _Getter(self, consumer, lambda m: _AsyncMessage(self, m))

    def publish(self, *a, **kw) -> None:
        self._on_loop(self.node.publish, *a, **kw)

    def subscribe(self, *a, **kw):
        return _Getter(self, self._on_loop(self.node.subscribe, *a, **kw), lambda e: e)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.node.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


NODE_KINDS = {"sync": Node, "async": AsyncNodeFacade}

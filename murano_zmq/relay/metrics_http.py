"""The HTTP server behind `relay --metrics`: prometheus-client's WSGI app,
served with bounds its own start_http_server lacks.

prometheus-client serves each connection on a thread of its own, with no
timeout and no limit: idle connections (a slowloris, a scraper that hangs)
each held a thread and a file descriptor for ever, and a few hundred took
the relay's last descriptors (its next segment file failed to open).  Here
a connection that sends nothing for IDLE_TIMEOUT seconds is closed, one
still open REQUEST_DEADLINE seconds after it came is shut down (a client
trickling a byte at a time never goes idle), and past MAX_CONNECTIONS at
once a new one is closed at once: a scrape may then fail, the relay does
not.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger("murano_zmq.relay")

IDLE_TIMEOUT = 10.0  # seconds a connection may stay silent
REQUEST_DEADLINE = 30.0  # seconds a connection may last, request and reply
MAX_CONNECTIONS = 16  # served at once (a scraper needs one)


class _Handler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT  # (StreamRequestHandler: the socket's timeout)

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        """Log nothing: a line per scrape."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # (no list of threads to join kept at close)

    def __init__(self, *args, **kwargs) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request, client_address) -> None:
        """A connection timed out, reset or gone is the client's business:
        no traceback on the relay's stderr (a slowloris would fill it)."""
        if not isinstance(sys.exc_info()[1], OSError):
            log.debug("metrics request from %s failed", client_address, exc_info=True)

    def process_request_thread(self, request, client_address) -> None:
        deadline = threading.Timer(REQUEST_DEADLINE, _shut, (request,))
        deadline.daemon = True
        try:
            deadline.start()  # (no thread to start: the request fails, its slot is released)
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()


def _shut(request: socket.socket) -> None:
    """End a connection past its deadline: its thread's read or write then
    fails, and the thread closes it."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # (closed meanwhile)


def serve(host: str, port: int, app) -> tuple[WSGIServer, threading.Thread]:
    """Serve the WSGI `app` on host:port from a daemon thread; OSError if
    it cannot listen there."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
    httpd = make_server(host, port, app, server_class, handler_class=_Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="murano-zmq-metrics", daemon=True)
    thread.start()
    return httpd, thread

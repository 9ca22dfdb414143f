"""One relay process per test module, for the many short API tests."""

from __future__ import annotations

import pytest

from murano_zmq.testing import RelayProcess

from ..helpers import free_tcp_endpoint


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat-relay")
    with open(root / "relay.log", "wb") as log:
        relay = RelayProcess(free_tcp_endpoint(), str(root / "data"), log_file=log).start()
        try:
            yield relay
        finally:
            relay.kill()

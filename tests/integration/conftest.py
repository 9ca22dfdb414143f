"""The node factory: every node behaviour test runs on both runners."""

from __future__ import annotations

import pytest

from .nodes import NODE_KINDS


@pytest.fixture(params=sorted(NODE_KINDS))
def node_kind(request):
    """Node (threads) or AsyncNode (asyncio, through a blocking facade)."""
    return NODE_KINDS[request.param]


@pytest.fixture
def make_node(node_kind, request):
    """make_node(name, **Node options): a node of the parametrized kind; the
    relay of the test's `relay` fixture unless given; closed at teardown."""
    made = []

    def make(name: str, **kw):
        if "relay" not in kw:
            kw["relay"] = request.getfixturevalue("relay").endpoint
        kw.setdefault("timeout", 15)
        node = node_kind(name, **kw)
        made.append(node)
        return node

    yield make
    for node in reversed(made):
        node.close()

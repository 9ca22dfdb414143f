"""The dependency arrows of docs/architecture.md: nothing imports the CLI (the
devices call the library), the status view and the relay child-process
helper live outside cli.py and relay/, protocol and the cores do no I/O,
relay and node never import each other, and protocol numbers live in
protocol/constants.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sources(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in (ROOT / d).rglob("*.py")]


def test_nothing_but_the_entry_point_imports_the_cli():
    importers = [p.relative_to(ROOT).as_posix() for p in sources("murano_zmq", "devices", "bench")
                 if "murano_zmq.cli" in imported_modules(p)]
    assert importers == ["murano_zmq/__main__.py"]


def test_the_relay_package_does_not_start_processes_or_the_cli():
    assert not (ROOT / "murano_zmq" / "relay" / "process.py").exists()
    for path in sources("murano_zmq/relay"):
        assert "subprocess" not in imported_modules(path), path


def test_testing_helper_runs_the_relay_entry_point():
    text = (ROOT / "murano_zmq" / "testing.py").read_text(encoding="utf-8")
    assert '"-m", "murano_zmq.relay"' in text
    assert "murano_zmq.cli" not in imported_modules(ROOT / "murano_zmq" / "testing.py")


def test_devices_call_the_library():
    assert "murano_zmq.relay.main.main" in imported_modules(ROOT / "devices" / "relay" / "__main__.py")
    assert "murano_zmq.forwarder.main" in imported_modules(ROOT / "devices" / "forwarder" / "__main__.py")


def _numeric(node: ast.AST) -> bool:
    """A number written out: 5, 1.5, 4 * 1024, 1 << 40, -1."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.BinOp):
        return _numeric(node.left) and _numeric(node.right)
    if isinstance(node, ast.UnaryOp):
        return _numeric(node.operand)
    return False


def test_protocol_numbers_live_in_constants():
    """protocol/constants.py says every protocol number lives there: no other
    protocol module defines a module-level number of its own."""
    found = []
    for path in sources("murano_zmq/protocol"):
        if path.name == "constants.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if value is not None and _numeric(value):
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    assert found == []


IO_MODULES = {"zmq", "sqlite3", "asyncio", "socket", "select", "selectors", "threading", "psycopg", "subprocess"}


def _top(module: str) -> str:
    return module.split(".")[0]


def _project(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_protocol_imports_no_io_and_nothing_else_of_the_project():
    for path in sources("murano_zmq/protocol"):
        modules = imported_modules(path)
        assert not {_top(m) for m in modules} & IO_MODULES, path
        assert all(_project(m, "murano_zmq.protocol") for m in modules if _top(m) == "murano_zmq"), path


def test_relay_and_node_never_import_each_other():
    for path in sources("murano_zmq/relay"):
        assert not any(_project(m, "murano_zmq.node") for m in imported_modules(path)), path
    for path in sources("murano_zmq/node"):
        assert not any(_project(m, "murano_zmq.relay") for m in imported_modules(path)), path


def test_store_knows_no_sockets_and_neither_node_nor_relay():
    for path in sources("murano_zmq/store"):
        modules = imported_modules(path)
        assert "zmq" not in {_top(m) for m in modules}, path
        assert not any(_project(m, p) for m in modules for p in ("murano_zmq.node", "murano_zmq.relay")), path


def test_the_node_core_does_no_io():
    """NodeCore and the pieces it is made of decide; the runners do the I/O."""
    for name in ("core.py", "links.py", "common.py"):
        modules = imported_modules(ROOT / "murano_zmq" / "node" / name)
        assert not {_top(m) for m in modules} & IO_MODULES, name


def test_the_relay_engine_and_its_rooms_do_no_io():
    """Only relay/server.py (the loop), relay/wire.py (its socket reads and
    writes), relay/checks.py (--check-config opens the database) and
    relay/metrics.py and metrics_http.py (the Prometheus HTTP server) do I/O."""
    for path in sources("murano_zmq/relay"):
        if path.name in ("server.py", "wire.py", "checks.py", "metrics.py", "metrics_http.py"):
            continue
        assert not {_top(m) for m in imported_modules(path)} & IO_MODULES, path

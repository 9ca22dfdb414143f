"""The dependency arrows of docs/architecture.md that issue 10 turned one way:
nothing imports the CLI (the devices call the library), the status view and
the relay child-process helper live outside cli.py and relay/."""

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

"""docs/protocol.md names every command and error code the code has, and
gives each command's fields as the frame schemas do.

The protocol is written down once, in docs/protocol.md; these checks keep the
doc and murano_zmq.protocol in step (a new command or code fails here until it
is documented).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from murano_zmq.protocol.constants import ID_SIZE, PROTOCOL_VERSION
from murano_zmq.protocol.errors import ERROR_CLASSES, ERROR_NAMES, RemoteProtocolError
from murano_zmq.protocol.frames import OPTIONAL_TAIL, SCHEMAS, Cmd
from murano_zmq.protocol.message import parse_delivery, parse_send_record, send_record

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def error_rows(doc) -> dict[int, str]:
    """Error table rows of the doc, by the code in their first cell."""
    rows = {}
    for line in doc.splitlines():
        m = re.match(r"\|\s*`(\d{3})`\s*\|", line)
        if m:
            rows[int(m.group(1))] = line
    return rows


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
def test_every_command_is_documented(doc, cmd):
    found = f"`{cmd.name}`" in doc
    assert found, f"docs/protocol.md does not mention `{cmd.name}`"


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
def test_every_command_has_a_section_with_its_code(doc, cmd):
    heading = re.compile(rf"^#+ {cmd.name} \(0x{cmd.value:02X},", re.MULTILINE)
    found = heading.search(doc) is not None
    assert found, f"docs/protocol.md has no section '{cmd.name} (0x{cmd.value:02X}, ...)'"


@pytest.mark.parametrize("code", sorted(ERROR_NAMES))
def test_every_error_code_is_documented(doc, code):
    for word in (f"`{code}`", f"`{ERROR_NAMES[code]}`"):
        found = word in doc
        assert found, f"docs/protocol.md does not mention {word}"


@pytest.mark.parametrize("code", sorted(ERROR_NAMES))
def test_error_table_row_matches_the_code(error_rows, code):
    assert code in error_rows, f"the error table of docs/protocol.md has no row for `{code}`"
    row = error_rows[code]
    for word in (f"`{ERROR_NAMES[code]}`", f"`{ERROR_CLASSES[code].__name__}`"):
        assert word in row, f"the error table row of `{code}` should name {word}"


def test_error_table_has_no_codes_the_code_lacks(error_rows):
    assert sorted(set(error_rows) - set(ERROR_NAMES)) == []


def test_signature_and_version_are_documented(doc):
    found = '"MZQ"' in doc
    assert found, 'docs/protocol.md does not give the signature "MZQ"'
    version = f"0x{PROTOCOL_VERSION:02x}"
    found = version in doc.lower()
    assert found, f"docs/protocol.md does not give the version byte {version}"


def _field_tables(doc: str, cmd: Cmd) -> list[list[tuple[str, str, str]]]:
    """(#, field, type) rows of each field table in `cmd`'s section: the
    command's fields first, then (SEND, DELIVER) its records'."""
    start = re.search(rf"^### {cmd.name} \(0x{cmd.value:02X},.*$", doc, re.MULTILINE)
    assert start, f"no section for {cmd.name}"
    end = re.compile(r"^##", re.MULTILINE).search(doc, start.end())
    section = doc[start.end():end.start() if end else len(doc)]
    tables, rows = [], None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:4] == ["#", "field", "type", "meaning"]:
            rows = []
            tables.append(rows)
        elif rows is not None and line.startswith("|") and not set(line) <= set("|- "):
            rows.append((cells[0], cells[1], cells[2]))
        elif rows is not None and not line.startswith("|"):
            rows = None
    return tables


def _field_table(doc: str, cmd: Cmd) -> list[tuple[str, str, str]]:
    """(#, field, type) rows of the first field table in `cmd`'s section."""
    tables = _field_tables(doc, cmd)
    return tables[0] if tables else []


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
def test_each_command_field_table_matches_its_schema(doc, cmd):
    rows = _field_table(doc, cmd)
    schema = SCHEMAS[cmd]
    assert [r[0] for r in rows] == [str(i) for i in range(len(schema))], (
        f"{cmd.name}: the doc lists fields {[r[0] for r in rows]}, the schema has {len(schema)}")
    for (i, name, doc_type), kind in zip(rows, schema):
        assert doc_type.split(",")[0].strip() == kind, (
            f"{cmd.name} field {i} ({name}): the doc says {doc_type!r}, frames.SCHEMAS says {kind!r}")


@pytest.mark.parametrize("cmd", sorted(OPTIONAL_TAIL), ids=lambda c: c.name)
def test_fields_that_may_be_left_out_are_documented(doc, cmd):
    rows = _field_table(doc, cmd)
    for i, name, _ in rows[len(rows) - OPTIONAL_TAIL[cmd]:]:
        line = next(line for line in doc.splitlines() if line.startswith(f"| {i} | {name} |"))
        assert "leave this last field out" in line, f"{cmd.name} field {i} may be left out: say so"


def test_heartbeat_has_no_fields(doc):
    assert SCHEMAS[Cmd.HEARTBEAT] == ()
    assert "Frame 2 is an empty msgpack array" in doc


# --- the records inside SEND and DELIVER --------------------------------------

# A value of each kind the doc names, and one that is of no such kind.
_SAMPLES = {"int": 7, "num": 1.5, "str": "inbox", "bin": b"", "bool": False}
_WRONG = {"int": "7", "num": "1.5", "str": 7, "bin": "text", "bool": 1}
_PYTHON_KINDS = {int: "int", float: "num", str: "str", bytes: "bin", bool: "bool"}


def _record_kinds(doc: str, cmd: Cmd) -> list[tuple[str, str, bool]]:
    """(field, kind, nullable) of the record table in `cmd`'s section."""
    tables = _field_tables(doc, cmd)
    assert len(tables) == 2, f"{cmd.name}: the doc should give the command's fields, then its record's"
    kinds = []
    for i, (n, name, doc_type) in enumerate(tables[1]):
        assert n == str(i), f"{cmd.name} record: row {n} where {i} was expected"
        kind = doc_type.split(",")[0].strip()
        assert kind.rstrip("?") in _SAMPLES, f"{cmd.name} record field {name}: unknown type {doc_type!r}"
        kinds.append((name, kind.rstrip("?"), kind.endswith("?")))
    return kinds


@pytest.mark.parametrize("cmd,parse", [(Cmd.SEND, parse_send_record), (Cmd.DELIVER, parse_delivery)],
                         ids=["SEND", "DELIVER"])
def test_each_record_table_matches_what_the_codec_takes(doc, cmd, parse):
    """A record built field by field from the doc's table parses; the same
    record with any one field of another kind (or nil where the doc does
    not allow it) is refused, and so is a record a field short or long."""
    kinds = _record_kinds(doc, cmd)
    id_fields = {row[1] for row in _field_tables(doc, cmd)[1] if f"{ID_SIZE} bytes" in row[2]}
    record = [b"\x01" * ID_SIZE if name in id_fields else _SAMPLES[kind] for name, kind, _ in kinds]
    parse(record)
    for i, (name, kind, nullable) in enumerate(kinds):
        for bad in (_WRONG[kind],) if nullable else (_WRONG[kind], None):
            try:
                parse([*record[:i], bad, *record[i + 1:]])
            except RemoteProtocolError:
                continue
            pytest.fail(f"{cmd.name} record field {i} ({name}): the doc says {kind}, {bad!r} was taken")
        if nullable:
            parse([*record[:i], None, *record[i + 1:]])
    for wrong_length in (record[:-1], [*record, None]):
        with pytest.raises(RemoteProtocolError):
            parse(wrong_length)


def test_send_record_table_matches_what_the_node_sends(doc):
    kinds = _record_kinds(doc, Cmd.SEND)
    record = send_record(b"\x01" * ID_SIZE, "inbox", {"k": "v"}, b"\x90", 1.5, 30.0)
    assert len(record) == len(kinds)
    for value, (name, kind, _) in zip(record, kinds):
        made = _PYTHON_KINDS[type(value)]
        assert made == kind or (kind == "num" and made == "int"), (
            f"SEND record field {name}: the doc says {kind}, send_record() makes {made}")

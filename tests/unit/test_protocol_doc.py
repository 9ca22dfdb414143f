"""docs/protocol.md names every command and error code the code has.

The protocol is written down once, in docs/protocol.md; these checks keep the
doc and murano_zmq.protocol in step (a new command or code fails here until it
is documented).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from murano_zmq.protocol.constants import PROTOCOL_VERSION
from murano_zmq.protocol.errors import ERROR_CLASSES, ERROR_NAMES
from murano_zmq.protocol.frames import Cmd

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

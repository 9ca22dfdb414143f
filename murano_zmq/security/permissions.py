"""Per-identity permissions: which mailboxes a key may send to, consume from,
declare, and administer.  Pure: no I/O beyond reading the file it is given.

The file is TOML.  Each `[identity."PATTERN"]` table lists mailbox patterns
per operation; identities are key names (the authorized-keys file name
without `.key`):

    [identity.api]
    send = ["conductor"]
    consume = ["api.results", "api.progress"]

    [identity."conductor-*"]          # every key named conductor-...
    send = ["agent.*", "api.results", "api.progress"]
    consume = ["conductor"]
    declare = ["agent.*"]

    [identity."agent-*-*"]            # agent-ENV-UNIT
    consume = ["agent.{1}.{2}"]       # {N}: what the N-th * matched
    send = ["conductor.results"]

    [identity.ops]
    admin = ["*"]

Patterns are fnmatch-style and case-sensitive: `*` any run of characters
(dots included), `?` one character, `[abc]` a set.  In mailbox patterns
`{identity}` is the whole key name and `{1}`, `{2}`... what the `*`s of the
identity pattern matched; substituted text is matched literally, never as a
pattern.  An identity gets the union of every table whose pattern matches
its name.  Nothing is allowed that no table allows.

Operations and the commands they guard:

    send     SEND, per message (a denied message gets 403 in CONFIRM)
    consume  CONSUME
    declare  DECLARE (passive or not)
    admin    DELETE, PURGE, PEEK of the mailbox, MOVE of both mailboxes;
             STATUS lists only mailboxes the identity may administer, and
             needs at least one admin pattern
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .keys import check_small_file

OPERATIONS = ("send", "consume", "declare", "admin")

# A permissions file is a few kilobytes; one past this is not one.
MAX_PERMISSIONS_FILE = 4 << 20

# Compiled rules kept per identity name; more distinct names than this (only
# authorized keys reach the check) just clears the cache.
_CACHE_LIMIT = 10_000

_CAPTURE_RE = re.compile(r"\{(identity|\d+)\}")


class PermissionsError(ValueError):
    """The permissions file cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Rule:
    identity: str  # fnmatch pattern over key names
    ops: dict[str, tuple[str, ...]]  # operation -> mailbox patterns (with {N} / {identity})


class Permissions:
    """An immutable permission table; allows() answers one question."""

    def __init__(self, rules: list[Rule], source: str = "<permissions>"):
        self.rules = tuple(rules)
        self.source = source
        self._identity_res = [(re.compile(_capturing(rule.identity)), rule) for rule in self.rules]
        self._cache: dict[str, dict[str, re.Pattern | None]] = {}

    # --- loading -----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "Permissions":
        path = Path(path)
        try:
            check_small_file(path, MAX_PERMISSIONS_FILE)
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PermissionsError(f"cannot read permissions file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise PermissionsError(f"permissions file {path} is not UTF-8 text ({exc.reason} at byte "
                                   f"{exc.start})") from None
        return cls.from_toml(text, str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<permissions>") -> "Permissions":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PermissionsError(f"{source}: not valid TOML: {exc}") from None
        except RecursionError:
            raise PermissionsError(f"{source}: not valid TOML: nested too deeply") from None
        return cls.from_mapping(data, source)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "<permissions>") -> "Permissions":
        unknown = set(data) - {"identity"}
        if unknown:
            raise PermissionsError(f"{source}: unknown top-level key(s) {sorted(unknown)}; "
                                   "expected [identity.NAME] tables")
        identities = data.get("identity", {})
        if not isinstance(identities, dict):
            raise PermissionsError(f"{source}: 'identity' must be a table of tables")
        rules = []
        for pattern, table in identities.items():
            where = f"{source}: [identity.{pattern!r}]"
            if not isinstance(table, dict):
                raise PermissionsError(f"{where} must be a table")
            bad = set(table) - set(OPERATIONS)
            if bad:
                raise PermissionsError(f"{where}: unknown operation(s) {sorted(bad)}; "
                                       f"known: {', '.join(OPERATIONS)}")
            stars = pattern.count("*")
            ops = {}
            for op, patterns in table.items():
                if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
                    raise PermissionsError(f"{where}: {op} must be a list of non-empty strings")
                for p in patterns:
                    for ref in _CAPTURE_RE.findall(p):
                        if ref != "identity" and not 1 <= int(ref) <= stars:
                            raise PermissionsError(
                                f"{where}: {op} pattern {p!r} uses {{{ref}}} but the identity "
                                f"pattern has {stars} '*'")
                ops[op] = tuple(patterns)
            rules.append(Rule(pattern, ops))
        return cls(rules, source)

    # --- questions -------------------------------------------------------------------

    def allows(self, identity: str | None, op: str, mailbox: str) -> bool:
        """May `identity` do `op` on `mailbox`?  No identity: no."""
        if identity is None:
            return False
        matcher = self._compiled(identity).get(op)
        return matcher is not None and matcher.fullmatch(mailbox) is not None

    def may_any(self, identity: str | None, op: str) -> bool:
        """Does `identity` have any pattern for `op` at all?"""
        return identity is not None and self._compiled(identity).get(op) is not None

    def describe(self, identity: str) -> dict[str, list[str]]:
        """The mailbox patterns in force for `identity`, per operation (for logs and docs)."""
        out: dict[str, list[str]] = {}
        for identity_re, rule in self._identity_res:
            m = identity_re.fullmatch(identity)
            if m is None:
                continue
            for op, patterns in rule.ops.items():
                out.setdefault(op, []).extend(_substitute(p, identity, m.groups()) for p in patterns)
        return out

    def _compiled(self, identity: str) -> dict[str, re.Pattern | None]:
        cached = self._cache.get(identity)
        if cached is not None:
            return cached
        regexes: dict[str, list[str]] = {}
        for identity_re, rule in self._identity_res:
            m = identity_re.fullmatch(identity)
            if m is None:
                continue
            for op, patterns in rule.ops.items():
                regexes.setdefault(op, []).extend(
                    _mailbox_regex(p, identity, m.groups()) for p in patterns)
        compiled = {op: re.compile("|".join(f"(?:{r})" for r in rs)) for op, rs in regexes.items()}
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[identity] = compiled
        return compiled


def _capturing(pattern: str) -> str:
    """An fnmatch pattern as a regex whose every `*` is a capture group."""
    parts = pattern.split("*")
    return "(.*?)".join(_glob_regex(p) for p in parts)


def _glob_regex(pattern: str) -> str:
    """fnmatch.translate without its anchors and flags."""
    if not pattern:
        return ""
    translated = fnmatch.translate(pattern)  # '(?s:...)\\Z'
    assert translated.startswith("(?s:") and translated.endswith(")\\Z")
    return translated[:-2]


def _mailbox_regex(pattern: str, identity: str, groups: tuple[str, ...]) -> str:
    """A mailbox pattern as a regex; substituted captures match literally."""
    out, pos = [], 0
    for m in _CAPTURE_RE.finditer(pattern):
        out.append(_glob_regex(pattern[pos:m.start()]))
        ref = m.group(1)
        out.append(re.escape(identity if ref == "identity" else groups[int(ref) - 1]))
        pos = m.end()
    out.append(_glob_regex(pattern[pos:]))
    return "".join(out)


def _substitute(pattern: str, identity: str, groups: tuple[str, ...]) -> str:
    return _CAPTURE_RE.sub(lambda m: identity if m.group(1) == "identity" else groups[int(m.group(1)) - 1],
                           pattern)

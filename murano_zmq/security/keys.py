"""CURVE key pairs on disk, in the certificate format of pyzmq's zmq.auth.

`murano-zmq keygen NAME --dir D` writes two files with
zmq.auth.create_certificates:

    D/NAME.key          the public key: hand it out, copy it into a relay's
                        authorized-keys directory
    D/NAME.key_secret   the key pair: keep it on the machine that owns it (0600)

A key's *name* is its file name without the extension; the relay knows an
authenticated peer by that name (its identity in the permissions file), so
names use the characters of mailbox names.  Keys are z85 text (40 characters).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from ..protocol.constants import Z85_KEY_LENGTH

log = logging.getLogger("murano_zmq.security")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

_NAME_RE = re.compile(r"[A-Za-z0-9_.:@\-]{1,200}\Z")  # (\Z: "$" would let a final newline through)
_Z85_RE = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")


class KeyFileError(ValueError):
    """A key file, key name or key text that cannot be used."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair as z85 bytes; `secret` is None for a public key only."""

    public: bytes
    secret: bytes | None = None
    name: str = ""

    def __repr__(self) -> str:  # never print a secret key
        return f"KeyPair(name={self.name!r}, public={self.public.decode()!r}, secret={'set' if self.secret else None})"


def check_key_name(name: str) -> str:
    """`name` if it can name a key (and so an identity), else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise KeyFileError(f"invalid key name {name!r}: 1-200 letters, digits and _ . : @ -")
    return name


def is_z85_key(text: str | bytes) -> bool:
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    return bool(_Z85_RE.match(raw))


def create_key_pair(name: str, key_dir: str | os.PathLike = ".", overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret in `key_dir` (created 0700 if missing).

    Refuses to replace existing files unless `overwrite`; the secret file is
    made readable by its owner only.  Returns (public path, secret path).
    """
    check_key_name(name)
    key_dir = Path(key_dir)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path, secret_path = key_dir / (name + PUBLIC_SUFFIX), key_dir / (name + SECRET_SUFFIX)
    if not overwrite:
        for path in (public_path, secret_path):
            if path.exists():
                raise KeyFileError(f"{path} exists; remove it first or pick another name")
    # Create the secret file 0600 before zmq.auth writes into it.
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    public, secret = zmq.auth.create_certificates(str(key_dir), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_key_file(path: str | os.PathLike, need_secret: bool = False) -> KeyPair:
    """A key file (NAME.key or NAME.key_secret) as a KeyPair."""
    path = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    if not is_z85_key(public) or (secret is not None and not is_z85_key(secret)):
        raise KeyFileError(f"{path} does not hold a {Z85_KEY_LENGTH}-character z85 CURVE key")
    if need_secret and secret is None:
        raise KeyFileError(f"{path} holds no secret key (use the {SECRET_SUFFIX} file)")
    name = path.name
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return KeyPair(public, secret, name)


def resolve_key_path(key: str | os.PathLike, key_dir: str | os.PathLike | None, suffix: str) -> Path:
    """A key given as a file path, or as a NAME to find in `key_dir` with `suffix`."""
    path = Path(key)
    if path.is_file():
        return path
    if key_dir is not None and _NAME_RE.match(str(key)):
        candidate = Path(key_dir) / (str(key) + suffix)
        if candidate.is_file():
            return candidate
    where = f" or {Path(key_dir) / (str(key) + suffix)}" if key_dir is not None else ""
    raise KeyFileError(f"no key file {path}{where}")


def load_secret_key(key: "str | os.PathLike | KeyPair", key_dir: str | os.PathLike | None = None) -> KeyPair:
    """A node's or relay's own key pair: a KeyPair, a .key_secret path, or a NAME in key_dir."""
    if isinstance(key, KeyPair):
        if key.secret is None:
            raise KeyFileError(f"key {key.name!r} has no secret part")
        return key
    return load_key_file(resolve_key_path(key, key_dir, SECRET_SUFFIX), need_secret=True)


def load_public_key(key: "str | bytes | os.PathLike | KeyPair", key_dir: str | os.PathLike | None = None) -> bytes:
    """A peer's public key (z85 bytes) from z85 text, a KeyPair, a key file, or a NAME in key_dir."""
    if isinstance(key, KeyPair):
        return key.public
    if isinstance(key, bytes):
        if is_z85_key(key):
            return key
        raise KeyFileError("a public key given as bytes must be 40 characters of z85")
    if isinstance(key, str) and is_z85_key(key) and not Path(key).exists():
        return key.encode("ascii")
    return load_key_file(resolve_key_path(key, key_dir, PUBLIC_SUFFIX)).public


def load_authorized_keys(directory: str | os.PathLike) -> dict[bytes, str]:
    """Public key (z85) -> key name for every NAME.key in `directory`.

    A file that cannot be read, or whose name is not a valid key name, is
    skipped with a warning: one bad file must not lock everybody out on a
    reload.  A key present under two names keeps the first name in sorted
    order (also with a warning).  Raises KeyFileError if the directory is
    missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise KeyFileError(f"authorized-keys directory {directory} {what}")
    keys: dict[bytes, str] = {}
    for path in sorted(directory.glob("*" + PUBLIC_SUFFIX)):
        name = path.name[: -len(PUBLIC_SUFFIX)]
        try:
            check_key_name(name)
            public = load_key_file(path).public
        except KeyFileError as exc:
            log.warning("authorized keys: skipped %s: %s", path, exc)
            continue
        if public in keys:
            log.warning("authorized keys: %s repeats the key of %s; ignored", path.name, keys[public])
            continue
        keys[public] = name
    return keys

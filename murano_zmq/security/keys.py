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

import errno
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from ..protocol.constants import Z85_KEY_LENGTH

log = logging.getLogger("murano_zmq.security")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

# A key file is a few hundred bytes; anything larger is not one.
MAX_KEY_FILE = 64 * 1024

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
    The files are written in a private directory beside them, then renamed
    into place: a secret written over an older file (overwrite) never
    passes through that file's mode, nor through a reader's open copy.
    """
    check_key_name(name)
    key_dir = Path(key_dir)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path, secret_path = key_dir / (name + PUBLIC_SUFFIX), key_dir / (name + SECRET_SUFFIX)
    if not overwrite:
        for path in (public_path, secret_path):
            if path.exists():
                raise KeyFileError(f"{path} exists; remove it first or pick another name")
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=key_dir) as scratch:  # (made 0700)
        # The secret file made 0600 before zmq.auth writes into it.
        os.close(os.open(Path(scratch) / (name + SECRET_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        public, secret = zmq.auth.create_certificates(scratch, name)
        os.chmod(secret, 0o600)
        os.replace(secret, secret_path)
        os.replace(public, public_path)
    return public_path, secret_path


def check_small_file(path: str | os.PathLike, limit: int) -> os.stat_result:
    """`path`'s status if it is a regular file of at most `limit` bytes,
    else OSError: a FIFO blocks the thread that opens it for ever (a key
    reload, a start), a device or a huge file fills memory.  Opened without
    blocking, the status of what would be read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    if st.st_size > limit:
        raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than {limit}")
    return st


def load_key_file(path: str | os.PathLike, need_secret: bool = False) -> KeyPair:
    """A key file (NAME.key or NAME.key_secret) as a KeyPair."""
    path = Path(path)
    try:
        st = check_small_file(path, MAX_KEY_FILE)
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        why = (exc.strerror if isinstance(exc, OSError) else None) or exc  # (pyzmq's OSError has no strerror)
        raise KeyFileError(f"cannot read key file {path}: {why}") from None
    if not is_z85_key(public) or (secret is not None and not is_z85_key(secret)):
        raise KeyFileError(f"{path} does not hold a {Z85_KEY_LENGTH}-character z85 CURVE key")
    if need_secret and secret is None:
        raise KeyFileError(f"{path} holds no secret key (use the {SECRET_SUFFIX} file)")
    if secret is not None and st.st_mode & 0o077:
        log.warning("%s holds a secret key and others may read or write it (mode %o): chmod 600 it",
                    path, st.st_mode & 0o777)
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
    if is_z85_key(str(key)):  # (not repeated: it may be a secret key)
        raise KeyFileError(f"a 40-character z85 key was given where a key file{' or NAME' if key_dir else ''} "
                           "is expected")
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


def public_key_names(directory: str | os.PathLike) -> list[str]:
    """The names of the public key files (NAME.key) in `directory`; OSError
    if it cannot be listed (not Path.glob: it lists an unreadable directory
    as empty, and a reload then removed every key)."""
    return [name for name in os.listdir(directory) if name.endswith(PUBLIC_SUFFIX)]


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
    try:
        names = public_key_names(directory)
    except OSError as exc:
        raise KeyFileError(f"cannot list authorized-keys directory {directory}: {exc.strerror}") from None
    keys: dict[bytes, str] = {}
    for path in sorted(directory / n for n in names):
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

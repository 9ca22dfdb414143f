"""Pure tests of the security pieces: keys on disk, permissions, the
authorized-keys directory, the relay's option checks, the log limiter."""

from __future__ import annotations

import logging
import os
import time

import pytest
import zmq
import zmq.auth

from murano_zmq.security import (
    AuthorizedKeys,
    CurveClient,
    CurveServer,
    KeyFileError,
    Permissions,
    PermissionsError,
    client_curve,
    create_key_pair,
    load_authorized_keys,
    load_key_file,
    load_public_key,
    load_secret_key,
)
from murano_zmq.security.logs import LogRateLimit
from murano_zmq.security.relay import PermissionsFile, RelaySecurity, SecurityConfigError

from ..helpers import wait_for

# --- keys ---------------------------------------------------------------------------


def test_keygen_writes_what_zmq_auth_reads(tmp_path):
    public, secret = create_key_pair("agent-e1-u7", tmp_path / "k")
    assert (public.name, secret.name) == ("agent-e1-u7.key", "agent-e1-u7.key_secret")
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o700
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert zmq.auth.load_certificate(str(public)) == (pub, None)
    assert zmq.curve_public(sec) == pub  # a real key pair
    assert zmq.auth.load_certificates(str(tmp_path / "k")) == {pub: True}
    pair = load_key_file(secret)
    assert (pair.public, pair.secret, pair.name) == (pub, sec, "agent-e1-u7")
    assert "secret" not in repr(pair).replace("secret=", "") and sec.decode() not in repr(pair)


def test_keygen_refuses_to_overwrite_and_bad_names(tmp_path):
    create_key_pair("a", tmp_path)
    with pytest.raises(KeyFileError, match="exists"):
        create_key_pair("a", tmp_path)
    create_key_pair("a", tmp_path, overwrite=True)
    for bad in ("", "../x", "a/b", "a b", ".."):
        with pytest.raises(KeyFileError):
            create_key_pair(bad, tmp_path)


def test_key_loading_by_path_name_and_text(tmp_path):
    public, secret = create_key_pair("relay", tmp_path)
    pub = load_key_file(public).public
    assert load_public_key(public) == pub
    assert load_public_key("relay", tmp_path) == pub
    assert load_public_key(pub) == pub and load_public_key(pub.decode()) == pub
    assert load_secret_key("relay", tmp_path).secret is not None
    with pytest.raises(KeyFileError, match="no secret key"):
        load_secret_key(public)
    with pytest.raises(KeyFileError, match="no key file"):
        load_public_key("nobody", tmp_path)
    with pytest.raises(KeyFileError):
        load_public_key(b"short")
    (tmp_path / "junk.key").write_text("curve\n    public-key = \"not a key\"\n")
    with pytest.raises(KeyFileError, match="z85"):
        load_key_file(tmp_path / "junk.key")


def test_client_curve_needs_both_keys(tmp_path):
    create_key_pair("node", tmp_path)
    create_key_pair("relay", tmp_path)
    assert client_curve() is None
    with pytest.raises(ValueError, match="both"):
        client_curve(curve_key=tmp_path / "node.key_secret")
    with pytest.raises(ValueError, match="both"):
        client_curve(relay_key=tmp_path / "relay.key")
    c = client_curve("node", "relay", tmp_path)
    assert isinstance(c, CurveClient) and c.server_key == load_public_key(tmp_path / "relay.key")
    other = c.for_server(load_public_key(tmp_path / "node.key"))
    assert other.key == c.key and other.server_key != c.server_key
    with pytest.raises(ValueError):
        CurveServer(load_key_file(tmp_path / "relay.key"))  # public only


def test_curve_options_applied_to_sockets(tmp_path):
    create_key_pair("node", tmp_path)
    create_key_pair("relay", tmp_path)
    ctx = zmq.Context()
    try:
        server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        CurveServer(load_secret_key("relay", tmp_path)).apply(server)
        client_curve("node", "relay", tmp_path).apply(client)
        assert server.getsockopt(zmq.CURVE_SERVER) == 1 and server.getsockopt(zmq.MECHANISM) == zmq.CURVE
        assert server.getsockopt(zmq.ZAP_DOMAIN) == b"murano-zmq"
        assert server.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1
        assert client.getsockopt(zmq.MECHANISM) == zmq.CURVE and client.getsockopt(zmq.CURVE_SERVER) == 0
        # No ZAP handler on this context: the server must refuse, not admit any key.
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        assert not server.poll(500)
    finally:
        ctx.destroy(linger=0)


# --- permissions ------------------------------------------------------------------------

RULES = """
[identity."conductor-*"]
send = ["agent.*", "api.results"]
declare = ["agent.*"]

[identity."agent-*-*"]
consume = ["agent.{1}.{2}"]
send = ["conductor.results"]

[identity."*"]
send = ["public.{identity}"]

[identity.ops]
admin = ["*"]
"""


def test_permissions_from_the_issue_example():
    p = Permissions.from_toml(RULES)
    assert p.allows("agent-env1-unit7", "consume", "agent.env1.unit7")
    assert not p.allows("agent-env1-unit7", "consume", "agent.env1.unit8")
    assert not p.allows("agent-env1-unit7", "consume", "agent.env1.unit7.x")
    assert p.allows("agent-env1-unit7", "send", "conductor.results")
    assert not p.allows("agent-env1-unit7", "send", "agent.env1.unit7")
    assert p.allows("conductor-2", "send", "agent.e.u")
    assert not p.allows("conductor-2", "consume", "agent.e.u")
    assert p.allows("ops", "admin", "anything") and p.may_any("ops", "admin")
    assert not p.may_any("conductor-2", "admin")
    assert p.allows("ops", "send", "public.ops") and not p.allows("ops", "send", "public.other")
    assert not p.allows(None, "send", "public.None")
    assert p.describe("agent-e1-u1") == {"consume": ["agent.e1.u1"],
                                         "send": ["conductor.results", "public.agent-e1-u1"]}


def test_substituted_text_matches_literally():
    p = Permissions.from_toml('[identity."agent-*"]\nconsume = ["agent.{1}"]\n')
    # A key name with pattern characters (not a valid key name, but the
    # check must not widen for it).
    assert p.allows("agent-*", "consume", "agent.*")
    assert not p.allows("agent-*", "consume", "agent.other")
    assert not p.allows("agent-?", "consume", "agent.x")


@pytest.mark.parametrize("text, message", [
    ("identity = 3", "table of tables"),
    ("[other]\nx = 1", "unknown top-level"),
    ('[identity.a]\nread = ["x"]', "unknown operation"),
    ('[identity.a]\nsend = "x"', "list of non-empty strings"),
    ('[identity.a]\nsend = [""]', "list of non-empty strings"),
    ('[identity."a-*"]\nsend = ["x.{2}"]', r"uses \{2\}"),
    ("[identity.a\n", "not valid TOML"),
])
def test_bad_permission_files_say_why(text, message):
    with pytest.raises(PermissionsError, match=message):
        Permissions.from_toml(text, "perm.toml")


def test_permissions_file_reloads_and_keeps_the_old_rules_on_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[identity.a]\nsend = ["x"]\n')
    pf = PermissionsFile(path)
    assert pf.allows("a", "send", "x") and not pf.allows("a", "send", "y")
    assert not pf.reload_if_changed()
    path.write_text('[identity.a]\nsend = ["y"]\n')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert pf.reload_if_changed() and pf.allows("a", "send", "y")
    path.write_text("[identity.a\n")
    assert not pf.reload() and pf.allows("a", "send", "y")


# --- authorized keys -------------------------------------------------------------------------


def test_authorized_keys_reload_on_change(tmp_path):
    keys_dir, auth = tmp_path / "keys", tmp_path / "auth"
    auth.mkdir()
    for name in ("a", "b"):
        create_key_pair(name, keys_dir)
    (auth / "a.key").write_bytes((keys_dir / "a.key").read_bytes())
    ak = AuthorizedKeys(auth)
    a, b = load_public_key(keys_dir / "a.key"), load_public_key(keys_dir / "b.key")
    assert ak.name_of(a) == "a" and ak.name_of(a.decode()) == "a" and ak.name_of(b) is None
    assert not ak.reload_if_changed()
    (auth / "b.key").write_bytes((keys_dir / "b.key").read_bytes())
    assert ak.reload_if_changed() and ak.name_of(b) == "b" and ak.names() == ["a", "b"]
    (auth / "a.key").unlink()
    assert ak.reload_if_changed() and ak.name_of(a) is None


def test_authorized_keys_skip_bad_files_and_duplicates(tmp_path, caplog):
    create_key_pair("a", tmp_path / "k")
    auth = tmp_path / "auth"
    auth.mkdir()
    text = (tmp_path / "k" / "a.key").read_bytes()
    (auth / "a.key").write_bytes(text)
    (auth / "z-copy.key").write_bytes(text)
    (auth / "bad.key").write_text("garbage")
    (auth / "bad name.key").write_bytes(text)
    (auth / "a.key_secret").write_text("ignored: not *.key")
    with caplog.at_level(logging.WARNING, "murano_zmq.security"):
        keys = load_authorized_keys(auth)
    assert list(keys.values()) == ["a"]
    assert "repeats the key of a" in caplog.text and "bad.key" in caplog.text
    with pytest.raises(KeyFileError):
        load_authorized_keys(tmp_path / "missing")


def test_a_vanished_directory_keeps_the_keys_in_force(tmp_path):
    create_key_pair("a", tmp_path / "auth")
    ak = AuthorizedKeys(tmp_path / "auth")
    (tmp_path / "auth").rename(tmp_path / "gone")
    assert not ak.reload() and ak.names() == ["a"]


def test_an_unreadable_directory_keeps_the_keys_in_force(tmp_path):
    """Path.glob lists a directory it cannot read as empty: a reload then
    removed every key, and dropped every session.  Run where the process
    cannot read past a mode (root without CAP_DAC_*, by setpriv)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to drop the override of file modes")
    create_key_pair("a", tmp_path / "auth")
    script = (
        "import os, sys\n"
        "from murano_zmq.security import AuthorizedKeys\n"
        "ak = AuthorizedKeys(sys.argv[1])\n"
        "os.chmod(sys.argv[1], 0)\n"
        "print(ak.reload(), ak.reload_if_changed(), ak.names())\n"
    )
    try:
        out = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c",
                              script, str(tmp_path / "auth")], capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(tmp_path / "auth", 0o700)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "False False ['a']", out.stdout + out.stderr
    assert "cannot list authorized-keys directory" in out.stderr and "Permission denied" in out.stderr


def test_a_key_file_that_is_no_regular_file_is_skipped_at_once(tmp_path, caplog):
    """A FIFO blocked the reload thread for ever in open(): every later
    reload, removals included, never came."""
    create_key_pair("a", tmp_path / "auth")
    os.mkfifo(tmp_path / "auth" / "zz-fifo.key")
    (tmp_path / "auth" / "zz-big.key").write_bytes(b"#" * (1 << 20))
    with caplog.at_level(logging.WARNING, "murano_zmq.security"):
        assert list(load_authorized_keys(tmp_path / "auth").values()) == ["a"]
    assert "not a regular file" in caplog.text and "more than" in caplog.text
    os.mkfifo(tmp_path / "perm.toml")
    with pytest.raises(PermissionsError, match="not a regular file"):
        Permissions.load(tmp_path / "perm.toml")


def test_secret_keys_are_neither_echoed_nor_read_by_others_unnoticed(tmp_path, caplog):
    create_key_pair("a", tmp_path)
    secret = load_key_file(tmp_path / "a.key_secret").secret.decode()
    with pytest.raises(KeyFileError) as refused:
        load_secret_key(secret, tmp_path)  # a secret where a key file was meant
    assert secret not in str(refused.value) and "z85 key was given" in str(refused.value)
    os.chmod(tmp_path / "a.key_secret", 0o644)
    with caplog.at_level(logging.WARNING, "murano_zmq.security"):
        load_secret_key("a", tmp_path)
    assert "others may read or write it (mode 644)" in caplog.text
    before = os.stat(tmp_path / "a.key_secret")
    create_key_pair("a", tmp_path, overwrite=True)  # written beside, renamed into place
    after = os.stat(tmp_path / "a.key_secret")
    assert after.st_mode & 0o777 == 0o600 and after.st_ino != before.st_ino
    assert load_key_file(tmp_path / "a.key_secret").secret.decode() != secret
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.key_secret"]


def test_permissions_nested_past_the_parser_say_so():
    with pytest.raises(PermissionsError, match="nested too deeply"):
        Permissions.from_toml("x = " + "[" * 100_000, "perm.toml")


# --- the relay's options ----------------------------------------------------------------------


def test_relay_security_modes(tmp_path):
    create_key_pair("relay", tmp_path / "k")
    (tmp_path / "auth").mkdir()
    perm = tmp_path / "p.toml"
    perm.write_text('[identity.a]\nsend = ["x"]\n')
    key = str(tmp_path / "k" / "relay.key_secret")
    assert not RelaySecurity.from_options().enabled
    assert "open" in RelaySecurity.from_options().describe()
    with pytest.raises(SecurityConfigError, match="--permissions FILE"):
        RelaySecurity.from_options(key)
    with pytest.raises(SecurityConfigError, match="--permissions FILE"):
        RelaySecurity.from_options(key, authorized_keys=str(tmp_path / "auth"))
    with pytest.raises(SecurityConfigError, match="need the relay's own key"):
        RelaySecurity.from_options(permissions=str(perm))
    with pytest.raises(SecurityConfigError, match="exclude each other"):
        RelaySecurity.from_options(key, authorized_keys=str(tmp_path / "auth"), permissions=str(perm),
                                   allow_all=True)
    with pytest.raises(SecurityConfigError, match="needs --authorized-keys"):
        RelaySecurity.from_options(key, permissions=str(perm))
    with pytest.raises(SecurityConfigError, match="does not exist"):
        RelaySecurity.from_options(key, authorized_keys=str(tmp_path / "nope"), allow_all=True)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SecurityConfigError, match="a-file is not a directory"):
        RelaySecurity.from_options(key, authorized_keys=str(tmp_path / "a-file"), allow_all=True)
    (tmp_path / "latin1.toml").write_bytes(b"[identity.ops]\nsend = ['caf\xe9']\n")
    with pytest.raises(SecurityConfigError, match="latin1.toml is not UTF-8 text"):
        RelaySecurity.from_options(key, authorized_keys=str(tmp_path / "auth"), permissions=str(tmp_path / "latin1.toml"))
    full = RelaySecurity.from_options("relay", str(tmp_path / "k"), str(tmp_path / "auth"), str(perm))
    assert full.enabled and full.permissions is not None and "permissions from" in full.describe()
    anykey = RelaySecurity.from_options(key, allow_all=True)
    assert anykey.keys is None and "ANY client key" in anykey.describe()
    (tmp_path / "none").mkdir()
    nokey = RelaySecurity.from_options(key, authorized_keys=str(tmp_path / "none"), allow_all=True)
    assert "every client is refused" in nokey.describe() and "ANY" not in nokey.describe()


# --- logs --------------------------------------------------------------------------------------


def test_log_rate_limit_counts_what_it_suppresses():
    now = [0.0]
    limit = LogRateLimit(window=10, burst=3, clock=lambda: now[0])

    def record(msg, level=logging.WARNING):
        return logging.LogRecord("murano_zmq.relay", level, __file__, 1, msg, (), None)

    passed = [limit.filter(record("malformed %s")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record("another %s"))  # another kind has its own budget
    assert limit.filter(record("malformed %s", logging.INFO))  # below the level: untouched
    now[0] = 11.0
    r = record("malformed %s")
    assert limit.filter(r) and "[7 similar message(s) suppressed]" in r.msg


def test_watcher_reloads_on_poke(tmp_path):
    from murano_zmq.security.auth import Watcher

    calls = []
    w = Watcher(calls.append, interval=60)
    try:
        w.poke()
        wait_for(lambda: calls == [True], 5, what="a forced reload")
    finally:
        w.close()

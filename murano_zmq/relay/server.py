"""The relay process's loop: one ROUTER socket, the engine, the store.

poll -> receive a turn's worth of commands -> engine -> send deliveries ->
commit (one fsync) -> send confirms.  When no more input is waiting the
loop commits itself and sends the confirms at once: a thread hand-off would
only add wake-ups.  When input is waiting (a backlog) the commit goes to a
committer thread so the next turn's parsing overlaps the fsync.  Two
commits may be in flight: the next one writes and COMMITs while the last
one only syncs (store/batched.py commit()), and a turn's confirms go out
only after its own commit returned, synced
(tests/integration/test_confirm_contract.py).  A turn whose
only input is a lone SEND, with nothing due, held or in flight, takes
engine.send_alone(): read, store and commit in one call, confirm.
SIGTERM/SIGINT finish the turn, commit, say BYE to every node and exit 0.
A failed sync of the store stops the relay with exit 1 (Relay._halt).
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import zmq
from zmq import zmq_poll

from ..protocol.constants import FRAME_HEADROOM, PEER_RECEIVE_QUEUE, PEER_SEND_QUEUE
from ..protocol.errors import StartupError
from ..sdnotify import notify
from ..security.logs import limit_log_floods
from ..security.relay import RelaySecurity
from ..store.faults import SyncFailed
from ..store.lock import DataDirLock
from ..store.open import StandbyStopped, is_sqlite, open_store
from ..store.space import RESERVE_BYTES, SPACE_LOW_BYTES, SPACE_PROBE_BYTES
from ..store.journal import OWED_ROWS
from ..store.sqlite import SQLiteStore, StoreError, startup_error
from ..zmqio import input_probe
from .config import RelayConfig
from .engine import RelayEngine
from .faults import DISK_FULL, WRITES_FAILING, DescriptorWatch, FailureLog, prepare_data_dir
from .wire import Wire

log = logging.getLogger("murano_zmq.relay")


# While the disk is full, how often the relay checks whether space returned.
SPACE_PROBE_EVERY = 1.0
# How often it looks at its disk's free space otherwise (statvfs, ~1 us),
# and after how many bytes of commands read: a burst of pipelined sends
# filled a small disk between two looks 50 ms apart.
SPACE_CHECK_EVERY = 0.05
SPACE_CHECK_BYTES = 1 << 20
# Threaded commits at once: one writing or COMMITting, the one before it syncing.
MAX_IN_FLIGHT = 2


class Relay(Wire):
    """A relay bound to `config.bind`, storing in `config.data_dir`.

    run() blocks until stop() (from any thread) or a signal when
    install_signal_handlers() was called.
    """

    def __init__(self, config: RelayConfig, context: zmq.Context | None = None,
                 store_factory=SQLiteStore):
        self.config = config
        self._store_factory = store_factory  # tests wrap the store (tests/integration/test_confirm_contract.py)
        self.security = RelaySecurity.from_options(config.key, config.key_dir, config.authorized_keys,
                                                   config.permissions, config.allow_all)
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.endpoint: str | None = None
        self.engine: RelayEngine | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stalled: set[bytes] = set()  # peers whose send queue was full
        self.bytes_read = 0  # command bytes read since the last look at the disk's free space
        self._in_flight: list[tuple[Future, list]] = []  # threaded commits and the replies each holds
        self._failures = FailureLog()
        # The store failure that stopped the relay (a failed sync), if one did.
        self.halted_by: StoreError | None = None
        self._next_space_probe = 0.0
        os.set_blocking(self._wake_w, False)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop())
        signal.signal(signal.SIGHUP, lambda signum, frame: self.security.reload_soon())

    def stop(self) -> None:
        self._stop.set()
        self._poke()

    def _poke(self) -> None:
        """Wake the loop (a signal, or a commit that finished)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def run(self) -> None:
        """Serve until stopped, or until a sync of the store fails
        (`halted_by` then holds why).  StartupError (one line for the
        operator) if the data directory, the database or the endpoint is
        unusable."""
        cfg = self.config
        lock = store = sock = None
        try:
            if is_sqlite(cfg.store):
                prepare_data_dir(cfg.data_dir, cfg.create_parents)
                lock = DataDirLock(cfg.data_dir).acquire()
                store = self._store_factory(cfg.data_dir)
            else:  # PostgreSQL: the store holds a lock in the database instead
                try:
                    store = open_store(cfg.store, cfg.data_dir, self._stop if cfg.standby else None,
                                       shared=cfg.shared)
                except StandbyStopped:
                    log.info("standby relay stopped")
                    return
            sock = self._bind()
            self.engine = self._new_engine(store)
            if not (store.hold_reserve() and store.space_available()):
                self._storage_full("is full at start")
            self._watch_space(self.engine)  # (nearly full)
            metrics = self._serve_metrics(store)  # first: a taken port stops the start before any advert
            try:
                discovery = self._advertise()
            except BaseException:
                if metrics is not None:
                    metrics.close()
                raise
            # (only now: a start that fails says one line, not "listening" and then why not)
            log.info("relay %s listening on %s, data in %s", cfg.name, self.endpoint, store.path)
            self._ready.set()
            notify(f"READY=1\nSTATUS=serving on {self.endpoint}")  # systemd Type=notify
            try:
                self._loop(sock)
            except Exception:
                # (main prints one line; the traceback is what a report needs)
                log.critical("the relay stops on an unexpected error (a bug: please report it with this "
                             "traceback)", exc_info=True)
                raise
            finally:
                if discovery is not None:
                    discovery.close()
                if metrics is not None:
                    metrics.close()
            notify("STOPPING=1")
            engine = self.engine
            engine.shutdown()
            self._send(sock, engine.take_output(time.time()))
            if self.halted_by is None:  # (after a failed sync nothing more is committed)
                try:
                    engine.commit()
                except StoreError as exc:
                    log.error("last commit failed (%s): nodes resend what was not confirmed", exc)
            log.info("relay stopped")
        finally:
            self._ready.set()
            self.security.close()
            if sock is not None:
                sock.close()
            if store is not None:
                try:
                    store.close()
                except StoreError as exc:  # (its last commit; after a failed sync it commits nothing)
                    log.error("closing the store failed (%s): nodes resend what was not confirmed", exc)
            if lock is not None:
                lock.release()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _bind(self) -> zmq.Socket:
        cfg = self.config
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_size + FRAME_HEADROOM)
        # Durable traffic must never meet a silent high-water-mark drop:
        # the relay bounds what it sends by consumer credit instead.
        sock.setsockopt(zmq.SNDHWM, PEER_SEND_QUEUE)
        sock.setsockopt(zmq.RCVHWM, PEER_RECEIVE_QUEUE)
        try:
            self.security.secure(sock)
            sock.bind(cfg.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise StartupError(f"cannot bind {cfg.bind}: {exc}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _new_engine(self, store: SQLiteStore) -> RelayEngine:
        """An engine over what the store holds (recovery, as after a restart)."""
        cfg = self.config
        try:
            engine = RelayEngine(store, time.time(), cfg.name, cfg.max_message_size)
        except (sqlite3.DatabaseError, StoreError) as exc:  # the store cannot be read back
            raise startup_error(store.path, exc) from None
        engine.permissions = self.security.permissions
        return engine

    def _store_failed(self, sock: zmq.Socket, exc: Exception) -> bool:
        """A store write or commit failed, and SQLite dropped every write since
        the last commit: the engine's memory is now ahead of the disk.  Start
        over from the store, as a restart would, without the process dying:
        tell every node BYE (they resend what was not confirmed and consume
        again), drop the replies the lost writes owed, reload.  A full disk
        leaves the new engine refusing sends (StorageFull) until space returns.
        But if a sync of COMMITted writes failed, this one or any other met
        meanwhile (a threaded commit's), halt instead: False."""
        failures = [exc, *self._drain_in_flight(sock)]
        lost = [e for e in failures if isinstance(e, StoreError) and e.lock_lost]
        if lost:  # (another relay serves the database now: reloading would serve it twice)
            self._halt(lost[0])
            return False
        unsynced = [e for e in failures if isinstance(e, StoreError) and e.unsynced]
        failed_sync = self.engine.store.sync_failed
        if unsynced or failed_sync is not None:
            self._halt(unsynced[0] if unsynced
                       else StoreError(SyncFailed(f"syncing the store failed: {failed_sync}")))
            return False
        full = isinstance(exc, StoreError) and exc.full
        again = self._failures.note(exc, full)
        old = self.engine
        old.shutdown()
        self._send(sock, old.take_output(time.time()))
        try:
            # (True: it gave the reserve to confirmed rows it put back, the journal's: store/sqlite.py)
            full = old.store.rollback() or full
        except StoreError as unsynced:  # (rows it could not put back)
            self._halt(unsynced)
            return False
        self.engine = self._new_engine(old.store)
        why = DISK_FULL if full else WRITES_FAILING if again else old.refusal
        if why:
            self._storage_full(None, why)
        return True

    def _halt(self, exc: StoreError) -> None:
        """A sync of committed writes failed (store/faults.py SyncFailed):
        stop, as PostgreSQL does, rather than start over in this process,
        where a later sync could succeed over pages the disk never got and
        the relay would confirm a resend it finds "stored" in them.  Nothing
        after the last good sync was confirmed; restarted, the relay copies
        the WAL into the database first (SQLiteStore._open) and nodes resend
        the rest.  Or the relay lock went to a standby (LockLost): stop, the
        standby serves (what this relay committed stays; what it did not
        was not confirmed)."""
        self.halted_by = exc
        if exc.lock_lost:
            log.critical("%s: %s: the relay stops, another relay serves the database now; nodes resend "
                         "what was not confirmed (docs/scale-out.md, 'A standby relay')", self.engine.store.path, exc)
            return
        log.critical("%s: %s: the relay stops without confirming anything more; restart it "
                     "(systemd's Restart=on-failure does) and nodes resend what was not confirmed "
                     "(docs/operations.md, 'A failed sync')", self.config.data_dir, exc)

    def _storage_full(self, when: str | None, why: str = DISK_FULL, keep_reserve: bool = False) -> None:
        """Refuse sends until space returns (or, `why` another cause, until
        a probe write succeeds); give the reserve to SQLite so acks still
        commit (not yet if the disk is only nearly full)."""
        self.engine.storage_full = why
        if why == DISK_FULL and not keep_reserve:
            # (failing writes: a read-only mount, a directory it may not write, need no room)
            self.engine.store.drop_reserve()
        self._next_space_probe = time.monotonic() + SPACE_PROBE_EVERY
        if when:
            log.error("the disk of %s %s: refusing sends (StorageFull) until %d MiB are free beside the relay's "
                      "%d MiB reserve and its WAL; delivery and acks go on", self.config.data_dir, when,
                      (SPACE_LOW_BYTES + SPACE_PROBE_BYTES) >> 20, RESERVE_BYTES >> 20)

    def _watch_space(self, engine: RelayEngine) -> None:
        """(every SPACE_CHECK_EVERY) Refuse sends before the disk is full:
        below SPACE_LOW_BYTES free beside the WAL, or when a WAL checkpoint
        found no room."""
        if engine.storage_full:
            return
        store = engine.store
        if store.checkpoint_out_of_space:
            self._storage_full("has no room for a WAL checkpoint (the reserve goes to it)")
        elif store.space_low():
            self._storage_full(f"is nearly full (less than {SPACE_LOW_BYTES >> 20} MiB free beside the WAL's "
                               "size: kept for a checkpoint and acks)", keep_reserve=True)

    def _check_space(self, engine: RelayEngine) -> None:
        """While sends are refused (a full disk, failing writes), see if
        the store can take them again."""
        now = time.monotonic()
        if now < self._next_space_probe:
            return
        self._next_space_probe = now + SPACE_PROBE_EVERY
        if engine.store.checkpoint_out_of_space:
            # Not before the WAL is in the database: else every commit,
            # acks too, grows it on (with the reserve's room, if given back).
            engine.store.retry_checkpoint()
            return
        if (engine.store.hold_reserve() and engine.store.space_available() and engine.store.writable()
                and not engine.store.space_low(SPACE_PROBE_BYTES)):
            if engine.refusal == DISK_FULL:
                log.warning("disk space is back in %s: accepting sends again", self.config.data_dir)
            else:
                log.warning("a probe write in %s succeeded: accepting sends again", self.config.data_dir)
            engine.storage_full = False

    def _serve_metrics(self, store: SQLiteStore):
        if not self.config.metrics:
            return None
        from .metrics import MetricsServer

        # The engine is read on each scrape: a store failure replaces it.
        return MetricsServer(self.config.metrics, lambda: self.engine, store)

    def _advertise(self):
        """Advertise the relay by zeroconf when discovery interfaces are set."""
        interfaces = self.config.discovery_interfaces
        if not interfaces:
            return None
        from ..discovery.zeroconf import Advert, Discovery, parse_interfaces

        endpoint = self.endpoint
        for wildcard in ("0.0.0.0", "*"):
            if f"//{wildcard}:" in endpoint:
                chosen = parse_interfaces(interfaces)
                host = chosen[0] if isinstance(chosen, list) else "127.0.0.1"
                endpoint = endpoint.replace(f"//{wildcard}:", f"//{host}:")
        discovery = Discovery(interfaces)
        key = self.security.key.public.decode() if self.security.key is not None else ""
        discovery.advertise(Advert(self.config.name, "relay", endpoint, key=key))
        log.info("relay advertised by zeroconf on %s as %s", interfaces, endpoint)
        return discovery

    def _loop(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._wakeup_fd = self.engine.wakeup_fd  # several relays: their commits wake this one
        if self._wakeup_fd is not None:
            poller.register(self._wakeup_fd, zmq.POLLIN)
        committer = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="relay-commit")
        self._in_flight = []
        check_due = 0.0  # when to ask the store whether it is still this relay's (store.check_held)
        descriptors = DescriptorWatch()
        space_due = 0.0  # when to look at the disk's free space next (time.monotonic())
        # Bound once: an attribute of a zmq.Socket goes through its
        # __getattr__ hook, several times the cost of a plain lookup.
        self._recv, self._has_input = sock.recv, input_probe(sock)
        try:
            while not self._stop.is_set():
                try:
                    self._turn(sock, poller, self.engine, committer, check_due)
                    # While the consumers work on what they got: read their
                    # windows ahead, then run their acks' deletes (whose
                    # commit waits: relay/turn.py), so that neither is left
                    # for the turn their next ACK or CONSUME waits on.
                    if self.engine.windows_low and not self._has_input():
                        self.engine.top_up()
                    if not self._in_flight and self.engine.deletes_unwritten and not self._has_input():
                        self.engine.write_held_deletes()
                    now = time.time()
                    if now >= check_due:
                        check_due = self.engine.store.check_held(now)
                    ticks = time.monotonic()
                    if ticks >= space_due or self.bytes_read >= SPACE_CHECK_BYTES:
                        space_due, self.bytes_read = ticks + SPACE_CHECK_EVERY, 0
                        self._watch_space(self.engine)
                        if ticks >= descriptors.due:
                            descriptors.check(ticks)
                except (StoreError, sqlite3.DatabaseError) as exc:
                    if not self._store_failed(sock, exc):
                        break  # (halted)
        finally:
            for exc in self._drain_in_flight(sock):
                if self.halted_by is None:  # (else the same failed sync: said once)
                    log.error("last commit failed (%s): nodes resend what was not confirmed", exc)
            committer.shutdown()

    def _turn(self, sock, poller, engine: RelayEngine, committer: ThreadPoolExecutor, check_due: float) -> None:
        now = time.time()
        deadline = min(engine.next_deadline(), check_due)
        timeout_ms = int(max(0.0, min(1.0, deadline - now)) * 1000) + 1
        events = dict(zmq_poll(poller.sockets, timeout_ms))  # (Poller.poll's checks cost more than they guard)
        first = None
        if len(events) == 1 and sock in events and not self._in_flight and not self._stalled \
                and not self.security.enabled:
            # Only the socket woke us, nothing in flight: maybe a lone send.
            now = time.time()
            first = self._read_one(sock)
            if first is None:
                return  # (a stale poll)
            if now < deadline and not self._has_input():
                # Nothing due and nothing more waiting: a lone SEND is stored,
                # committed and confirmed at once (engine.send_alone).
                out = engine.send_alone(first[0], first[1:], now)
                if out is not None:
                    try:
                        self._send(sock, out)
                    finally:  # (rows the journal took, into the database: store/journal.py)
                        engine.store.write_owed(OWED_ROWS)
                    return
        # Not a lone send: the rows the journal took go into the database
        # first, where this turn's reads and writes look for them.
        engine.store.write_owed()
        if self._wake_r in events:
            os.read(self._wake_r, 64)
        if self._wakeup_fd is not None and self._wakeup_fd in events:
            engine.wake()
            if engine.wakeup_fd != self._wakeup_fd:  # (reconnected)
                poller.unregister(self._wakeup_fd)
                self._wakeup_fd = engine.wakeup_fd
                poller.register(self._wakeup_fd, zmq.POLLIN)
        if self._in_flight:
            self._send_finished(sock)
        if engine.storage_full:
            self._check_space(engine)
        now = time.time()
        self.security.sweep(engine, now)  # sessions of keys removed since the last turn
        while self._stalled:
            engine.drop_session(self._stalled.pop(), "not reading (its send queue is full)", now)
        commands, waiting = self._read(sock, engine, now, sock in events, first)
        engine.tick(now)
        engine.pump(now)
        out = engine.take_output(now)
        if out:
            self._send(sock, out)
        # A backlog: input waiting (the read stopped at its budget), or a
        # turn with several commands (a pipelining sender keeps more coming
        # while this turn syncs).  Input that arrived since _read() checked
        # is read next turn either way.
        backlog = commands > 1 or waiting
        if backlog and self._in_flight and (len(self._in_flight) >= MAX_IN_FLIGHT or engine.store.writing):
            return  # read on; this turn's writes join the next commit
        # (Else the commit in flight holds no writer now, mostly because it
        # only syncs: this one writes and COMMITs, or waits for the writer,
        # and syncs after it: store/batched.py commit().)
        if engine.hold_deletes(now):
            return  # acks alone: a later commit takes them (relay/turn.py)
        held = engine.prepare_commit()
        if not held and not engine.store.in_transaction:
            return
        if backlog:
            # More input is waiting: sync in a committer thread while the
            # next turn parses it.  Its replies go when the commit returned.
            future = committer.submit(engine.store.commit)
            future.add_done_callback(lambda _: self._poke())
            self._in_flight.append((future, held))
            return
        # Nothing waiting: a hand-off to a thread would only add two wake-ups.
        engine.store.commit()  # a failed commit raises StoreError: see _store_failed
        self._send(sock, held)

    def _drain_in_flight(self, sock: zmq.Socket) -> list[Exception]:
        """Wait for every threaded commit and send the replies of those that
        succeeded (a failed one's replies stand for nothing); their failures."""
        failed = []
        for future, held in self._in_flight:
            try:
                future.result()
            except (StoreError, sqlite3.Error) as exc:
                failed.append(exc)
                continue
            self._send(sock, held)
        self._in_flight = []
        return failed

    def _send_finished(self, sock: zmq.Socket) -> None:
        """Send the replies of the threaded commits that have returned (in
        any order: each returned after a sync of its own COMMIT).  A failed
        one raises StoreError and stays, for _store_failed."""
        for entry in [e for e in self._in_flight if e[0].done()]:
            future, held = entry
            future.result()
            self._in_flight.remove(entry)
            self._send(sock, held)


def run_relay(config: RelayConfig) -> int:
    """The relay device's main: run until SIGTERM/SIGINT (exit code 0) or a
    failed sync of the store (then the process exits 1 here)."""
    limit_log_floods()  # a hostile peer must not be able to fill the disk with warnings
    relay = Relay(config)
    relay.install_signal_handlers()
    relay.run()
    if relay.halted_by is not None:
        # Exit without Python's teardown, which would close the store's
        # connections and let SQLite checkpoint the WAL (BatchedStore.close).
        logging.shutdown()
        os._exit(1)
    return 0

"""The relay engine: mailboxes, consumers and credit, deadlines and expiry.

No sockets here.  The relay process hands the engine (identity, frames)
pairs and the time; the engine reads and writes the store and queues
(identity, frames) replies.  One loop turn is:

    receive()...  tick()  pump()  take_output()  commit()  take_output()

Replies that promise durability (CONFIRM, DECLARE's REPLY) are held until
commit() has made the turn's writes durable; deliveries and errors go out
before the commit, so a consumer works while the disk syncs.  A delivery of
a message whose commit then never happens is safe: its sender was not
confirmed and sends it again, and the receiving node's dedup absorbs it.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any, Callable

import msgpack

from ..protocol.constants import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEARTBEAT_LIVENESS,
    OVERFLOW_REJECT,
)
from ..protocol.errors import (
    MailboxFull,
    MailboxNotFound,
    Malformed,
    MessageTooLarge,
    NotReady,
    PermissionDenied,
    PreconditionFailed,
    RelayError,
    RemoteProtocolError,
    StorageFull,
    error_from_code,
)
from ..protocol.frames import Cmd, decode, encode
from ..protocol.message import check_name, is_number, parse_send_record
from ..protocol.options import MailboxOptions
from ..protocol.errors import LocalProtocolError
from ..store.base import MailboxRow, Store, StoredMessage
from .admin import HANDLERS as ADMIN_HANDLERS
from .state import READY_WINDOW, Consumer, Mailbox, Peer

log = logging.getLogger("murano_zmq.relay")

# Bounds a peer cannot exceed (they size the relay's memory).
MAX_PREFETCH = 10_000
MIN_HEARTBEAT = 0.05
MAX_HEARTBEAT = 60.0
EXPIRY_BATCH = 1000
# More than the seqs two loop turns can hand out before their commits (the
# turn committing and the one being read): see _recover().
SEQ_GAP_AFTER_START = 1 << 24
MAX_ENDPOINT = 512

_EMPTY_HEADERS = msgpack.packb({})

Output = tuple[bytes, list[bytes]]


class RelayEngine:
    def __init__(self, store: Store, now: float, name: str = "relay",
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.store = store
        self.name = name
        self.max_message_size = max_message_size
        # Who may do what (security.relay.PermissionsFile, or any object with
        # allows(identity, op, mailbox) and may_any(identity, op)); None:
        # every peer may do everything (an open relay, or --allow-all).
        self.permissions = None
        # Set by the relay process while the disk is full: nothing new is
        # stored (sends and new mailboxes get StorageFull); delivery and
        # acks go on.
        self.storage_full = False
        self._user: str | None = None  # identity behind the command being handled
        self._key: str | None = None  # its CURVE public key (z85), if the relay has CURVE
        self._peer_users: dict[bytes, str | None] = {}  # routing id -> identity at HELLO
        self.peers: dict[bytes, Peer] = {}
        self.mailboxes: dict[str, Mailbox] = {}
        self._by_id: dict[int, Mailbox] = {}
        self._unacked: dict[int, Consumer] = {}  # seq -> consumer holding it
        self._now_out: list[Output] = []
        self._after_commit: list[Output] = []
        # CONFIRMs of this turn, encoded at prepare_commit(): until the store
        # has taken the rows, an id stored before can still turn up as a
        # duplicate, and its sender must hear of it.  (identity, req, errors)
        self._confirms: list[tuple[bytes, int, list]] = []
        self._origins: dict[int, tuple[list, int]] = {}  # seq -> (its SEND's errors, record index)
        # Store writes not yet handed to the store, in order: ("insert", rows)
        # or ("delete", seqs).  Buffering lets a turn's work overlap the
        # previous turn's commit, which may still hold the store.
        self._writes: list[tuple[str, list]] = []
        self._dirty: set[Mailbox] = set()  # mailboxes that may deliver now
        self._idle_heap: list[tuple[float, int, str]] = []  # (deadline, mailbox id, name)
        self._next_message_expiry: float | None = None
        self.counters = {"received": 0, "delivered": 0, "acked": 0, "expired": 0,
                         "dead_lettered": 0, "rejected": 0,
                         # for relay/metrics.py (RabbitMQ's names)
                         "confirmed": 0, "refused": 0, "redelivered": 0, "dead_lettered_expired": 0,
                         "dead_lettered_rejected": 0, "dead_lettered_maxlen": 0}
        self._recover(now)

    # --- recovery --------------------------------------------------------------

    def _recover(self, now: float) -> None:
        stats = self.store.mailbox_stats()
        # Messages stored before this start may have been out for delivery.
        self._boot_seq = self.store.max_seq()
        # Deliveries go out before their commit, so a crashed relay may have
        # handed out tags above the last committed seq; a node may still ack
        # one of them.  Numbering past every such tag keeps a late ACK from
        # settling a newer message.
        self._seq = self._boot_seq + SEQ_GAP_AFTER_START
        self.store.reserve_seq(self._seq)  # durable now: a crash before any commit skips them too
        self._next_mailbox_id = 1
        for row in self.store.load_mailboxes():
            count, nbytes = stats.get(row.id, (0, 0))
            mb = Mailbox(row.id, row.name, MailboxOptions.from_map(row.options), row.declared, now,
                         count=count, nbytes=nbytes, disk_after=0 if count else None)
            self._add_mailbox(mb)
            self._next_mailbox_id = max(self._next_mailbox_id, row.id + 1)
        self._next_message_expiry = self.store.next_expiry(float("-inf"))
        if self.mailboxes:
            log.info("recovered %d mailboxes, %d messages", len(self.mailboxes),
                     sum(mb.count for mb in self.mailboxes.values()))

    # --- input -------------------------------------------------------------------

    def receive(self, identity: bytes, frames: list[bytes], now: float, user: str | None = None,
                key: str | None = None) -> None:
        """Handle one command from the peer `identity`.  Bad input gets an
        ERROR reply and a log line; it never raises.

        `user` is the authenticated identity (a key name) of the connection
        the command came on, checked against `permissions`; `key` its CURVE
        public key (z85), kept with a session at HELLO for LOOKUP."""
        try:
            command = decode(frames)
        except RemoteProtocolError as exc:
            log.warning("malformed command from %s: %s", identity.hex(), exc)
            self._error(identity, None, error_from_code(exc.code, str(exc)))
            return
        peer = self.peers.get(identity)
        if peer is None and command.cmd != Cmd.HELLO:
            if command.cmd not in (Cmd.BYE, Cmd.HEARTBEAT):
                req = command.fields[0] if command.fields and isinstance(command.fields[0], int) else None
                self._error(identity, req, NotReady("say HELLO first"))
            else:
                self._error(identity, None, NotReady("say HELLO first"))
            return
        if peer is not None:
            peer.last_heard = now
        handler = self._HANDLERS.get(command.cmd)
        if handler is None:
            self._error(identity, None, Malformed(f"a node does not send {command.cmd.name}"))
            return
        try:
            if peer is not None and self._peer_users.get(identity) != user:
                raise PermissionDenied("this session belongs to another identity")
            self._user = user
            self._key = key
            handler(self, peer or identity, now, *command.fields)
            if command.cmd == Cmd.HELLO:
                self._peer_users[identity] = user
        except RelayError as exc:
            req = command.fields[0] if command.fields and isinstance(command.fields[0], int) else None
            self._error(identity, req, exc)

    def refuse(self, identity: bytes, frames: list[bytes], why: str, now: float) -> None:
        """Answer a command whose connection may no longer talk to the relay
        (its key left the authorized keys): ERROR 403 to the request, and the
        peer's session is dropped (its unacked messages go back to their
        mailboxes).  Nothing stored changes."""
        req = None
        try:
            fields = decode(frames).fields
            req = fields[0] if fields and isinstance(fields[0], int) and not isinstance(fields[0], bool) else None
        except RemoteProtocolError:
            pass
        peer = self.peers.get(identity)
        if peer is not None:
            self._drop_peer(peer, why, now)
        log.warning("refused a command from %s: %s", identity.hex(), why)
        self._error(identity, req, PermissionDenied(why))

    def drop_sessions(self, keep: Callable[[str | None], bool], why: str, now: float) -> int:
        """Drop every session whose identity `keep` rejects (its key was
        removed): it gets ERROR 403, its unacked messages go back to their
        mailboxes, and nothing more is delivered to it.  Returns how many."""
        dropped = 0
        for identity, user in list(self._peer_users.items()):
            peer = self.peers.get(identity)
            if peer is not None and not keep(user):
                self._drop_peer(peer, f"{user}: {why}", now)
                self._error(identity, None, PermissionDenied(why))
                dropped += 1
        return dropped

    def _allowed(self, op: str, mailbox: str) -> bool:
        """May the identity behind the current command do `op` on `mailbox`?"""
        if self.permissions is None or self.permissions.allows(self._user, op, mailbox):
            return True
        log.warning("denied: %s may not %s %s", self._user or "an unidentified peer", op, mailbox)
        return False

    def _check(self, op: str, mailbox: str) -> None:
        if not self._allowed(op, mailbox):
            raise PermissionDenied(f"{self._user or 'this peer'} may not {op} {mailbox!r}")

    def _on_hello(self, who: Peer | bytes, now: float, name: str, instance: bytes, heartbeat: float) -> None:
        identity = who.identity if isinstance(who, Peer) else who
        if isinstance(who, Peer):
            self._drop_peer(who, "HELLO again", now)
        for other in list(self.peers.values()):
            # Only the same identity may take over a session (a hostile peer
            # that learnt an instance id must not kick its owner off).
            if other.instance == instance and self._peer_users.get(other.identity) == self._user:
                self._drop_peer(other, "reconnected as a new session", now)
        if not is_number(heartbeat):
            raise Malformed("heartbeat must be a finite number of seconds")
        heartbeat = min(max(float(heartbeat), MIN_HEARTBEAT), MAX_HEARTBEAT)
        self.peers[identity] = Peer(identity, name[:200], instance, heartbeat, now, now, key=self._key)
        log.info("node %s connected", name[:200])
        self._reply_now(identity, Cmd.WELCOME, self.name, heartbeat, self.max_message_size)

    def _on_heartbeat(self, peer: Peer, now: float) -> None:
        pass

    def _on_bye(self, peer: Peer, now: float, reason: str) -> None:
        self._drop_peer(peer, f"said bye: {reason}"[:200], now)

    def _on_declare(self, peer: Peer, now: float, req: int, name: str, options: dict) -> None:
        name = _valid_name(name)
        self._check("declare", name)
        options = dict(options)
        passive = bool(options.pop("passive", False))
        try:
            opts = MailboxOptions.from_map(options)
        except (ValueError, TypeError) as exc:
            raise Malformed(str(exc)) from None
        if opts.dead_letter is not None:
            self._check("send", opts.dead_letter)  # dead letters are sends to it
        mb = self.mailboxes.get(name)
        if passive:
            if mb is None:
                raise MailboxNotFound(f"mailbox {name!r} does not exist")
        elif mb is None:
            if self.storage_full:
                raise StorageFull("the relay's disk is full: no new mailbox until space returns")
            mb = self._create_mailbox(name, opts, True, now)
        elif not mb.declared:
            mb.options, mb.declared = opts, True
            self._save_mailbox(mb)
            self._schedule_idle(mb)
        elif mb.options != opts:
            raise PreconditionFailed(
                f"mailbox {name!r} exists with options {mb.options.to_map()}, not {opts.to_map()}"
            )
        mb.last_used = now
        self._after_commit.append((peer.identity, encode(Cmd.REPLY, req, mb.status(now))))

    def _on_delete(self, peer: Peer, now: float, req: int, name: str) -> None:
        self._check("admin", _valid_name(name))
        mb = self.mailboxes.get(name)
        if mb is None:
            raise MailboxNotFound(f"mailbox {name!r} does not exist")
        if mb.consumers:
            raise PreconditionFailed(f"mailbox {name!r} has {len(mb.consumers)} consumer(s)")
        self._delete_mailbox(mb, "deleted by " + peer.name)
        self._after_commit.append((peer.identity, encode(Cmd.REPLY, req, None)))

    def _on_status(self, peer: Peer, now: float, req: int) -> None:
        mailboxes = self.mailboxes.values()
        if self.permissions is not None:  # only what this identity may administer
            if not self.permissions.may_any(self._user, "admin"):
                raise PermissionDenied(f"{self._user or 'this peer'} may not see the relay's status")
            mailboxes = [mb for mb in mailboxes if self.permissions.allows(self._user, "admin", mb.name)]
        result = {
            "relay": self.name,
            "peers": len(self.peers),
            "counters": dict(self.counters),
            "storage_full": self.storage_full,
            "mailboxes": [mb.status(now) for mb in sorted(mailboxes, key=lambda m: m.name)],
        }
        self._reply_now(peer.identity, Cmd.REPLY, req, result)

    def _on_send(self, peer: Peer, now: float, req: int, records: list) -> None:
        errors: list[list] = []
        parsed = []
        for i, record in enumerate(records):
            try:
                msg = parse_send_record(record)
            except RemoteProtocolError as exc:
                errors.append([i, Malformed.code, str(exc)])
                continue
            if not self._allowed("send", msg.mailbox):
                errors.append([i, PermissionDenied.code,
                               f"{self._user or 'this peer'} may not send to {msg.mailbox!r}"])
                continue
            headers = msgpack.packb(msg.headers) if msg.headers else _EMPTY_HEADERS
            size = len(msg.body) + (len(headers) if msg.headers else 0)
            if size > self.max_message_size:
                errors.append([i, MessageTooLarge.code,
                               f"message of {size} bytes is over the relay's limit of "
                               f"{self.max_message_size}"])
                continue
            parsed.append((i, msg, headers))
        retried = [m.msg_id for _, m, _ in parsed if m.retry]
        if retried:
            self._flush_writes()
            already = self.store.existing_ids(retried)
        else:
            already = ()
        for i, msg, headers in parsed:
            if msg.msg_id in already:
                continue  # stored by an earlier attempt: confirm again
            if self.storage_full:
                errors.append([i, StorageFull.code, "the relay's disk is full: not stored; send it again later"])
                continue
            mb = self.mailboxes.get(msg.mailbox) or self._create_mailbox(
                msg.mailbox, MailboxOptions(), False, now)
            ttl = msg.ttl if msg.ttl is not None else mb.options.message_ttl
            try:
                # A retried record may have been delivered before the relay
                # lost it uncommitted: count that possible delivery.
                row = self._enqueue(mb, msg.msg_id, headers, msg.body, msg.created,
                                    None if ttl is None else now + ttl, int(msg.retry), now)
                self._origins[row.seq] = (errors, i)
            except MailboxFull as exc:
                self.counters["rejected"] += 1
                errors.append([i, exc.code, exc.text])
        self.counters["received"] += len(records)
        self._confirms.append((peer.identity, req, errors))

    def _on_consume(self, peer: Peer, now: float, req: int, cid: int, name: str, prefetch: int,
                    endpoint: str | None) -> None:
        name = _valid_name(name)
        self._check("consume", name)
        if not 1 <= prefetch <= MAX_PREFETCH:
            raise Malformed(f"prefetch must be 1..{MAX_PREFETCH}, got {prefetch}")
        if endpoint is not None and len(endpoint) > MAX_ENDPOINT:
            raise Malformed(f"endpoint longer than {MAX_ENDPOINT} characters")
        old = peer.consumers.get(cid)
        if old is not None:
            self._drop_consumer(old, now)
        mb = self.mailboxes.get(name) or self._create_mailbox(name, MailboxOptions(), False, now)
        consumer = Consumer(peer, cid, mb, prefetch, endpoint)
        peer.consumers[cid] = consumer
        mb.consumers.append(consumer)
        mb.last_used = now
        self._dirty.add(mb)
        self._reply_now(peer.identity, Cmd.REPLY, req, mb.status(now))

    def _on_lookup(self, peer: Peer, now: float, req: int, name: str) -> None:
        """Where a mailbox's consumers take direct deliveries (with the CURVE
        key each consumer's session authenticated with, for the sender to
        pin), and its depth: a sender goes direct only once the relay holds
        nothing for it."""
        self._check("send", _valid_name(name))
        mb = self.mailboxes.get(name)
        result = {"mailbox": name, "exists": mb is not None, "depth": mb.count if mb else 0,
                  "direct": [[c.peer.name, c.endpoint, c.peer.key] for c in (mb.consumers if mb else ())
                             if c.endpoint]}
        self._reply_now(peer.identity, Cmd.REPLY, req, result)

    def _on_cancel(self, peer: Peer, now: float, req: int, cid: int) -> None:
        consumer = peer.consumers.get(cid)
        if consumer is not None:
            self._drop_consumer(consumer, now)

    def _on_ack(self, peer: Peer, now: float, tags: list) -> None:
        done = []
        for seq in tags:
            consumer = self._unacked.get(seq) if _is_tag(seq) else None
            if consumer is None or consumer.peer is not peer:
                continue  # settled already, or requeued after a reconnect
            del self._unacked[seq]
            row = consumer.unacked.pop(seq)
            mb = consumer.mailbox
            self._forget(mb, row, unacked=True)
            mb.last_used = now
            self._dirty.add(mb)
            done.append(seq)
        if done:
            self._delete(done)
            self.counters["acked"] += len(done)

    def _on_nack(self, peer: Peer, now: float, tags: list, requeue: bool) -> None:
        for seq in tags:
            consumer = self._unacked.get(seq) if _is_tag(seq) else None
            if consumer is None or consumer.peer is not peer:
                continue
            del self._unacked[seq]
            row = consumer.unacked.pop(seq)
            mb = consumer.mailbox
            mb.unacked_count -= 1
            mb.unacked_bytes -= len(row.body)
            mb.last_used = now
            if requeue:
                self._requeue(mb, [row])
            else:
                self._dead_letter(mb, row, "rejected", now)
            self._dirty.add(mb)

    _HANDLERS: dict[Cmd, Callable[..., None]] = {
        Cmd.HELLO: _on_hello,
        Cmd.HEARTBEAT: _on_heartbeat,
        Cmd.BYE: _on_bye,
        Cmd.DECLARE: _on_declare,
        Cmd.DELETE: _on_delete,
        Cmd.STATUS: _on_status,
        Cmd.SEND: _on_send,
        Cmd.CONSUME: _on_consume,
        Cmd.CANCEL: _on_cancel,
        Cmd.LOOKUP: _on_lookup,
        Cmd.ACK: _on_ack,
        Cmd.NACK: _on_nack,
        **ADMIN_HANDLERS,  # PURGE, MOVE, PEEK: relay/admin.py
    }

    # --- time ----------------------------------------------------------------------

    def next_deadline(self) -> float:
        candidates = [float("inf")]
        if self._idle_heap:
            candidates.append(self._idle_heap[0][0])
        if self._next_message_expiry is not None:
            candidates.append(self._next_message_expiry)
        for peer in self.peers.values():
            candidates.append(peer.last_sent + peer.heartbeat)
            candidates.append(peer.last_heard + peer.heartbeat * HEARTBEAT_LIVENESS)
        return min(candidates)

    def tick(self, now: float) -> None:
        """Heartbeats, dead peers, expired messages and idle mailboxes."""
        for peer in list(self.peers.values()):
            if now - peer.last_heard > peer.heartbeat * HEARTBEAT_LIVENESS:
                self._drop_peer(peer, f"silent for {now - peer.last_heard:.1f}s", now)
            elif now - peer.last_sent >= peer.heartbeat:
                self._reply_now(peer.identity, Cmd.HEARTBEAT)
        if self._next_message_expiry is not None and self._next_message_expiry <= now:
            self._expire_messages(now)
        while self._idle_heap and self._idle_heap[0][0] <= now:
            _, mailbox_id, name = heapq.heappop(self._idle_heap)
            mb = self.mailboxes.get(name)
            if mb is None or mb.id != mailbox_id:
                continue
            deadline = mb.idle_deadline()
            if deadline is None:
                continue  # a consumer came; its leaving schedules again
            if deadline > now:
                heapq.heappush(self._idle_heap, (deadline, mb.id, mb.name))
            else:
                self._delete_mailbox(mb, f"idle for {mb.options.ttl}s")

    def _expire_messages(self, now: float) -> None:
        held = 0  # expired but with a consumer: skipped, so page past them
        while True:
            self._flush_writes()
            batch = self.store.expired(now, EXPIRY_BATCH, held)
            for seq, mailbox_id in batch:
                if seq in self._unacked:
                    held += 1  # checked again when it comes back (requeue)
                    continue
                mb = self._by_id.get(mailbox_id)
                if mb is None:  # a row no mailbox owns: nothing can deliver it
                    log.warning("expired message %d is in unknown mailbox %d: deleted", seq, mailbox_id)
                    self._delete([seq])
                    continue
                row = self._take_ready(mb, seq)
                if row is None:
                    held += 1  # not where the mailbox looks: page past it, never spin
                    continue
                mb.count -= 1
                mb.nbytes -= len(row.body)
                self._dead_letter(mb, row, "expired", now, counted=False)
                self.counters["expired"] += 1
            if len(batch) < EXPIRY_BATCH:
                break
        self._flush_writes()
        self._next_message_expiry = self.store.next_expiry(now)

    def _take_ready(self, mb: Mailbox, seq: int) -> StoredMessage | None:
        """Remove the ready message `seq` from the mailbox's memory window or disk."""
        for i, row in enumerate(mb.ready):
            if row.seq == seq:
                del mb.ready[i]
                self._delete([seq])
                return row
        if mb.disk_after is not None and seq > mb.disk_after:
            self._flush_writes()
            row = self.store.get(seq)
            if row is not None:
                self._delete([seq])
            return row
        return None

    # --- delivery --------------------------------------------------------------------

    def pump(self, now: float) -> None:
        """Hand ready messages to consumers with credit, round-robin."""
        dirty, self._dirty = self._dirty, set()
        for mb in dirty:
            if mb.consumers and mb.ready_count and mb.name in self.mailboxes:
                self._deliver(mb, now)

    def _deliver(self, mb: Mailbox, now: float) -> None:
        batches: dict[Consumer, list] = {}
        consumers = mb.consumers
        n = len(consumers)
        idle_rounds = 0
        while idle_rounds < n:
            if not mb.ready and not self._fill(mb):
                break
            consumer = consumers[mb.rr % n]
            mb.rr += 1
            if consumer.credit <= 0:
                idle_rounds += 1
                continue
            idle_rounds = 0
            row = mb.ready.popleft()
            if row.expires is not None and row.expires <= now:
                mb.count -= 1
                mb.nbytes -= len(row.body)
                self._delete([row.seq])
                self._dead_letter(mb, row, "expired", now, counted=False)
                self.counters["expired"] += 1
                continue
            if row.seq <= self._boot_seq and row.deliveries == 0:
                row = row._replace(deliveries=1)  # may have been out before a restart
            row = row._replace(deliveries=row.deliveries + 1)
            if row.deliveries > 1:
                self.counters["redelivered"] += 1
            consumer.unacked[row.seq] = row
            self._unacked[row.seq] = consumer
            mb.unacked_count += 1
            mb.unacked_bytes += len(row.body)
            batches.setdefault(consumer, []).append(
                [row.seq, row.msg_id, mb.name, msgpack.unpackb(row.headers), row.body,
                 row.created, row.expires, row.deliveries])
        for consumer, records in batches.items():
            self.counters["delivered"] += len(records)
            self._reply_now(consumer.peer.identity, Cmd.DELIVER, consumer.cid, records)

    def _fill(self, mb: Mailbox) -> bool:
        """Load the next window of ready messages from disk; False if none."""
        if mb.disk_after is None:
            return False
        self._flush_writes()
        rows = self.store.load_ready(mb.id, mb.disk_after, READY_WINDOW)
        rows = [r for r in rows if r.seq not in self._unacked]
        if rows:
            mb.disk_after = rows[-1].seq
            mb.ready.extend(rows)
        if len(rows) < READY_WINDOW:
            mb.disk_after = None
        return bool(rows)

    def _requeue(self, mb: Mailbox, rows: list[StoredMessage]) -> None:
        """Put messages back at the head of the queue, oldest first."""
        for row in sorted(rows, key=lambda r: r.seq, reverse=True):
            mb.ready.appendleft(row)
            self._note_expiry(row.expires)
        self._flush_writes()
        self.store.set_deliveries((r.deliveries, r.seq) for r in rows)

    # --- mailboxes and messages ---------------------------------------------------

    def _enqueue(self, mb: Mailbox, msg_id: bytes, headers: bytes, body: bytes, created: float,
                 expires: float | None, deliveries: int, now: float, dead_lettering: bool = False) -> StoredMessage:
        """Store a message in `mb`.  A dead-lettered message never makes its
        target drop heads (two drop-head mailboxes dead-lettering into each
        other would loop): a full target refuses it."""
        size = len(body)
        opts = mb.options
        too_big = opts.max_bytes is not None and size > opts.max_bytes
        while too_big or (opts.max_length is not None and mb.ready_count + 1 > opts.max_length) or (
            opts.max_bytes is not None and mb.ready_bytes + size > opts.max_bytes
        ):
            if opts.overflow == OVERFLOW_REJECT or dead_lettering or too_big or not mb.ready_count:
                raise MailboxFull(
                    f"mailbox {mb.name!r} is full ({mb.ready_count} messages, {mb.ready_bytes} bytes; "
                    f"max_length={opts.max_length}, max_bytes={opts.max_bytes})"
                )
            self._drop_head(mb, now)
        self._seq += 1
        row = StoredMessage(self._seq, mb.id, msg_id, headers, body, created, expires, deliveries)
        self._insert(row)
        mb.count += 1
        mb.nbytes += size
        mb.last_used = now
        if mb.disk_after is None and len(mb.ready) < READY_WINDOW:
            mb.ready.append(row)
        elif mb.disk_after is None:
            mb.disk_after = row.seq - 1
        self._note_expiry(expires)
        if mb.consumers:
            self._dirty.add(mb)
        return row

    def _note_expiry(self, expires: float | None) -> None:
        if expires is not None and (self._next_message_expiry is None or expires < self._next_message_expiry):
            self._next_message_expiry = expires

    def _drop_head(self, mb: Mailbox, now: float) -> None:
        if not mb.ready:
            self._fill(mb)
        row = mb.ready.popleft()
        mb.count -= 1
        mb.nbytes -= len(row.body)
        self._delete([row.seq])
        self._dead_letter(mb, row, "maxlen", now, counted=False)

    def _dead_letter(self, mb: Mailbox, row: StoredMessage, reason: str, now: float,
                     counted: bool = True) -> None:
        """Move a message out of `mb`: to its dead-letter mailbox, or away."""
        if counted:
            mb.count -= 1
            mb.nbytes -= len(row.body)
            self._delete([row.seq])
        target = mb.options.dead_letter
        if target is None or target == mb.name:
            return
        dlx = self.mailboxes.get(target) or self._create_mailbox(target, MailboxOptions(), False, now)
        headers = msgpack.unpackb(row.headers)
        headers["x-death"] = {"reason": reason, "mailbox": mb.name, "time": now,
                              "count": row.deliveries}
        ttl = dlx.options.message_ttl
        try:
            self._enqueue(dlx, row.msg_id, msgpack.packb(headers), row.body, row.created,
                          None if ttl is None else now + ttl, 0, now, dead_lettering=True)
            self.counters["dead_lettered"] += 1
            self.counters["dead_lettered_" + reason] = self.counters.get("dead_lettered_" + reason, 0) + 1
        except MailboxFull:
            log.warning("dead-letter mailbox %s is full: dropped a message from %s", target, mb.name)

    def _forget(self, mb: Mailbox, row: StoredMessage, unacked: bool) -> None:
        mb.count -= 1
        mb.nbytes -= len(row.body)
        if unacked:
            mb.unacked_count -= 1
            mb.unacked_bytes -= len(row.body)

    def _create_mailbox(self, name: str, options: MailboxOptions, declared: bool, now: float) -> Mailbox:
        mb = Mailbox(self._next_mailbox_id, name, options, declared, now)
        self._next_mailbox_id += 1
        self._add_mailbox(mb)
        self._save_mailbox(mb)
        log.info("mailbox %s created (%s)", name, "declared" if declared else "on first use")
        return mb

    def _add_mailbox(self, mb: Mailbox) -> None:
        self.mailboxes[mb.name] = mb
        self._by_id[mb.id] = mb
        self._schedule_idle(mb)

    def _save_mailbox(self, mb: Mailbox) -> None:
        self._flush_writes()
        self.store.save_mailbox(MailboxRow(mb.id, mb.name, mb.options.to_map(), mb.declared))

    def _schedule_idle(self, mb: Mailbox) -> None:
        deadline = mb.idle_deadline()
        if deadline is not None:
            heapq.heappush(self._idle_heap, (deadline, mb.id, mb.name))

    def _delete_mailbox(self, mb: Mailbox, why: str) -> None:
        del self.mailboxes[mb.name]
        del self._by_id[mb.id]
        self._flush_writes()
        self.store.delete_mailbox(mb.id)
        log.info("mailbox %s deleted with %d messages: %s", mb.name, mb.count, why)

    # --- peers ---------------------------------------------------------------------------

    def _drop_consumer(self, consumer: Consumer, now: float) -> None:
        peer, mb = consumer.peer, consumer.mailbox
        # The idle clock starts when the last consumer goes, not before:
        # else a mailbox held for longer than its ttl would expire at once
        # with the messages just requeued.
        mb.last_used = now
        peer.consumers.pop(consumer.cid, None)
        if consumer in mb.consumers:
            mb.consumers.remove(consumer)
        rows = list(consumer.unacked.values())
        for row in rows:
            del self._unacked[row.seq]
            mb.unacked_count -= 1
            mb.unacked_bytes -= len(row.body)
        consumer.unacked.clear()
        if rows and mb.name in self.mailboxes:
            self._requeue(mb, rows)
            self._dirty.add(mb)
            log.info("%d unacked message(s) of %s on %s requeued", len(rows), peer.name, mb.name)
        if not mb.consumers:
            self._schedule_idle(mb)

    def drop_session(self, identity: bytes, why: str, now: float) -> None:
        """Forget the session of `identity` (if any): its consumers go, their
        unacked messages are requeued; its next command gets NOT_READY."""
        peer = self.peers.get(identity)
        if peer is not None:
            self._drop_peer(peer, why, now)

    def _drop_peer(self, peer: Peer, why: str, now: float) -> None:
        for consumer in list(peer.consumers.values()):
            self._drop_consumer(consumer, now)
        self.peers.pop(peer.identity, None)
        self._peer_users.pop(peer.identity, None)
        log.info("node %s gone: %s", peer.name, why)

    def shutdown(self) -> None:
        """Tell every peer the relay is going away."""
        for peer in self.peers.values():
            self._now_out.append((peer.identity, encode(Cmd.BYE, "relay shutting down")))

    # --- output and commit --------------------------------------------------------------

    def _reply_now(self, identity: bytes, cmd: Cmd, *fields: Any) -> None:
        self._now_out.append((identity, encode(cmd, *fields)))

    def _error(self, identity: bytes, req: int | None, exc: RelayError) -> None:
        self._now_out.append((identity, encode(Cmd.ERROR, req, exc.code, exc.text)))

    def take_output(self, now: float) -> list[Output]:
        """Frames that may go out now (before the turn's commit)."""
        out, self._now_out = self._now_out, []
        for identity, _ in out:
            peer = self.peers.get(identity)
            if peer is not None:
                peer.last_sent = now
        return out

    def commit(self) -> None:
        """Make the turn's writes durable; then the held replies may go."""
        held = self.prepare_commit()
        self.store.commit()
        self._now_out.extend(held)

    def prepare_commit(self) -> list[Output]:
        """Hand the turn's writes to the store and return the replies that
        may go out only once the caller's store.commit() has returned."""
        self._flush_writes()
        held = [(identity, encode(Cmd.CONFIRM, req, errors)) for identity, req, errors in self._confirms]
        # Every SEND received so far is answered in this batch (metrics).
        self.counters["refused"] += sum(len(errors) for _, _, errors in self._confirms)
        self.counters["confirmed"] = self.counters["received"] - self.counters["refused"]
        held.extend(self._after_commit)
        self._confirms, self._after_commit = [], []
        self._origins.clear()
        return held

    def _insert(self, row: StoredMessage) -> None:
        if self._writes and self._writes[-1][0] == "insert":
            self._writes[-1][1].append(row)
        else:
            self._writes.append(("insert", [row]))

    def _delete(self, seqs: list[int]) -> None:
        if self._writes and self._writes[-1][0] == "delete":
            self._writes[-1][1].extend(seqs)
        else:
            self._writes.append(("delete", list(seqs)))

    def _flush_writes(self) -> None:
        writes, self._writes = self._writes, []
        for kind, items in writes:
            if kind == "delete":
                self.store.delete(items)
            elif self.store.insert(items) != len(items):
                self._drop_ghosts(items)

    def _drop_ghosts(self, rows: list[StoredMessage]) -> None:
        """A sender reused a stored id without the retry flag: forget the
        in-memory copies of the rows the store skipped."""
        kept = self.store.existing_seqs([r.seq for r in rows])
        stored_in = self.store.mailboxes_of([r.msg_id for r in rows if r.seq not in kept])
        for row in rows:
            if row.seq in kept:
                continue
            mb = self._by_id.get(row.mailbox_id)
            if mb is None:
                continue
            try:
                mb.ready.remove(row)
            except ValueError:
                consumer = self._unacked.pop(row.seq, None)
                if consumer is not None:
                    consumer.unacked.pop(row.seq, None)
                    mb.unacked_count -= 1
                    mb.unacked_bytes -= len(row.body)
            mb.count -= 1
            mb.nbytes -= len(row.body)
            origin = self._origins.get(row.seq)
            if stored_in.get(row.msg_id) == row.mailbox_id:
                # The same message again (an idempotent resend): it is stored.
                log.info("message id %s is already in %s: kept once", row.msg_id.hex(), mb.name)
                continue
            if origin is not None:  # another mailbox: tell the sender, never a silent drop
                origin[0].append([origin[1], PreconditionFailed.code,
                                  f"message id {row.msg_id.hex()} is already stored in another "
                                  "mailbox (ids are unique per relay)"])
            log.warning("duplicate message id %s for %s refused", row.msg_id.hex(), mb.name)


def _is_tag(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_name(name: str) -> str:
    try:
        return check_name(name)
    except LocalProtocolError as exc:
        raise Malformed(str(exc)) from None

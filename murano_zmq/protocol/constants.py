"""Protocol constants and defaults, with their units.

Every tunable number of the wire protocol lives here so that the relay, the
nodes and docs/protocol.md agree on one value.
"""

# Frame 0 of every command: "MZQ" and the protocol version (one byte).
# ZeroMQ reconnects silently, so each command carries it (cf. ZeroMQ RFC 7).
# Version 2: headers travel as bin (a packed msgpack map), not as a map.
PROTOCOL_VERSION = 2
SIGNATURE = b"MZQ" + bytes([PROTOCOL_VERSION])

DEFAULT_RELAY_ENDPOINT = "tcp://127.0.0.1:5570"
RELAY_ENV = "MURANO_ZMQ_RELAY"

# Largest message body a relay accepts, bytes.  The relay also sets
# ZMQ_MAXMSGSIZE to this plus HEADROOM so a peer cannot make it allocate more.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
FRAME_HEADROOM = 64 * 1024

# Heartbeats: any command counts as one.  A peer is dead after
# HEARTBEAT_LIVENESS intervals of silence.  Seconds.
DEFAULT_HEARTBEAT = 1.0
HEARTBEAT_LIVENESS = 5
# A node with several relays moves on from one that has not said WELCOME
# within this many heartbeats (a relay that refuses connections, or that
# is not there), not after HEARTBEAT_LIVENESS; never sooner than
# MIN_WELCOME_WAIT seconds (a short heartbeat, a relay busy starting).
WELCOME_LIVENESS = 2
MIN_WELCOME_WAIT = 1.0

# Heartbeat intervals a relay accepts from HELLO (it clamps), seconds.
MIN_HEARTBEAT = 0.05
MAX_HEARTBEAT = 60.0

# The longest time any option or call may name, seconds (about 31 years):
# finite, and below what threading's waits take (threading.TIMEOUT_MAX).
MAX_SECONDS = 1e9

# Largest max_length / max_bytes a mailbox may have: what msgpack carries
# (an unsigned 64-bit integer).
MAX_LIMIT = (1 << 64) - 1

# Characters of a HELLO's node name a relay or direct peer keeps (for logs
# and STATUS); the rest is cut off.
MAX_PEER_NAME = 200

# Consumer credit (unacked messages out at once) when the caller gives none,
# and the most a relay grants (it sizes the relay's bookkeeping).
DEFAULT_PREFETCH = 100
MAX_PREFETCH = 10_000
# Smallest prefetch for which a node writes the acks of half a window as soon
# as they are made (ClientCore.ack_early); below it, at the application's pause.
ACK_EARLY_MIN_PREFETCH = 32
# Byte credit (bodies out at once, as AMQP's prefetch-size): none unless the
# consumer asks; the most a consumer may ask, bytes.
MAX_PREFETCH_BYTES = 1 << 40
# Longest direct endpoint a consumer may announce, characters.
MAX_ENDPOINT = 512

# Bytes the relay hands to one mailbox's consumers per loop turn: the rest
# waits for the next turn, so one turn's output stays bounded.
DELIVER_TURN_BYTES = 1 * 1024 * 1024

# What one relay loop turn reads at most, in commands and in bytes.  A turn
# ends in one commit; keeping it well below what nodes keep in flight lets
# the next turn's data arrive while this one syncs.
TURN_COMMANDS = 2000
TURN_BYTES = 4 * 1024 * 1024

# Commands the relay queues per peer connection inbound (ZMQ_RCVHWM) and
# outbound (ZMQ_SNDHWM).  Inbound, ZeroMQ never drops: a full queue stops
# reading that connection.  Outbound is far above what a reading node can
# have outstanding (credit bounds deliveries, in-flight limits bound
# confirms); a peer that fills it is dropped, its unacked messages requeued.
PEER_RECEIVE_QUEUE = 1000
PEER_SEND_QUEUE = 100_000

# Ready messages per mailbox the relay keeps in memory, by count and by body
# bytes (at least one message, however large); more wait on disk.
READY_WINDOW = 1000
READY_WINDOW_BYTES = 2 * 1024 * 1024

# Messages one PURGE or MOVE handles at most: one command is one loop turn
# and one commit, which other nodes wait behind.  The rest is `left` in the
# answer, for the caller to ask again.
ADMIN_BATCH = 10_000
# Messages one PEEK returns at most, and the body bytes after which it stops
# (at least one message is returned, whatever its size).
PEEK_MAX = 1000
PEEK_BYTES = 4 * 1024 * 1024

# Expired messages the relay reads from its store at once.
EXPIRY_BATCH = 1000

# Seqs (delivery tags) a restarted relay skips: more than two loop turns can
# hand out before their commits (the relay's deliveries go out before the
# commit, so a node may ack a tag the relay never committed).
SEQ_GAP_AFTER_START = 1 << 24

# Messages per SEND command in a pipelined send; one CONFIRM answers each.
SEND_BATCH = 256
# Bytes of bodies per SEND command: keeps each frame far below the relay's
# ZMQ_MAXMSGSIZE (a single larger message goes alone).
SEND_BATCH_BYTES = 1024 * 1024

# Direct sends a link keeps unconfirmed at once (the window), how long a
# sender waits for a direct CONFIRM before the relay takes the messages
# (seconds), and records per direct SEND (its CONFIRM waits for the last).
DEFAULT_WINDOW = 1000
# ... and bytes (bodies and headers) a link keeps unconfirmed at once: a
# SEND may pass it by one record (so one larger than it goes, alone).  A
# consumer's prefetch does not reach its direct senders: 900 bodies of 1 MiB
# to a consumer that read none held 1.3 GB there.  A consuming node ends a
# sender's session that has more than either out (a hostile one ignores them).
DIRECT_WINDOW_BYTES = 32 << 20
# Direct links a node keeps open at most (a DEALER and a descriptor each):
# past it, an idle link is closed to open another, else the message takes
# the relay.  Links were never closed: a consumer offering 1,500 endpoints
# for its mailbox (or 1,000 agents each consuming directly) made its
# senders open a socket per endpoint, past libzmq's 1,023 sockets per
# context and the descriptor limit, and their I/O threads died.
MAX_DIRECT_LINKS = 256
DEFAULT_DIRECT_TIMEOUT = 5.0
DIRECT_BATCH = 32
# Seconds a link's unconfirmed records may make no progress before the
# sender gives the relay a copy of them (so their send() returns once
# stored) and sends the next messages of their mailbox through the relay
# (at most half the direct timeout).  Far above a live consumer's CONFIRM
# (about 1 ms), far below what a send may wait.
DIRECT_STALL = 0.5

# Path choice (docs/protocol.md, Path choice), seconds: how long a LOOKUP
# answer is trusted before the sender asks again; how soon it asks when
# waiting for the relay to drain so it can go direct; how long it holds a
# mailbox's messages back while it asks (so the answer is not overtaken by
# yet another relay send); and how long an endpoint whose handshake refused
# this node's key is left alone, whatever LOOKUP or discovery say
# meanwhile (one whose links failed twice in a row: FAILED_BACKOFF, doubling
# up to REFUSED_BACKOFF; paths.PathTable.link_failed).
LOOKUP_TTL = 2.0
DRAIN_RECHECK = 0.05
HOLD_LIMIT = 1.0
REFUSED_BACKOFF = 30.0
FAILED_BACKOFF = 4.0
FAILURES_KEPT = 10_000  # endpoints whose links' failures in a row a sender counts
# A sender forgets the path of a mailbox it has not sent to, nor heard of,
# for this many seconds (a conductor sends to every agent's mailbox once
# and long after those are gone kept ~300 bytes for each); one whose
# messages the relay may still hold is looked up first, at most this many
# per pass (every PATH_IDLE).
PATH_IDLE = 60.0
PATH_PRUNE_LOOKUPS = 1000

# Commands a node reads from one socket per loop turn, at most: one busy
# socket cannot starve the node's other sockets and timers.
READ_BATCH = 1000

# Message ids a node remembers to hand each id to application code once.
DEDUP_WINDOW = 100_000

# Unconfirmed sends a node keeps in flight before send_many() waits.
MAX_IN_FLIGHT_BATCHES = 64

# Messages a node holds that it could not hand to a socket yet (relay down,
# windows full); one more send raises SendQueueFull.
DEFAULT_MAX_PENDING = 100_000
# ... and at most this many bytes of them (bodies and headers): 100,000
# sends of 64 KiB held 6.5 GB while no relay answered.  Room for a send_many
# of 10,000 bodies of 64 KiB.
DEFAULT_MAX_PENDING_BYTES = 1 << 30

# Topic events a subscription holds that its reader has not taken yet, and
# their bodies' bytes: past either, new events are dropped (and counted).
# The node reads its SUB sockets whatever its readers do, so the socket's
# high-water mark never drops for them: a 50 ms callback on 64 KiB events
# grew a subscriber by 1 GB in 2 s.
SUBSCRIPTION_EVENTS = 10_000
SUBSCRIPTION_BYTES = 64 << 20

# How long a blocking call waits for the relay by default, seconds.
DEFAULT_TIMEOUT = 30.0
# How long a node's blocking call looks for its answer without sleeping,
# seconds (Node(spin=...), AsyncNode(spin=...)): a sleeping thread took
# ~0.1 ms to wake here.
DEFAULT_SPIN = 0.0005
MAX_SPIN = 0.01

OVERFLOW_REJECT = "reject"
OVERFLOW_DROP_HEAD = "drop-head"
OVERFLOWS = (OVERFLOW_REJECT, OVERFLOW_DROP_HEAD)

# Mailbox names: printable, no spaces, bounded (they are stored and logged).
MAX_NAME_LENGTH = 255
# Characters of an error's text that go on the wire (ERROR, CONFIRM): a
# refusal that quoted what it refused (an 8 MiB mailbox name) came back as
# large, and 150 of them unread held 1.4 GB in the relay.
MAX_ERROR_TEXT = 1000
# Bytes of a subscription a PUB or a forwarder's XPUB takes: its header
# (a flag byte, or ZMTP 3.1's "\x09SUBSCRIBE" command name: 10 bytes) and a
# topic prefix (MAX_NAME_LENGTH characters of UTF-8).  libzmq keeps a
# subscription as a trie with a node per byte, ~80 bytes of memory each, and
# a subscriber's end unsubscribes by recursing once per byte: one 256 KiB
# subscription crashed the forwarder (a stack overflow) when it went.
MAX_SUBSCRIPTION_SIZE = 10 + 4 * MAX_NAME_LENGTH

# Message ids: bytes (a 48-bit ms clock and 80 random bits, or a key's hash).
ID_SIZE = 16
ID_CLOCK_BYTES = 6  # the big-endian millisecond clock a new id starts with

# A CURVE public key (32 bytes) as z85 text, characters.
Z85_KEY_LENGTH = 40

# A kept msgpack Packer keeps its buffer at the largest size it has packed:
# past this (msgpack's own default size) its owner drops it for a new one.
KEPT_PACKER_BUFFER = 1024 * 1024

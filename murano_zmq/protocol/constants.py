"""Protocol constants and defaults, with their units.

Every tunable number of the wire protocol lives here so that the relay, the
nodes and docs/protocol.md agree on one value.
"""

# Frame 0 of every command: "MZQ" and the protocol version (one byte).
# ZeroMQ reconnects silently, so each command carries it (cf. ZeroMQ RFC 7).
PROTOCOL_VERSION = 1
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

# Consumer credit (unacked messages out at once) when the caller gives none.
DEFAULT_PREFETCH = 100

# Messages per SEND command in a pipelined send; one CONFIRM answers each.
SEND_BATCH = 256

# Message ids a node remembers to hand each id to application code once.
DEDUP_WINDOW = 100_000

# Unconfirmed sends a node keeps in flight before send_many() waits.
MAX_IN_FLIGHT_BATCHES = 64

# Messages a node holds that it could not hand to a socket yet (relay down,
# windows full); one more send raises SendQueueFull.
DEFAULT_MAX_PENDING = 100_000

# How long a blocking call waits for the relay by default, seconds.
DEFAULT_TIMEOUT = 30.0

OVERFLOW_REJECT = "reject"
OVERFLOW_DROP_HEAD = "drop-head"
OVERFLOWS = (OVERFLOW_REJECT, OVERFLOW_DROP_HEAD)

# Mailbox names: printable, no spaces, bounded (they are stored and logged).
MAX_NAME_LENGTH = 255

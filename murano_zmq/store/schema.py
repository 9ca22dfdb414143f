"""The SQLite store's tables and the numbers that size its connections."""

SCHEMA_VERSION = 4  # 2: large bodies in segment files (seg, seg_off, seg_len); 3: packs; 4: seg_crc

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailboxes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    options BLOB NOT NULL,
    declared INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    mailbox INTEGER NOT NULL,
    msg_id BLOB NOT NULL,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    seg INTEGER,  -- a body in a segment file (store/segments.py): body is empty
    seg_off INTEGER,
    seg_len INTEGER,
    seg_crc INTEGER  -- the body's CRC-32, when its sync was the WAL's (store/writeback.py)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (msg_id);
CREATE INDEX IF NOT EXISTS messages_by_mailbox ON messages (mailbox, seq);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages (expires) WHERE expires IS NOT NULL;
-- A run of messages as one row (store/packs.py): seqs first..last of one
-- mailbox; ids, sizes (the bodies' lengths) and data (bodies, created,
-- deliveries, headers or NULL) are msgpack lists in seq order.  The seqs
-- deleted since, and the delivery counts set since, are rows of their own
-- until the pack goes.
CREATE TABLE IF NOT EXISTS packs (
    first INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    mailbox INTEGER NOT NULL,
    min_id BLOB NOT NULL,  -- clock ids only (store/ids.py)
    max_id BLOB NOT NULL,
    nbytes INTEGER NOT NULL,
    ids BLOB NOT NULL,
    sizes BLOB NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pack_gone (
    first INTEGER NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL, PRIMARY KEY (first, lo)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pack_deliveries (seq INTEGER PRIMARY KEY, first INTEGER NOT NULL, count INTEGER NOT NULL);
"""

# Version 1 -> 2: the segment columns and their index (SEGMENT_INDEX).
MIGRATE_1_2 = """
ALTER TABLE messages ADD COLUMN seg INTEGER;
ALTER TABLE messages ADD COLUMN seg_off INTEGER;
ALTER TABLE messages ADD COLUMN seg_len INTEGER;
"""
# Version 3 -> 4: the segment bodies' checksums (store/writeback.py).
MIGRATE_3_4 = "ALTER TABLE messages ADD COLUMN seg_crc INTEGER;"
SEGMENT_INDEX = ("CREATE INDEX IF NOT EXISTS messages_by_segment ON messages (seg, seg_off, seg_len) "
                 "WHERE seg IS NOT NULL")

# Page size of a new database (an existing one keeps its own).  Pages of
# 8 KiB hold a 1 KiB message's row with fewer page splits and WAL frames per
# row than SQLite's 4 KiB: relay CPU per pipelined message -10 %, per consumed
# message -15 % (bench/raw_relay.py pipe).  A lone send's frames are twice
# the size: +12,000 instructions (~9 µs) of its ~550 µs (docs/performance.md,
# session 9).
PAGE_SIZE = 8192

# Page cache per connection, KiB (negative = KiB in SQLite's pragma): bounded
# so the relay's memory does not grow with the queue.
CACHE_KIB = 16 * 1024

# Ids per "IN (...)" lookup (SQLite allows 32766 variables).
ID_CHUNK = 500

COLUMNS = "seq, mailbox, msg_id, headers, body, created, expires, deliveries"
SEGMENT_COLUMNS = "seg, seg_off, seg_len, seg_crc"

__all__ = ["SCHEMA_VERSION", "SCHEMA", "MIGRATE_1_2", "MIGRATE_3_4", "SEGMENT_INDEX", "PAGE_SIZE", "CACHE_KIB",
           "ID_CHUNK", "COLUMNS", "SEGMENT_COLUMNS"]

"""Where things sit on the wire: stream field names, their positions, the publish script's
arguments and the dead-letter fields. What the fields mean is in `wire`'s docstring.

The producer (`streams.publish`), the reader and dead letters (`streams.reader`,
`streams.dead`), the shard loop (`consumers.shard`) and the codec (`wire`) read these
names instead of counting positions; the Lua scripts spell the same layout (each
`.lua` file says what it takes).
"""

from __future__ import annotations

# The fields of a stream entry.
F_KEY = b"key"  # routing key of the event
F_OP = b"op"  # operation name
F_DATA = b"data"  # JSON object of fields
F_TABLE = b"table"  # target table, when not the stream's default
F_TS = b"ts"  # producer timestamp, ms
F_VERSION = b"v"  # schema version of data
F_ID = b"id"  # idempotency id
F_FOR = b"for"  # a replayed entry: the one group that applies it (the others skip it)
F_ORIGIN = b"origin"  # a replayed entry: the entry ID its event first had (its identity)
F_SINKS = b"sinks"  # a replayed entry: the group's sinks that apply it (comma-separated)
ROUTING_FIELDS = frozenset((F_FOR, F_ORIGIN, F_SINKS))
"""Fields a replay adds to an entry; a dead letter's replay replaces them."""

PACKED_FIELDS = (F_KEY, F_OP, F_DATA, F_TABLE, F_TS, F_VERSION, F_ID)
"""The order of a packed event's values (`wire.pack`): producers hand events to their
script as these seven, b"" for an absent one."""
KEY, OP, DATA, TABLE, TS, VERSION, ID = range(len(PACKED_FIELDS))
"""Positions in a packed event (and in PACKED_FIELDS)."""
PLAIN_VALUES = 3
"""A plain event (no table, ts, v or id) is packed as its first three values: key, op, data."""

PLAIN_ENTRY = 2 * PLAIN_VALUES
"""Flat fields of a plain entry as Redis sends it: [key, K, op, O, data, D], in that order."""
KEY_NAME, KEY_VALUE, OP_NAME, OP_VALUE, DATA_NAME, DATA_VALUE = range(PLAIN_ENTRY)
"""Positions in a plain entry's flat fields."""

# The publish script's arguments (see streams/publish.lua): EVAL, the script, its key
# count, its two keys, then a header of seven ARGV, then the events, then the shapes.
EVAL_SHARD = 3
"""Where the shard stream (KEYS[1]) sits in the EVAL command (EVAL, script, 2, shard, ids)."""
EVAL_SHAPES = 11
"""Where ARGV[7] sits in the EVAL command: where the shapes start in ARGV (0: none)."""
FIRST_EVENT = 12
"""Where the first event's values start in a command's arguments (EVAL, script, 2, shard,
ids index, old dedup prefix, dedup TTL, max lag, memory ceiling, row prefix, default table,
where the shapes start)."""
EVAL_ARGV = 4
"""Arguments before ARGV[1] in the EVAL command: ARGV[n] is argument EVAL_ARGV + n."""

# After an event's key, a mark says how the rest of its values are laid out; a plain event
# has none: `key, op, data`.
FULL = b"+"
"""After the key, marks an event sent with all its values (one with a table, ts, v or id):
`key, '+', op, data, table, ts, v, id`."""
IDENTIFIED = b"!"
"""After the key, marks an event sent with op, data and its id (no table, ts or v):
`key, '!', op, data, id`."""
IDENTIFIED_ALL = b"!!"
"""After the first event's key, marks a call whose events are all IDENTIFIED ones, sent
without their marks (one argument an event less): `key, '!!', op, data, id`, then
`key, op, data, id` for each further event."""
MODEL = b"#"
"""After the key, marks an event sent with all its values and its read-model changes:
`key, '#', op, data, table, ts, v, id, changes`."""
MODEL_PLAIN = b"="
"""After the key, the first byte of a shape's mark (`=0`, `=1`, ...): a plain set of a
table with a read model, sent as `key, shape mark, data`. The shape (sent once per call,
after the events) names the key column (whose value is the key itself), the other fields
and the TTL, and holds the Lua pattern that reads their values from the data; the op is
set (streams/publish.py: `shape_pattern`, publish.lua)."""
MODEL_SHORT = b"*"
"""After the key, marks an event with only op and data, and its read-model changes:
`key, '*', op, data, changes`."""
MARK = 1
"""Where the mark sits in a marked event's values."""

# A dead letter: an entry moved to its group's dead-letter stream (streams/reader.py
# writes it, streams/dead.py reads it), with why and where from.
D_REASON = b"reason"  # why it was dead-lettered (the error, one line)
D_ENTRY = b"entry"  # its entry ID in the shard stream
D_GROUP = b"group"  # the consumer group that gave up on it
D_DELIVERIES = b"deliveries"  # how often it was delivered
D_AT_MS = b"at_ms"  # when it was dead-lettered, ms since the Unix epoch
D_SOURCE = b"source"  # the shard stream's key
D_SINKS = b"sinks"  # the group's sinks that refused it, comma-separated (absent: all)
D_ORIGIN = b"origin"  # the entry ID its event first had, if it was a replay (absent: none)
D_FIELD = b"f:"
"""Prefix of the letter's fields that hold the original entry's fields, byte for byte."""

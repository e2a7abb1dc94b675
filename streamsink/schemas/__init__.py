"""Events, tables, config, the wire format and the merge rules: pure data, no I/O.

The lowest layer: it imports nothing of streamsink but `errors` (checked by `make lint`).
"""

from streamsink.schemas.config import Config, GroupSpec, SinkSpec, StreamSpec, from_dict, load
from streamsink.schemas.event import Event, Op
from streamsink.schemas.table import Column, ColumnType, Mode, Policy, Table, validate
from streamsink.schemas.wire import decode, encode, shard_of

__all__ = [
    "Column",
    "ColumnType",
    "Config",
    "Event",
    "GroupSpec",
    "Mode",
    "Op",
    "Policy",
    "SinkSpec",
    "StreamSpec",
    "Table",
    "decode",
    "encode",
    "from_dict",
    "load",
    "shard_of",
    "validate",
]

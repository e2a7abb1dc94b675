"""Micro-benchmark of the worker's per-event CPU: decode, merge and staging of one window.

    python bench/hotpath.py [--events 20000] [--repeat 7] [--dsn postgresql://...]

A window of --events entries of shard 0 of 4, as the producers write them (key, op, data)
and as bench/pipeline.py publishes them: half sets of status and progress, half incrs of
views, on 10,000 rows (hot keys) or each on a new row (unique keys). Each step is timed
alone, best of --repeat, in µs per event:

  decode   the shard's `unpacker` on each entry's flat fields, and its `Entry`
           (what `ShardRunner` does per entry read)
  merge    `merge` of the decoded window
  stage    `Writer._stage` of the merged rows: COPY text and statements (needs --dsn for
           the statements' quoting; no table is written)

No Redis and no table: the figures are the interpreter's work alone, for comparing
changes to these paths (bench/README.md, "Decode and merge").
"""

from __future__ import annotations

import argparse
import contextlib
import random
import timeit
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
from pipeline import STATUSES, TASKS  # the table bench/pipeline.py drains (bench/ on the path)

from streamsink.schemas import Config, StreamSpec
from streamsink.schemas.event import Event, Op
from streamsink.schemas.merge import Entry, merge
from streamsink.schemas.wire import F_DATA, F_KEY, F_OP, pack, shard_of, unpacker
from streamsink.sinks.postgres.writer import Writer

SHARDS = 4


def events(keys: int, seed: int) -> Iterator[Event]:
    """bench/pipeline.py's mix: `keys` rows, or a new row each event when 0."""
    rng = random.Random(seed)
    i = 0
    while True:
        task = rng.randrange(keys) if keys else i
        i += 1
        if rng.random() < 0.5:
            data = {
                "id": task,
                "status": STATUSES[rng.randrange(5)],
                "progress": rng.randrange(101),
            }
            yield Event(f"task:{task}", Op.SET, data)
        else:
            yield Event(f"task:{task}", Op.INCR, {"id": task, "views": 1})


def window(keys: int, count: int) -> list[tuple[bytes, list[bytes]]]:
    """`count` entries of shard 0, as XREADGROUP hands them: (ID, flat fields)."""
    entries = []
    for n, event in enumerate(events(keys, seed=1)):
        if shard_of(event.key, SHARDS) != 0:
            continue
        key, op, data = pack(event)[:3]
        entries.append((f"{1700000000000 + n}-0".encode(), [F_KEY, key, F_OP, op, F_DATA, data]))
        if len(entries) == count:
            return entries
    raise AssertionError("unreachable")


def decoder(config: Config) -> Callable[[list[tuple[bytes, list[bytes]]]], list[Entry]]:
    """What ShardRunner does per entry: unpack, then its Entry."""
    unpack = unpacker(
        config.default_table("tasks"),
        config.validator("tasks"),
        config.max_data_bytes,
        shard=(0, SHARDS),
        calls=False,
        tables=config.tables,
    )
    new_entry = tuple.__new__

    def decode(read: list[tuple[bytes, list[bytes]]]) -> list[Entry]:
        entries = []
        for entry_id, fields in read:
            event, table = unpack(fields)
            entries.append(new_entry(Entry, (entry_id.decode(), event, table)))
        return entries

    return decode


def best(step: Callable[[], Any], count: int, repeat: int) -> float:
    """The fastest of `repeat` runs of `step`, in µs per event."""
    return min(timeit.repeat(step, number=1, repeat=repeat)) * 1e6 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    spec = StreamSpec("tasks", shards=SHARDS, table="tasks")
    config = Config(streams={"tasks": spec}, tables={"tasks": TASKS})
    decode = decoder(config)
    print(
        f"{'window':<8} {'decode':>8} {'merge':>8} {'stage':>8}   µs/event, best of {args.repeat}"
    )
    with contextlib.closing(psycopg2.connect(args.dsn)) as conn, conn.cursor() as cur:
        for name, keys in (("hot", 10_000), ("unique", 0)):
            read = window(keys, args.events)
            entries = decode(read)
            merged = merge(entries)
            rows = list(merged.rows["tasks"].values())
            times = (
                best(lambda: decode(read), args.events, args.repeat),  # noqa: B023
                best(lambda: merge(entries), args.events, args.repeat),  # noqa: B023
                best(lambda: Writer(cur, "")._stage(TASKS, rows), args.events, args.repeat),  # noqa: B023
            )
            print(f"{name:<8} " + " ".join(f"{t:8.2f}" for t in times))


if __name__ == "__main__":
    main()

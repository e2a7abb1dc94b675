"""Numeric columns on the worker's hot path: decoding (`wire.unpacker`) and merging, per event.

    python bench/numeric.py [--runs 5] [--events 100000] [--baseline DIR]

Rows (median of --runs runs, each case in a fresh process, the runs of every case
interleaved; CPU µs per event: process time, steadier than wall time on a shared machine;
no I/O): orders events (`{"id": k, "total": ...}` over 1,000 keys, half `set`, half `incr`
of a `sum` column) decoded as the worker decodes what it reads, then merged as one window
per 1,000 entries:

  float column         total a float column, JSON numbers with cents (`12.34`)
  numeric, text        total numeric(12,2), JSON text (`"12.34"`: what Python producers send)
  numeric, integer     total numeric(12,2), JSON integers (`1234`)
  numeric, number      total numeric(12,2), JSON numbers with cents: orjson makes them floats,
                       so each entry is read again with the standard library (its literals)
  no numeric           a table without numeric columns (id, status text, views int sum):
                       the path every table without money takes

`--baseline DIR`: a checkout of the code before numeric columns (e.g. `git archive <commit> |
tar -x -C DIR`); its "no numeric" and "float column" rows are measured too, so the cost the
change adds to tables without numeric columns shows in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import statistics
import subprocess
import sys
import time
from typing import Any

CASES = ["no numeric", "float column", "numeric, text", "numeric, integer", "numeric, number"]


def workload(case: str, events: int) -> list[list[bytes]]:
    """The flat fields of `events` entries, as Redis hands them to the worker."""
    pick = random.Random(7)
    out = []
    for n in range(events):
        key = pick.randrange(1000)
        cents = pick.randint(-99_999, 99_999)
        amount = f"{cents // 100}.{cents % 100:02d}"
        if case == "no numeric":
            data = {"id": key, "status": "paid"} if n % 2 else {"id": key, "views": 1}
            raw = json.dumps(data, separators=(",", ":")).encode()
        else:
            literal = {
                "numeric, text": f'"{amount}"',
                "numeric, integer": str(cents),
            }.get(case, amount)
            raw = b'{"id":%d,"total":%s}' % (key, literal.encode())
        op = b"set" if n % 2 else b"incr"
        out.append([b"key", str(key).encode(), b"op", op, b"data", raw])
    return out


def measure(case: str, flats: list[list[bytes]]) -> tuple[float, float]:
    """µs per event to decode, then to merge, in the package importable as `streamsink`."""
    table_mod = importlib.import_module("streamsink.schemas.table")
    wire = importlib.import_module("streamsink.schemas.wire")
    try:  # the merge rules live in schemas/ since issue 17; a baseline may be older
        merge_mod = importlib.import_module("streamsink.schemas.merge")
    except ModuleNotFoundError:
        merge_mod = importlib.import_module("streamsink.consumers.merge")
    Column, ColumnType, Policy, Table = (
        table_mod.Column,
        table_mod.ColumnType,
        table_mod.Policy,
        table_mod.Table,
    )
    if case == "no numeric":
        columns = {
            "id": Column(ColumnType.INT),
            "status": Column(ColumnType.TEXT),
            "views": Column(ColumnType.INT, Policy.SUM),
        }
    elif case == "float column":
        columns = {"id": Column(ColumnType.INT), "total": Column(ColumnType.FLOAT, Policy.SUM)}
    else:
        total = Column(ColumnType.NUMERIC, Policy.SUM, precision=12, scale=2)
        columns = {"id": Column(ColumnType.INT), "total": total}
    table = Table("orders", ("id",), columns)

    def check(event: Any) -> Any:
        table_mod.validate(event, table)
        return table

    unpack = wire.unpacker(table, check)
    started = time.process_time()
    decoded = [unpack(flat) for flat in flats]
    decoding = time.process_time() - started
    entries = [merge_mod.Entry(f"1-{n}", event, found) for n, (event, found) in enumerate(decoded)]
    started = time.process_time()
    for start in range(0, len(entries), 1000):
        merged = merge_mod.merge(entries[start : start + 1000])
        assert not merged.refused
    merging = time.process_time() - started
    return decoding / len(flats) * 1e6, merging / len(flats) * 1e6


def child(case: str, events: int) -> None:
    """One run of one case, in a fresh process (its results printed as JSON)."""
    print(json.dumps(measure(case, workload(case, events))))


def run(case: str, events: int, path: str | None) -> tuple[float, float]:
    env_path = [path] if path else []
    code = (  # the bench from here, the package from `path` when given
        f"import sys; import bench.numeric as b; sys.path[:0] = {env_path!r}; "
        f"b.child({case!r}, {events})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    decode, merge = json.loads(out)
    return float(decode), float(merge)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--baseline", help="a checkout of the code before numeric columns")
    args = parser.parse_args()
    rows: list[tuple[str, str, float, float]] = []
    plans: list[tuple[str, str, str | None]] = [("this branch", case, None) for case in CASES]
    if args.baseline:
        plans += [("baseline", case, args.baseline) for case in CASES[:2]]
    results: dict[int, list[tuple[float, float]]] = {n: [] for n in range(len(plans))}
    for _ in range(args.runs):  # interleaved, so that a busy spell hits every row alike
        for n, (_, case, path) in enumerate(plans):
            results[n].append(run(case, args.events, path))
    for n, (code, case, _) in enumerate(plans):
        decode = statistics.median(r[0] for r in results[n])
        merge = statistics.median(r[1] for r in results[n])
        rows.append((code, case, decode, merge))
    print(f"{args.events:,} events a run, median of {args.runs} runs, µs per event")
    print("| code | case | decode | merge |\n|---|---|---:|---:|")
    for code, case, decode, merge in rows:
        print(f"| {code} | {case} | {decode:.2f} | {merge:.2f} |")


if __name__ == "__main__":
    main()

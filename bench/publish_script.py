"""What Redis spends per event in the publish script: the read model's floor (issue 16).

    python bench/publish_script.py [--events 50000] [--runs 7] [--redis-url URL]

Redis' CPU (INFO cpu, so use a Redis of the bench's own, e.g. `redis-server --port 6391
--save ''`) per event for the same events as bench/producer.py (task updates over 1,000
rows, 125 events a call, 8 shards), the calls prepared before the clock starts, so only
Redis' work counts:

  Lua: XADD                    a bare script: one XADD per event (3 values an event)
  Lua: XADD + HSET             and the HSET of the row's four fields (values sent apart)
  Lua: XADD + HSET + PEXPIRE   and the row's TTL
  Lua: XADD + HSET + PEXPIREAT the TTL as the time it ends (Redis rewrites a PEXPIRE into
                               that): the least any read model kept as a hash per key with
                               a TTL, written by the publishing script, can cost
  streamsink, read model off   the publish script as the producers send it
  streamsink, read model on    the same with the table's read model
  streamsink, an id per event  read model off, each event with an idempotency id (issue 18.4)
  streamsink, off, as EVAL     read model off, the script's text in each call (EVAL), as the
                               asyncio producer sends it; the others go by SHA1 (EVALSHA)

Rows run one after the other in each run; the table gives medians and each row's cost
over the first row, the cost the read model cannot go under being the fourth row's.

    python bench/publish_script.py --instructions [--events 10000]

counts instead the instructions Redis runs per event, in a redis-server of its own under
valgrind's callgrind (counters zeroed before each row, read after it): the same on every
run, where CPU time on a shared machine varies by a third from run to run. Needs
`valgrind` (apt-get install valgrind) and `redis-server` on the PATH; one run is enough.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import redis
from producer import MODEL, SHARDS, TASKS, make_events, with_ids  # bench/ is first on the path

from streamsink import Config, create_stream
from streamsink.schemas import StreamSpec
from streamsink.streams import Keys
from streamsink.streams.publish import Preparer, ProducerSettings, publish_script

BATCH = 1000
"""Events a publish call, spread over the shards (~125 a script call)."""

_LOOP = "for i = 1, #ARGV, {step} do\n{body}\nend"
_XADD = "redis.call('XADD', KEYS[1], '*', 'key', ARGV[i], 'op', 'set', 'data', ARGV[i + 2])"
_ROW = "local row = KEYS[2] .. ARGV[i]"
_HSET = (
    "redis.call('HSET', row, 'id', ARGV[i], 'status', ARGV[i + 3], 'progress', ARGV[i + 4],"
    " 'worker', ARGV[i + 5])"
)
_PEXPIRE = "redis.call('PEXPIRE', row, ARGV[i + 6])"
_PEXPIREAT = "redis.call('PEXPIREAT', row, ARGV[i + 6])"
BARE = {
    "Lua: XADD": (3, _XADD),
    "Lua: XADD + HSET": (7, "\n".join((_XADD, _ROW, _HSET))),
    "Lua: XADD + HSET + PEXPIRE": (7, "\n".join((_XADD, _ROW, _HSET, _PEXPIRE))),
    "Lua: XADD + HSET + PEXPIREAT": (7, "\n".join((_XADD, _ROW, _HSET, _PEXPIREAT))),
}


def bare_calls(
    client: redis.Redis, keys: Keys, count: int, step: int, body: str
) -> list[list[Any]]:
    """The bare script's calls for `count` events: per shard, one EVALSHA a batch."""
    sha = client.script_load(_LOOP.format(step=step, body=body))
    at = int(time.time() * 1000) if _PEXPIREAT in body else 0  # the TTL's end, not its length
    events: list[Any] = make_events(count)
    calls: list[list[Any]] = []
    for start in range(0, len(events), BATCH):
        by_shard: dict[int, list[Any]] = {}
        for event in events[start : start + BATCH]:
            shard = int(event.key) % SHARDS
            values = [event.key, "set", repr(event.data)]  # the data's size is what counts
            if step > 3:
                data = event.data
                values += [data["status"], data["progress"], data["worker"]]
                ttl = MODEL.ttl_ms(data["status"])
                values.append(str(at + ttl))
            by_shard.setdefault(shard, []).extend(values)
        for shard, values in by_shard.items():
            row_prefix = keys.row_prefix("tasks", shard) + "tasks:"
            calls.append(["EVALSHA", sha, 2, keys.shard("tasks", shard), row_prefix, *values])
    return calls


def streamsink_calls(
    keys: Keys, count: int, read_model: bool, ids: bool = False, by_sha: bool = True
) -> list[list[Any]]:
    """The producers' script calls for `count` events (`Preparer.commands`): by SHA1 as
    the sync producer sends them, or with the script's text as the asyncio one does."""
    streams = {"tasks": StreamSpec("tasks", SHARDS, "tasks")}
    config = Config(streams=streams, tables={"tasks": TASKS}, prefix=keys.prefix)
    if read_model:
        config = dataclasses.replace(config, read_models={"tasks": MODEL})
    prep = Preparer(config, ProducerSettings())
    prep.check_shards("tasks", SHARDS)
    events = with_ids(make_events(count)) if ids else make_events(count)
    calls: list[list[Any]] = []
    for start in range(0, len(events), BATCH):
        prepared = prep.encode("tasks", events[start : start + BATCH])
        made = prep.commands([("tasks", prepared, None)], by_sha=by_sha)
        calls += [command.args for command in made]
    return calls


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Callgrind:
    """A redis-server under callgrind: instructions it runs between `zero` and `total`."""

    def __init__(self, pid: int, out: str) -> None:
        self.pid, self.out = pid, out

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], check=True, capture_output=True)

    def total(self) -> int:
        before = set(glob.glob(f"{self.out}.*"))
        subprocess.run(["callgrind_control", "-d", str(self.pid)], check=True, capture_output=True)
        (dump,) = set(glob.glob(f"{self.out}.*")) - before
        with open(dump, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        raise RuntimeError(f"{dump}: no instruction total")


@contextlib.contextmanager
def callgrind_redis() -> Iterator[tuple[redis.Redis, Callgrind]]:
    """A throwaway redis-server under callgrind on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "callgrind.out")
        server = subprocess.Popen(
            [
                *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server"),
                *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port)
        try:
            for _ in range(300):
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    break
                time.sleep(0.1)
            yield client, Callgrind(server.pid, out)
        finally:
            server.terminate()
            server.wait()


def run_once(client: redis.Redis, count: int, counter: Callgrind | None = None) -> dict[str, float]:
    """µs of Redis CPU per event, per row, each on a fresh prefix (with `counter`:
    instructions per event instead)."""
    rows: dict[str, Callable[[Keys], list[list[Any]]]] = {
        name: partial(bare_calls, client, count=count, step=step, body=body)
        for name, (step, body) in BARE.items()
    }
    rows["streamsink, read model off"] = partial(streamsink_calls, count=count, read_model=False)
    rows["streamsink, read model on"] = partial(streamsink_calls, count=count, read_model=True)
    rows["streamsink, an id per event"] = partial(
        streamsink_calls, count=count, read_model=False, ids=True
    )
    rows["streamsink, off, as EVAL"] = partial(
        streamsink_calls, count=count, read_model=False, by_sha=False
    )
    client.script_load(publish_script())
    out = {}
    for name, make in rows.items():
        keys = Keys(f"benchs{uuid.uuid4().hex[:8]}")
        create_stream(client, keys, "tasks", SHARDS)
        calls = make(keys)
        if counter is not None:
            counter.zero()
        before = redis_cpu(client)
        for start in range(0, len(calls), SHARDS):
            pipe = client.pipeline(transaction=False)
            for args in calls[start : start + SHARDS]:
                pipe.execute_command(*args)
            pipe.execute()
        if counter is not None:
            out[name] = counter.total() / count
        else:
            out[name] = 1e6 * (redis_cpu(client) - before) / count
        for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
            client.unlink(key)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under callgrind"
    )
    args = parser.parse_args()
    if args.instructions:
        with callgrind_redis() as (client, counter):
            counts = run_once(client, args.events, counter)
        first = next(iter(counts))
        print(f"\n{args.events} events, {SHARDS} shards, a redis-server under callgrind\n")
        print(f"| {'row':<28} | instructions/event | over '{first}' |")
        print(f"|{'-' * 30}|{'-' * 20}|{'-' * 18}|")
        for name, count in counts.items():
            print(f"| {name:<28} | {count:>18,.0f} | {count - counts[first]:>+16,.0f} |")
        return
    client = redis.Redis.from_url(args.redis_url)
    runs = [run_once(client, args.events) for _ in range(args.runs)]
    first = next(iter(runs[0]))
    print(f"\n{args.events} events, {SHARDS} shards, median of {args.runs} runs\n")
    print(f"| {'row':<28} | Redis CPU µs/event | over '{first}' (min-max) |")
    print(f"|{'-' * 30}|{'-' * 20}|{'-' * 27}|")
    for name in runs[0]:
        cost = statistics.median(r[name] for r in runs)
        over = sorted(r[name] - r[first] for r in runs)
        spread = f"{statistics.median(over):+.2f} ({over[0]:+.2f} to {over[-1]:+.2f})"
        print(f"| {name:<28} | {cost:>18.2f} | {spread:>25} |")


if __name__ == "__main__":
    main()

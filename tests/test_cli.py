"""The `streamsink` command, run in-process against the test Redis."""

from __future__ import annotations

import io
import json
from contextlib import closing
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import redis.asyncio as aredis

from streamsink.cli import main
from streamsink.demo import burst
from streamsink.schemas.config import Config, load
from streamsink.schemas.event import Op
from streamsink.schemas.merge import apply_event
from streamsink.schemas.wire import decode
from streamsink.streams.keys import Keys
from streamsink.streams.state import RunState, publish_state

CONFIG = """
[redis]
url = "{url}"
prefix = "{prefix}"
[streams.tasks]
shards = 2
table = "tasks"
[tables.tasks]
key = ["id"]
columns = {{ id = "int", status = "text" }}
[sinks.noop]
type = "function"
function = "json:dumps"
[groups.g]
stream = "tasks"
sinks = ["noop"]
"""


@pytest.fixture
def config(tmp_path: Path, keys: Keys, redis_url: str) -> str:
    path = tmp_path / "streamsink.toml"
    path.write_text(CONFIG.format(url=redis_url, prefix=keys.prefix))
    assert main(["--config", str(path), "streams", "create"]) == 0
    return str(path)


def entries(r: redis.Redis, keys: Keys) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [e for shard in range(2) for e in r.xrange(keys.shard("tasks", shard))]


def test_publish_one_event(config: str, r: redis.Redis, keys: Keys) -> None:
    args = ["--config", config, "publish", "tasks", "--key", "task:1"]
    assert main([*args, "--data", '{"id": 1, "status": "done"}', "--id", "e-1"]) == 0
    assert main([*args, "--data", '{"id": 1, "status": "done"}', "--id", "e-1"]) == 0
    [(_, fields)] = entries(r, keys)
    assert decode(fields).data == {"id": 1, "status": "done"}


def test_publish_file_is_all_or_nothing(
    config: str, r: redis.Redis, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps({"key": f"t{i}", "data": {"id": i, "status": "x"}}) for i in range(50)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines, '{"key": "t", "data": {"id": "nope"}}']))
    assert main(["--config", config, "publish", "tasks", "--file", str(bad)]) == 2
    assert "line 51" in capsys.readouterr().err
    assert entries(r, keys) == []
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines) + "\n\n")
    assert main(["--config", config, "publish", "tasks", "--file", str(good)]) == 0
    assert len(entries(r, keys)) == 50


def test_publish_of_a_missing_file_is_bad_input(
    config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--config", config, "publish", "tasks", "--file", "nope.jsonl"]) == 2
    assert capsys.readouterr().err == "streamsink: error: nope.jsonl: No such file or directory\n"


def test_publish_stdin(
    config: str, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "\n".join(json.dumps({"key": "t", "op": "del", "data": {"id": i}}) for i in range(5))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main(["--config", config, "publish", "tasks", "--file", "-"]) == 0
    assert len(entries(r, keys)) == 5


def test_publish_to_a_missing_stream_fails(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", config, "publish", "nope", "--key", "k", "--data", "{}"]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_status_and_dead_letters(
    config: str, r: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = keys.dead("tasks", 1, "g")
    r.xadd(
        dead,
        {
            "reason": "DecodeError: data: bad",
            "entry": "1-1",
            "deliveries": "1",
            "f:key": "task:9",
            "f:op": "set",
            "f:data": '{"id": 9, "status": "ok"}',
        },
    )
    r.xadd(
        dead,
        {
            "reason": "other",
            "entry": "1-2",
            "deliveries": "1",
            "f:key": "x",
            "f:op": "set",
            "f:data": "{}",
        },
    )
    assert main(["--config", config, "status"]) == 0
    status = capsys.readouterr().out
    assert "group g on tasks" in status and "tasks" in status
    assert main(["--config", config, "dead", "list", "tasks", "g"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 and "DecodeError" in listed[0]
    first, second = (line.split("\t")[0] for line in listed)
    assert first.startswith("1/") and second.startswith("1/")
    assert main(["--config", config, "dead", "replay", "tasks", "g", first]) == 0
    [(_, fields)] = r.xrange(keys.shard("tasks", 1))
    assert decode(fields).data == {"id": 9, "status": "ok"}
    assert main(["--config", config, "dead", "drop", "tasks", "g", second]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == "dropped 1 dead letters"
    assert r.xlen(dead) == 0
    assert main(["--config", config, "dead", "drop", "tasks", "g", "9-9"]) == 2


def dead_letter(r: redis.Redis, keys: Keys, shard: int, dead_id: str, entry: str) -> None:
    fields = {"reason": "other", "entry": entry, "deliveries": "1", "f:key": "x", "f:op": "set"}
    r.xadd(keys.dead("tasks", shard, "g"), {**fields, "f:data": "{}"}, id=dead_id)


def test_dead_letters_are_addressed_by_shard_and_id(
    config: str, r: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    """One dead-letter ID on two shards: `SHARD/ID` names one; the plain ID is refused with
    both candidates; an ID on one shard only still works alone."""
    dead_letter(r, keys, 0, "5-1", "1-1")
    dead_letter(r, keys, 1, "5-1", "1-2")
    dead_letter(r, keys, 1, "6-1", "1-3")
    dead = ["--config", config, "dead"]
    assert main([*dead, "list", "tasks", "g"]) == 0
    listed = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines()]
    assert listed == [["0/5-1", "entry 1-1"], ["1/5-1", "entry 1-2"], ["1/6-1", "entry 1-3"]]

    assert main([*dead, "drop", "tasks", "g", "5-1"]) == 2
    assert "5-1 is on several shards: name one of 0/5-1, 1/5-1" in capsys.readouterr().err
    assert r.xlen(keys.dead("tasks", 0, "g")) == 1 and r.xlen(keys.dead("tasks", 1, "g")) == 2

    assert main([*dead, "replay", "tasks", "g", "1/5-1"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    [(new_id, _)] = r.xrange(keys.shard("tasks", 1))
    assert line == f"1/5-1 -> {new_id.decode()}"
    assert r.xlen(keys.dead("tasks", 0, "g")) == 1 and r.xlen(keys.dead("tasks", 1, "g")) == 1

    assert main([*dead, "drop", "tasks", "g", "6-1"]) == 0  # unambiguous: one shard has it
    assert main([*dead, "drop", "tasks", "g", "1/5-1"]) == 2  # replayed already
    assert "no such dead letter: 1/5-1" in capsys.readouterr().err
    assert r.xlen(keys.dead("tasks", 1, "g")) == 0 and r.xlen(keys.dead("tasks", 0, "g")) == 1


def test_dead_letters_of_an_unknown_group_or_stream_are_an_error(
    config: str, r: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    r.xgroup_create(keys.shard("tasks", 0), "g", id="0", mkstream=True)
    assert main(["--config", config, "dead", "list", "tasks", "g"]) == 0  # known, no letters
    assert capsys.readouterr().out == ""
    assert main(["--config", config, "dead", "list", "tasks", "nope"]) == 2
    assert "stream 'tasks' has no group 'nope' (its groups: g)" in capsys.readouterr().err
    assert main(["--config", config, "dead", "replay", "nope", "g", "--all"]) == 2
    assert "stream 'nope' does not exist" in capsys.readouterr().err


async def test_status_shows_lag_pending_and_each_shards_state(
    config: str,
    r: redis.Redis,
    ar: aredis.Redis,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for shard in range(2):
        r.xgroup_create(keys.shard("tasks", shard), "g", id="0", mkstream=True)
    key = keys.shard("tasks", 0)
    for n in range(5):
        r.xadd(key, {"n": n})
    r.xreadgroup("g", "c", {key: ">"}, count=2)  # 2 pending, 3 not delivered yet
    r.set(keys.lease("tasks", 0, "g"), "w1", px=10_000)
    r.set(keys.epoch("tasks", 0, "g"), 4)
    await publish_state(
        ar,
        keys,
        "tasks",
        0,
        "g",
        state=RunState.RETRYING,
        worker="w1",
        epoch=4,
        error="connection refused\n(is PostgreSQL up?)",
    )
    assert main(["--config", config, "status"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("group g on tasks") :].splitlines()
    header, shard0, error, shard1 = (line.split() for line in lines[1:5])
    assert header == ["shard", "length", "lag", "pending", "dead", "epoch", "state", "owner"]
    assert shard0[:7] == ["0", "5", "3", "2", "0", "4", "retrying"]
    assert shard0[7] in {"0s", "1s", "2s"} and shard0[8] == "w1"
    assert " ".join(error) == f"retrying {shard0[7]}: connection refused\\n(is PostgreSQL up?)"
    assert shard1 == ["1", "0", "0", "0", "0", "0", "idle", "-"]
    assert lines[5] == "outstanding 5: lag 3 + pending 2"


def test_dead_list_escapes_control_bytes(
    config: str, r: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    r.xadd(
        keys.dead("tasks", 0, "g"),
        {
            "reason": "DecodeError: key: bad\x1b[2J\n",
            "entry": "1-1",
            "deliveries": "1",
            "f:key": "k",
            "f:op": "set",
            "f:data": b'{"s":"\x00\x07\tx\xc2\x85"}',
        },
    )
    assert main(["--config", config, "dead", "list", "tasks", "g"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.split("\t")[2:] == [
        "DecodeError: key: bad\\x1b[2J\\n",
        '{"s":"\\x00\\x07\\tx\\x85"}',
    ]
    assert all(c.isprintable() for c in line.replace("\t", ""))


def test_demo_drains_the_burst_into_postgresql_exactly(
    keys: Keys,
    redis_url: str,
    database_url: str,
    r: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's first command: every table ends as the burst applied event by event."""
    args = ["--redis-url", redis_url, "--database-url", database_url, "--prefix", keys.prefix]
    assert main([*args, "demo"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.strip().startswith("all "))
    _, events, writes, ratio, saved = total.split()
    assert int(events) == 141_966
    assert 0 < int(writes) < int(events)
    assert float(ratio.rstrip("x")) > 2
    assert int(saved) == int(events) - int(writes)
    assert "writes saved" in out
    for group, stream in (("tasks-writer", "tasks"), ("stats-writer", "stats")):
        for shard in range(2):
            assert r.xpending(keys.shard(stream, shard), group)["pending"] == 0

    config = load_demo()
    state: dict[tuple[str, Any], Any] = {}
    appended = 0
    for stream, event in burst():
        table = config.tables[config.streams[stream].table or ""]
        if event.op is Op.APPEND:
            appended += 1
            continue
        slot = (table.name, table.row_key(event.data))
        state[slot] = apply_event(state.get(slot), event, table)
    with closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT post_id, views, likes FROM streamsink_demo.post_stats")
        stats = {(row[0],): {"post_id": row[0], "views": row[1], "likes": row[2]} for row in cur}
        cur.execute("SELECT post_id, user_id FROM streamsink_demo.post_likes")
        likes = {tuple(row) for row in cur}
        cur.execute("SELECT id, status, progress FROM streamsink_demo.tasks")
        tasks = {(row[0],): (row[1], row[2]) for row in cur}
        cur.execute("SELECT count(*) FROM streamsink_demo.activity_log")
        (logged,) = cur.fetchone() or (0,)
    expected = {k: v for (t, k), v in state.items() if t == "post_stats" and v is not None}
    assert stats == expected
    assert likes == {k for (t, k), v in state.items() if t == "post_likes" and v is not None}
    assert tasks == {k: (v["status"], v["progress"]) for (t, k), v in state.items() if t == "tasks"}
    assert logged == appended == 10_000


def load_demo() -> Config:
    with resources.as_file(resources.files("streamsink") / "demo.toml") as path:
        return load(path)


def test_status_json_and_watch(
    config: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", config, "streams", "create"]) == 0
    capsys.readouterr()
    assert main(["--config", config, "status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == 1
    (group,) = document["groups"]
    assert group["name"] == "g" and [s["shard"] for s in group["shards"]] == [0, 1]
    assert {
        "length",
        "lag",
        "pending",
        "owner",
        "epoch",
        "dead",
        "telemetry",
        "state",
        "outstanding",
    } <= set(group["shards"][0])
    assert group["totals"]["coalescing_ratio"] is None and group["hot_keys"] == []

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("time.sleep", interrupt)
    assert main(["--config", config, "status", "--watch", "0.5"]) == 130
    out = capsys.readouterr().out
    assert "every 0.5 s" in out and "group g on tasks" in out


def test_worker_help_names_the_endpoint_and_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    out = capsys.readouterr().out
    assert "--http" in out and "--log-format" in out


def test_demo_keys_are_the_ones_its_tables_spell() -> None:
    config = load_demo()
    assert {t.name for t in config.tables.values() if t.key_of is not None} == {
        "tasks",
        "post_likes",
        "post_stats",
    }
    for stream, event in burst():
        config.validate(stream, event)  # key_format included


def test_global_options_go_before_or_after_any_command(
    config: str, r: redis.Redis, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    other = f"{keys.prefix}x"  # cleaned up with the test's prefix
    for args in (
        ["--prefix", other, "streams", "create", "a", "--shards", "1"],
        ["streams", "create", "b", "--shards", "1", "--prefix", other],
        ["streams", "create", "--prefix", other, "c", "--shards", "1"],
        ["--prefix", "ignored", "streams", "create", "d", "--shards", "1", "--prefix", other],
    ):
        assert main(args) == 0, args
    assert r.smembers(Keys(other).index()) == {b"a", b"b", b"c", b"d"}
    for key in r.scan_iter(match=f"{other}:*"):
        r.delete(key)
    capsys.readouterr()
    assert main(["status", "--config", config]) == 0
    after = capsys.readouterr().out
    assert main(["--config", config, "status"]) == 0
    assert capsys.readouterr().out == after and "group g on tasks" in after


def test_help_names_every_command_as_available(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "later" not in shown
    for command in ("check", "streams", "publish", "status", "dead", "worker", "tables", "demo"):
        assert f"    {command}" in shown

"""`streamsink publish` with numeric columns: JSON numbers reach the stream exactly as written."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from streamsink.cli import main
from streamsink.schemas.wire import decode
from streamsink.streams.keys import Keys

CONFIG = """
[redis]
url = "{url}"
prefix = "{prefix}"
[streams.orders]
shards = 1
table = "orders"
[tables.orders]
key = ["id"]
[tables.orders.columns]
id = "int"
total = {{ type = "numeric", precision = 20, scale = 2 }}
ratio = "float"
"""


@pytest.fixture
def config(tmp_path: Path, keys: Keys, redis_url: str) -> str:
    path = tmp_path / "streamsink.toml"
    path.write_text(CONFIG.format(url=redis_url, prefix=keys.prefix))
    assert main(["--config", str(path), "streams", "create"]) == 0
    return str(path)


def published(r: redis.Redis, keys: Keys) -> list[dict[str, object]]:
    return [dict(decode(fields).data) for _, fields in r.xrange(keys.shard("orders", 0))]


def test_publish_keeps_the_digits_a_float_would_round(
    config: str, r: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    big = "123456789012345678.91"  # 20 digits: a float keeps 17
    args = ["--config", config, "publish", "orders", "--key", "1"]
    assert main([*args, "--data", f'{{"id": 1, "total": {big}, "ratio": 0.5}}']) == 0
    lines = tmp_path / "orders.jsonl"
    lines.write_text(
        json.dumps({"key": "2", "data": {"id": 2, "ratio": 0.25}})[:-2] + f', "total": {big}}}}}\n'
    )
    assert main(["--config", config, "publish", "orders", "--file", str(lines)]) == 0
    assert published(r, keys) == [
        {"id": 1, "total": big, "ratio": 0.5},  # as text on the wire, exact
        {"id": 2, "ratio": 0.25, "total": big},
    ]
    assert Decimal(big) != Decimal(float(big))  # what reading it as a float would have done


def test_publish_refuses_digits_past_the_scale_instead_of_rounding_them(
    config: str, r: redis.Redis, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--config", config, "publish", "orders", "--key", "1"]
    too_fine = "0.1000000000000000055511151231257827"  # a float reads 0.1
    assert main([*args, "--data", f'{{"id": 1, "total": {too_fine}}}']) == 2
    assert "has more than 2 digits after the point" in capsys.readouterr().err
    lines = tmp_path / "orders.jsonl"
    lines.write_text(f'{{"key": "1", "data": {{"id": 1, "total": {too_fine}}}}}\n')
    assert main(["--config", config, "publish", "orders", "--file", str(lines)]) == 2
    assert "line 1: data.total" in capsys.readouterr().err
    assert published(r, keys) == []

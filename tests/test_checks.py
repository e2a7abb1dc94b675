"""`streamsink check`, and the same checks on every command that loads a config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamsink.cli import main

GOOD = """
[streams.orders]
shards = 2
table = "orders"

[tables.orders]
key = ["id"]
columns = { id = "int", status = "text", total = "float" }

[sinks.db]
type = "postgres"

[sinks.hooks]
type = "http"
secret_env = "CHECK_TEST_SECRET"

[groups.pg-writer]
stream = "orders"
sinks = ["db"]
max_events = 1000
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "streamsink.toml"
    path.write_text(text)
    return str(path)


def test_a_good_config_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHECK_TEST_SECRET", "s3cret")
    path = write(tmp_path, GOOD)
    assert main(["check", "--config", path]) == 0
    assert capsys.readouterr().out == f"{path}: ok: 1 streams, 1 tables, 1 groups, 2 sinks\n"
    assert main(["--config", path, "check"]) == 0
    assert main(["check", path]) == 0


MISTAKES = [
    pytest.param(
        ("max_events = 1000", "max_event = 1000"),
        "group 'pg-writer': unknown setting 'max_event'; known: [",
        "max_event = 1000",
        id="typo-in-a-group-setting",
    ),
    pytest.param(
        ("max_events = 1000", 'max_events = "1000"'),
        "group 'pg-writer': max_events must be a non-negative integer",
        'max_events = "1000"',
        id="group-setting-of-the-wrong-type",
    ),
    pytest.param(
        ('type = "postgres"', 'type = "postgresql"'),
        "sink 'db': type 'postgresql' is not available in this version (available: postgres, ",
        'type = "postgresql"',
        id="wrong-sink-type",
    ),
    pytest.param(
        ('type = "postgres"', 'type = "postgres"\npool_szie = 4'),
        "sink 'db': unknown options ['pool_szie']",
        "pool_szie = 4",
        id="typo-in-a-sink-option",
    ),
    pytest.param(
        ('type = "postgres"', 'type = "postgres"\npool_size = "4"'),
        "sink 'db': pool_size must be a int",
        'pool_size = "4"',
        id="sink-option-of-the-wrong-type",
    ),
    pytest.param(
        ('secret_env = "CHECK_TEST_SECRET"', 'secret_env = "CHECK_TEST_SECRET"\nrate = -1'),
        "sink 'hooks'",
        "rate = -1",
        id="bad-endpoint-setting",
    ),
    pytest.param(
        (
            'secret_env = "CHECK_TEST_SECRET"',
            'secret_env = "CHECK_TEST_SECRET"\n[sinks.hooks.endpoints."https://a.example/"]\n'
            "rate_limit = 5",
        ),
        "sink 'hooks', endpoint 'https://a.example/': unknown options ['rate_limit']",
        "rate_limit = 5",
        id="typo-in-an-endpoint",
    ),
    pytest.param(
        ("shards = 2", 'shards = "2"'),
        "stream 'orders': shards must be a positive integer, got '2'",
        'shards = "2"',
        id="stream-setting-of-the-wrong-type",
    ),
    pytest.param(
        ('total = "float"', 'total = "flaot"'),
        "table 'orders' column 'total': type: 'flaot' is not one of",
        'total = "flaot"',
        id="wrong-column-type",
    ),
    pytest.param(
        ('sinks = ["db"]', 'sinks = ["dbb"]'),
        "group 'pg-writer': sink 'dbb' is not declared",
        'sinks = ["dbb"]',
        id="undeclared-sink",
    ),
    pytest.param(
        ("[groups.pg-writer]", "[group.pg-writer]"),
        "config: unknown setting 'group'",
        "[group.pg-writer]",
        id="typo-in-a-section",
    ),
]


@pytest.mark.parametrize(("change", "message", "on_line"), MISTAKES)
def test_check_names_file_section_and_setting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: tuple[str, str],
    message: str,
    on_line: str,
) -> None:
    """`FILE:LINE: section: setting ...`, LINE being the line of the mistake."""
    monkeypatch.setenv("CHECK_TEST_SECRET", "s3cret")
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    assert main(["check", "--config", path]) == 1
    err = capsys.readouterr().err
    found = re.search(rf"^streamsink: error: {re.escape(path)}:(\d+): (.*)$", err, flags=re.M)
    assert found is not None, err
    assert message in found.group(2), err
    assert on_line in Path(path).read_text().splitlines()[int(found.group(1)) - 1]
    # Every other command that loads the config refuses it the same way (exit 2: bad input),
    # before it touches Redis or PostgreSQL (the URLs point at nothing).
    nowhere = [
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--database-url",
        "postgresql://x@127.0.0.1:1/x",
    ]
    for command in (["status"], ["streams", "create"], ["tables", "create"], ["worker"]):
        assert main([*command, "--config", path, *nowhere]) == 2, command
        assert f"{path}:{found.group(1)}: {message}" in capsys.readouterr().err, command


def test_every_problem_of_groups_and_sinks_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHECK_TEST_SECRET", "s3cret")
    text = GOOD.replace("max_events = 1000", "max_event = 1000").replace(
        'type = "postgres"', 'type = "postgresql"'
    )
    path = write(tmp_path, text)
    assert main(["check", path]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"streamsink: error: {path}:") for line in lines)


def test_check_also_asks_what_the_host_must_provide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing signing secret or function module fails `check` (and a worker), not
    `status` or `publish` on a producer's host, which need not have them."""
    monkeypatch.delenv("CHECK_TEST_SECRET", raising=False)
    text = GOOD + '\n[sinks.fn]\ntype = "function"\nfunction = "no_such_module_here:write"\n'
    path = write(tmp_path, text)
    assert main(["check", path]) == 1
    err = capsys.readouterr().err
    secret = rf"{re.escape(path)}:\d+: sink 'hooks': environment variable CHECK_TEST_SECRET is not"
    assert re.search(secret, err), err
    function = (
        rf"{re.escape(path)}:\d+: sink 'fn': function sink: cannot load 'no_such_module_here:"
    )
    assert re.search(function, err), err
    nowhere = ["--redis-url", "redis://127.0.0.1:1/0"]
    assert main(["status", "--config", path, *nowhere]) == 2
    assert "Connection refused" in capsys.readouterr().err  # got as far as Redis


def test_check_needs_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("STREAMSINK_CONFIG", raising=False)
    assert main(["check"]) == 1
    assert "name the config file" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.toml")]) == 1
    assert "missing.toml: cannot read" in capsys.readouterr().err
    monkeypatch.setenv("STREAMSINK_CONFIG", write(tmp_path, GOOD))
    monkeypatch.setenv("CHECK_TEST_SECRET", "s3cret")
    assert main(["check"]) == 0

"""A config checked whole, as a worker would need it, before any command uses it.

`load` checks the file's layout and how its parts refer to each other; this adds what
only the worker used to find out at start-up (each group's settings, each sink's type
and options), so that `streamsink check`, `streams create`, `tables create` and `status`
refuse a typo as a worker would. `check_environment` adds what the host must provide.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamsink.consumers.settings import GroupSettings
from streamsink.errors import ConfigError
from streamsink.schemas.config import Config, load
from streamsink.sinks import check_sink


def problems(config: Config, environment: bool = False) -> list[str]:
    """Every problem of the config's groups and sinks, one message each."""
    found: list[str] = []
    for name, group in config.groups.items():
        _attempt(found, GroupSettings.from_options, name, group.options)
    for spec in config.sinks.values():
        _attempt(found, check_sink, spec, config, environment)
    return found


def load_checked(path: str | os.PathLike[str]) -> Config:
    """`load` and `check_config`: every message as `FILE:LINE: problem` where the line is known."""
    try:
        config = load(path)
    except ConfigError as exc:
        prefix = f"{path}: "
        message = str(exc)
        if not message.startswith(prefix):
            raise
        _raise([message[len(prefix) :]], path)
        raise
    check_config(config, path)
    return config


def check_config(config: Config, path: str | os.PathLike[str] | None = None) -> None:
    """ConfigError naming the file and, one a line, every problem `problems` finds."""
    _raise(problems(config), path)


def check_environment(config: Config, path: str | os.PathLike[str] | None = None) -> None:
    """`check_config`, plus what this host must provide (secrets, function modules)."""
    _raise(problems(config, environment=True), path)


def _attempt(found: list[str], check: Callable[..., object], *args: Any) -> None:
    try:
        check(*args)
    except ConfigError as exc:
        found.append(str(exc))


def _raise(found: list[str], path: str | os.PathLike[str] | None) -> None:
    if not found:
        return
    if path is None:
        raise ConfigError("\n".join(found))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    lines = [(problem, locate(text, problem)) for problem in found]
    raise ConfigError(
        "\n".join(
            f"{path}:{line}: {problem}" if line else f"{path}: {problem}" for problem, line in lines
        )
    )


_OWNER = re.compile(r"^(stream|table|sink|group) '([^']+)'(?: column '([^']+)')?")
_SECTION = re.compile(r"^\[([\w-]+)\]|^config\b")
_SETTING = (
    re.compile(r"unknown (?:setting|options) \[?'([^']+)'"),
    re.compile(r"^[:,]?\s*(?:endpoint '[^']*': )?(\w+) (?:must|needs|is not)"),
    re.compile(r"^[:,]?\s*(stream|sink|table|type) '[^']*' is not"),
    re.compile(r"^[:,]?\s*needs (?:a |the )?(type|stream)"),
)


def locate(text: str, problem: str) -> int | None:
    """The line of the TOML `text` a problem message is about (1-based), if it can be found.

    A message names its section (`group 'g'`, `[redis]`, `config`) and usually the setting;
    the line is the setting's within that section (or its sub-tables), else the section's.
    """
    lines = text.splitlines()
    section: tuple[str, ...]
    owner = _OWNER.match(problem)
    if owner:
        kind, name, column = owner.groups()
        section = (f"{kind}s", name)
        rest = problem[owner.end() :]
    elif top := _SECTION.match(problem):
        section = (top.group(1),) if top.group(1) else ()
        rest = problem[top.end() :]
        column = None
    else:
        return None
    setting = column or _setting(rest)
    if setting == "sink" and owner and owner.group(1) == "group":
        setting = "sinks"
    start, end = _section_lines(lines, section)
    if start is None:
        return None
    if setting is not None:
        key = re.compile(
            rf'(?:^|[{{,\s])"?{re.escape(setting)}"?\s*=|^\[[^\]]*\b{re.escape(setting)}\b'
        )
        for number in range(start, end):
            if key.search(lines[number].split("#", 1)[0]):
                return number + 1
    return start + 1 if section else None


def _setting(rest: str) -> str | None:
    for pattern in _SETTING:
        found = pattern.search(rest)
        if found:
            return found.group(1)
    return None


def _section_lines(lines: list[str], section: tuple[str, ...]) -> tuple[int | None, int]:
    """First and past-last line index of a section and its sub-tables (all for top level)."""
    if not section:
        return 0, len(lines)
    path = r"\.".join(rf'"?{re.escape(part)}"?' for part in section)
    header = re.compile(rf"^\s*\[\s*{path}\s*(\]|\.)")
    start = next((n for n, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return None, 0
    end = start + 1
    while end < len(lines) and not (
        lines[end].lstrip().startswith("[") and not header.match(lines[end])
    ):
        end += 1
    return start, end

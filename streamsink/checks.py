"""A config checked whole, as a worker would need it, before any command uses it.

`load` checks the file's layout and how its parts refer to each other; this adds what
only the worker used to find out at start-up (each group's settings, each sink's type
and options), so that `streamsink check`, `streams create`, `tables create` and `status`
refuse a typo as a worker would. `check_environment` adds what the host must provide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from streamsink.consumers.settings import GroupSettings
from streamsink.errors import ConfigError
from streamsink.schemas.config import Config
from streamsink.sinks import check_sink


def problems(config: Config, environment: bool = False) -> list[str]:
    """Every problem of the config's groups and sinks, one message each."""
    found: list[str] = []
    for name, group in config.groups.items():
        _attempt(found, GroupSettings.from_options, name, group.options)
    for spec in config.sinks.values():
        _attempt(found, check_sink, spec, config, environment)
    return found


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
    if found:
        where = f"{path}: " if path is not None else ""
        raise ConfigError("\n".join(f"{where}{problem}" for problem in found))

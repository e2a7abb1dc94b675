"""Where merged batches go: PostgreSQL, HTTP callbacks, user functions (see base.Sink)."""

from __future__ import annotations

from streamsink.errors import ConfigError
from streamsink.schemas.config import Config, SinkSpec
from streamsink.sinks.base import Batch, Rejected, Sink
from streamsink.sinks.function import FunctionSink, TestingSink

__all__ = ["Batch", "FunctionSink", "Rejected", "Sink", "TestingSink", "build_sinks"]

TYPES = ("postgres", "http", "function")
"""The sink types of this version, as `type` in `[sinks.<name>]`."""


def build_sinks(config: Config) -> dict[str, Sink]:
    """Every sink the config's groups use, built from its `[sinks.<name>]` section."""
    used = {name for group in config.groups.values() for name in group.sinks}
    return {name: _build(config.sinks[name], config) for name in sorted(used)}


def check_sink(spec: SinkSpec, config: Config, environment: bool = False) -> None:
    """ConfigError for any option building the sink would refuse, without building it
    (no pool, no client); with `environment`, also what this host must provide: the
    HTTP signing secrets and the function's module."""
    options = _options(spec)
    if spec.type == "postgres":
        from streamsink.sinks.postgres.pool import PostgresSettings

        PostgresSettings.from_options(spec.name, options, config.postgres_dsn)
    elif spec.type == "function":
        path = _function_path(spec, options)
        if environment:
            try:
                FunctionSink.from_path(path)
            except ConfigError as exc:
                raise ConfigError(f"sink {spec.name!r}: {exc}") from None
    elif spec.type == "http":
        from streamsink.sinks.http.settings import HttpSettings

        settings = HttpSettings.from_options(spec.name, options)
        if environment:
            settings.secrets(spec.name)
    else:
        raise ConfigError(
            f"sink {spec.name!r}: type {spec.type!r} is not available in this version "
            f"(available: {', '.join(TYPES)})"
        )


def _options(spec: SinkSpec) -> dict[str, object]:
    """The sink's own options: `max_attempts` is the worker's (see shard.py)."""
    options = dict(spec.options)
    attempts = options.pop("max_attempts", 1)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigError(f"sink {spec.name!r}: max_attempts must be an integer >= 1")
    return options


def _function_path(spec: SinkSpec, options: dict[str, object]) -> str:
    path = options.pop("function", None)
    if not isinstance(path, str) or options or ":" not in path:
        raise ConfigError(
            f"sink {spec.name!r}: a function sink takes one option, "
            "function = 'package.module:function'"
        )
    return path


def _build(spec: SinkSpec, config: Config) -> Sink:
    check_sink(spec, config)
    options = _options(spec)
    if spec.type == "postgres":
        from streamsink.sinks.postgres import PostgresSink

        return PostgresSink.from_options(spec.name, options, config.postgres_dsn)
    if spec.type == "function":
        return FunctionSink.from_path(_function_path(spec, options))
    from streamsink.sinks.http import HttpSink

    return HttpSink.from_options(spec.name, options, config)

"""Where merged batches go: PostgreSQL, HTTP callbacks, user functions (see base.Sink)."""

from __future__ import annotations

from streamsink.errors import ConfigError
from streamsink.schemas.config import Config, SinkSpec
from streamsink.sinks.base import Batch, Rejected, Sink
from streamsink.sinks.function import FunctionSink, TestingSink

__all__ = ["Batch", "FunctionSink", "Rejected", "Sink", "TestingSink", "build_sinks"]


def build_sinks(config: Config) -> dict[str, Sink]:
    """Every sink the config's groups use, built from its `[sinks.<name>]` section."""
    used = {name for group in config.groups.values() for name in group.sinks}
    return {name: _build(config.sinks[name], config) for name in sorted(used)}


def _build(spec: SinkSpec, config: Config) -> Sink:
    options = dict(spec.options)
    attempts = options.pop("max_attempts", 1)  # the worker's, not the sink's: see shard.py
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigError(f"sink {spec.name!r}: max_attempts must be an integer >= 1")
    if spec.type == "postgres":
        from streamsink.sinks.postgres import PostgresSink

        return PostgresSink.from_options(spec.name, options, config.postgres_dsn)
    if spec.type == "function":
        path = options.pop("function", None)
        if not isinstance(path, str) or options:
            raise ConfigError(
                f"sink {spec.name!r}: a function sink takes one option, "
                "function = 'package.module:function'"
            )
        return FunctionSink.from_path(path)
    if spec.type == "http":
        from streamsink.sinks.http import HttpSink

        return HttpSink.from_options(spec.name, options, config)
    raise ConfigError(
        f"sink {spec.name!r}: type {spec.type!r} is not available in this version "
        "(available: postgres, http, function)"
    )

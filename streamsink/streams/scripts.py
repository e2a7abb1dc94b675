"""The Lua scripts of `streams/`: `.lua` files next to the module that runs each, read once.

`reader.ack.lua` is run by `reader.py`; a script made of several files (a shared function
first, as `reader.owned.lua`) is their texts one after another. The leading `--` lines of a
file (its keys, arguments and reply) stay out of the text sent to Redis.

Scripts run by SHA (EVALSHA) and are loaded again when Redis answers NOSCRIPT (a flushed
script cache, a restarted server, a replica promoted): redis-py's `register_script` does
that for a client, `pipelined` and `pipelined_sync` for a pipeline (a cluster pipeline
cannot load a script itself). The publish script has its own rules: see `streams.publish`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from hashlib import sha1
from importlib.resources import files
from typing import Any

from redis.exceptions import NoScriptError

from streamsink.streams.connection import AsyncClient, SyncClient


@dataclass(frozen=True, slots=True)
class Lua:
    """A script's text and its SHA1 (what EVALSHA names it by)."""

    text: str
    sha: str


def _body(name: str) -> str:
    text = files("streamsink.streams").joinpath(f"{name}.lua").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("--"):
        del lines[0]
    return "".join(lines)


@cache
def lua(*names: str) -> Lua:
    """The script made of the files `streams/<name>.lua`, in order (read once per process)."""
    text = "".join(map(_body, names))
    return Lua(text, sha1(text.encode()).hexdigest())


async def pipelined(client: AsyncClient, build: Callable[[Any], None], *scripts: Lua) -> Any:
    """Run the pipeline `build` fills (EVALSHA of `scripts` among its commands); on NOSCRIPT,
    load them and run it once more, so every command of it must be safe to run twice."""
    for attempt in range(2):
        async with client.pipeline(transaction=False) as pipe:
            build(pipe)
            try:
                return await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
        for script in scripts:  # a cluster loads it on every primary
            await client.script_load(script.text)
    raise AssertionError("unreachable")


def pipelined_sync(client: SyncClient, build: Callable[[Any], None], *scripts: Lua) -> Any:
    """`pipelined` with a synchronous client."""
    for attempt in range(2):
        with client.pipeline(transaction=False) as pipe:
            build(pipe)
            try:
                return pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
        for script in scripts:
            client.script_load(script.text)
    raise AssertionError("unreachable")

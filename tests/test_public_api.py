"""`streamsink.__all__` is exactly the public API the README lists, and every name is there."""

from __future__ import annotations

import re
from pathlib import Path

import streamsink

README = Path(__file__).resolve().parents[1] / "README.md"


def documented() -> list[str]:
    """The names in backticks of the README's "The public API" section."""
    text = README.read_text()
    section = text.split("\n### The public API\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    listed = section.split("\n- ", 1)[1]  # the list, after the paragraph that introduces it
    return re.findall(r"`(\w+)`", listed)


def test_all_is_the_documented_api() -> None:
    names = documented()
    assert len(names) == len(set(names)), "a name is listed twice in the README"
    assert sorted(streamsink.__all__) == sorted(names)


def test_every_public_name_is_importable_and_nothing_else_is_exported() -> None:
    assert len(streamsink.__all__) == len(set(streamsink.__all__))
    for name in streamsink.__all__:
        assert getattr(streamsink, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from streamsink import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(streamsink.__all__)

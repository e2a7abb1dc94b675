"""`serve`: every option after the config is a keyword (a hook once landed in a timeout)."""

from __future__ import annotations

import inspect

from streamsink.serve import serve


def test_every_option_after_the_config_is_keyword_only() -> None:
    parameters = list(inspect.signature(serve).parameters.values())
    assert [p.name for p in parameters[:1]] == ["config"]
    assert parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    positional = [p.name for p in parameters[1:] if p.kind is not p.KEYWORD_ONLY]
    assert positional == [], f"{positional} can be passed by position"

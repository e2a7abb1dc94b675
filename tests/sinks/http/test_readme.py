"""The README's signature check, extracted verbatim, accepts the sink's real requests.

The snippet is the Python block of the "HTTP callback sink" section that defines
`verify`; it runs on requests a receiver got from the sink, then on tampered ones.
"""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from streamsink.sinks.http import HttpSettings, signature
from streamsink.sinks.http.settings import ENDPOINT_OPTIONS, SINK_OPTIONS
from streamsink.streams import Keys
from tests.sinks.http.receiver import SECRET, Receiver, Window, build_sink

README = Path(__file__).resolve().parents[3] / "README.md"


def readme_verify() -> Any:
    """The README's `verify` function, from its text as is."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### The HTTP callback sink") :]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    (snippet,) = [block for block in blocks if "def verify(" in block]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    return namespace["verify"]


def test_the_readme_config_is_valid_and_every_option_documented() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### The HTTP callback sink") :]
    (block,) = re.findall(r"```toml\n(.*?)```", section, flags=re.DOTALL)
    options = dict(tomllib.loads(block)["sinks"]["hooks"])
    assert options.pop("type") == "http"
    settings = HttpSettings.from_options("hooks", options)
    assert settings.endpoints["https://api.example.com/hooks/"].mode == "batch"
    for name in ENDPOINT_OPTIONS | SINK_OPTIONS:
        assert re.search(rf"\b{name}\b", block), f"{name} is not in the README's example"


def test_the_readme_documents_the_headers_the_sink_sends() -> None:
    text = README.read_text(encoding="utf-8")
    for header in ("Idempotency-Key", "X-Streamsink-Timestamp", "X-Streamsink-Signature"):
        assert f"`{header}`" in text


async def test_the_readme_snippet_verifies_real_requests_and_refuses_forgeries(
    redis_url: str, keys: Keys
) -> None:
    verify = readme_verify()
    receiver = Receiver().start()
    window = Window()
    url = receiver.url()
    entries = [window.entry("k", url, {"text": "caf\u00e9", "n": n}) for n in range(2)]
    entries.append(window.entry("b", receiver.url("/batch"), {"n": 9}))
    built = build_sink(redis_url, keys, {"endpoints": {receiver.url("/batch"): {"mode": "batch"}}})
    try:
        assert await built.sink.write(window.batch(entries)) == []
    finally:
        await built.sink.close()
        receiver.stop()
    assert len(receiver.records) == 3
    secret = SECRET.encode("utf-8")
    for record in receiver.records:
        headers = CIMultiDict(record.headers)
        assert verify(secret, headers, record.body)
        lower = {name.lower(): value for name, value in record.headers.items()}
        assert verify(secret, CIMultiDict(lower), record.body)  # any header case
        assert not verify(secret, headers, record.body + b" ")
        assert not verify(b"another secret", headers, record.body)
        stale = CIMultiDict(headers)
        stale["X-Streamsink-Timestamp"] = str(int(headers["X-Streamsink-Timestamp"]) - 1)
        assert not verify(secret, stale, record.body)  # the timestamp is signed too
    old = int(time.time()) - 3600
    replayed = {"X-Streamsink-Timestamp": str(old), "X-Streamsink-Signature": ""}
    replayed["X-Streamsink-Signature"] = signature(secret, old, b"{}")
    assert not verify(secret, CIMultiDict(replayed), b"{}")  # signed, but an hour old

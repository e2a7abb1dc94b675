"""Hypothesis strategies of valid events, shared by the schema tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from streamsink.schemas.event import MAX_ID_BYTES, MAX_KEY_BYTES, MAX_NUMBER, Event, Op
from streamsink.schemas.table import INT64_MAX, INT64_MIN

# Characters that break naive encoders: JSON escapes, control characters, multi-byte UTF-8.
SPECIALS = "\t\n\r\"\\/'\x00\x1f\x7f\u2028é中文🎉"

# At most 4 bytes a character, so max_size bounds the UTF-8 length without a costly filter.
_chars = st.one_of(st.characters(codec="utf-8"), st.sampled_from(SPECIALS))
text = st.text(_chars, max_size=12)
keys = st.text(_chars, min_size=1, max_size=MAX_KEY_BYTES // 4)
names = st.text(_chars, min_size=1, max_size=12)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MIN, INT64_MAX, 2**53 + 1, -(2**53) - 1, 0]),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)

json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)

data = st.dictionaries(names, json_values, max_size=4)

events = st.builds(
    Event,
    key=keys,
    op=st.sampled_from(Op),
    data=data,
    table=st.none() | st.text(_chars, min_size=1, max_size=63 // 4),
    ts=st.none() | st.integers(0, MAX_NUMBER),
    version=st.none() | st.integers(0, MAX_NUMBER),
    id=st.none() | st.text(_chars, min_size=1, max_size=MAX_ID_BYTES // 4),
)

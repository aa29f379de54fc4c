"""Hypothesis strategies for adversarial submissions (issue 10, point 10): random bytes,
wrong types, huge strings, deep JSON, NUL bytes, invalid UTF-8, odd dates, unknown pools,
wildcard and dotted names. Shared by the unit property tests and the integration fuzz."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=8).map(lambda s: s + "\0"),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
_odd_dates = st.sampled_from(
    [
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        "2026-12-02T00:00:00",  # naive
        "2026-12-02T00:00:00+99:00",
        "2026-02-30T00:00:00Z",
        "not a date",
        "",
    ]
)
NAMES = st.one_of(
    st.sampled_from(["alpha", "beta", "nobody", "*", ">", "a.b", "alpha.x", "", " ", "é"]),
    st.text(max_size=70),
)

_spec_fields: dict[str, st.SearchStrategy[Any]] = {
    "key": st.one_of(st.text(min_size=0, max_size=210), _scalars, st.just("k" * 300)),
    "argv": st.one_of(
        st.lists(st.text(max_size=20), max_size=4), _json, st.just(["echo", "x" * 70_000])
    ),
    "pool": NAMES,
    "timeout_s": st.one_of(_scalars, st.just(1e308), st.just(-1)),
    "env": st.one_of(st.dictionaries(st.text(max_size=8), st.text(max_size=8)), _json),
    "deadline": _odd_dates,
    "not_before": _odd_dates,
    "shell": _scalars,
    "unknown_field": _json,
}


@st.composite
def _spec_body(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.sampled_from(sorted(_spec_fields)), unique=True, max_size=6))
    body: dict[str, Any] = {"key": "k1", "argv": ["/bin/true"]}
    for name in fields:
        body[name] = draw(_spec_fields[name])
    text = json.dumps(body, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def _deep(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


BODIES = st.one_of(
    _spec_body(),
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=100_000).map(_deep),
    st.just(b'{"key": "k\xff\xfe", "argv": ["true"]}'),  # invalid UTF-8
    st.just(b'{"key": "k1", "argv": ["tr\\u0000ue"]}'),  # NUL inside argv
    st.just(b""),
)
HEADERS = st.one_of(
    st.none(),
    st.just("alpha:k1"),
    st.just("beta:k1"),
    st.text(max_size=250),
    st.builds(lambda c, k: f"{c}:{k}", NAMES, st.text(max_size=210)),
)

"""The decoders' fast paths agree with the full paths on every input (proposed for tests/).

decode.py has fast paths for the common JSON and Avro deltas (`_fast_json`,
`_fast_avro`, `decode_valid`) that either return exactly what the full path
returns or decline (None), and receipts.py uses `decode_valid` for canonical@1.
These properties compare each value's result with the fast paths switched off.
"""

from __future__ import annotations

import json
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from knhk_stream.protocol import decode
from knhk_stream.protocol.decode import Delta, Triple, decode_delta, decode_valid, encode_avro, encode_json
from knhk_stream.protocol.hooks import load_hook
from knhk_stream.protocol.receipts import DeltaProcessor

PROC = DeltaProcessor(load_hook("canonical@1"), max_triples=4)


def _full(value: bytes, max_triples: int = 4):
    """decode_delta and the receipt with both fast paths declining everything."""
    with (
        mock.patch.object(decode, "_fast_json", lambda v: None),
        mock.patch.object(decode, "_fast_avro", lambda v: None),
    ):
        return decode_delta(value, max_triples), PROC.outcome(value)


def _check(value: bytes) -> None:
    full, full_outcome = _full(value)
    assert decode_delta(value, 4) == full
    assert type(decode_delta(value, 4)) is type(full)
    fast = decode_valid(value, 4) if value else None
    assert fast is None or (type(full) is Delta and fast == full)
    assert PROC.outcome(value) == full_outcome
    receipt = PROC.receipt(1, 2, 3, 4, value)
    assert receipt[23:27] == full_outcome.lanes.to_bytes(4, "big")
    assert receipt[-64:] == full_outcome.delta_hash + full_outcome.a_hash


TERMS = st.one_of(
    st.sampled_from(["urn:a", "urn:b", "", "ü", "x" * 1024, "x" * 1025, "é" * 1100, "a\\b", 'q"z', "\x00"]),
    st.text(max_size=6),
)
SCALARS = st.one_of(TERMS, st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False))


def _pairs(keys: st.SearchStrategy[str], values: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.tuples(keys, values), max_size=5)


TRIPLE = st.one_of(
    _pairs(st.sampled_from(["s", "p", "o", "g", "x"]), st.one_of(TERMS, SCALARS)),
    st.builds(lambda s, p, o: [("s", s), ("p", p), ("o", o)], TERMS, TERMS, TERMS),
)
FIELD_VALUE = st.one_of(st.lists(TRIPLE, max_size=3), SCALARS, _pairs(st.just("k"), SCALARS))
TOP = _pairs(st.sampled_from(["additions", "removals", "id", "actor", "other"]), FIELD_VALUE)


def _dump(node, ensure_ascii: bool) -> str:
    """JSON text that keeps repeated keys (objects are lists of pairs)."""
    if isinstance(node, list) and all(isinstance(x, tuple) and len(x) == 2 for x in node) and node:
        return "{" + ",".join(json.dumps(k) + ":" + _dump(v, ensure_ascii) for k, v in node) + "}"
    if isinstance(node, list):
        return "[" + ",".join(_dump(x, ensure_ascii) for x in node) + "]"
    return json.dumps(node, ensure_ascii=ensure_ascii)


@settings(max_examples=800, deadline=None)
@given(TOP, st.booleans(), st.sampled_from(["", " ", "\n", "x", "]"]), st.integers(0, 3))
def test_json_fast_path_agrees(top, ensure_ascii, tail, cut):
    text = _dump(top, ensure_ascii) if top else "{}"
    if cut == 3:
        text = text[: len(text) // 2]
    value = (text + tail).encode("utf-8", "surrogatepass")
    _check(value)


TRIPLES = st.lists(st.builds(Triple, TERMS, TERMS, TERMS, st.one_of(st.none(), TERMS)), max_size=4)


@settings(max_examples=500, deadline=None)
@given(TRIPLES, TRIPLES, st.text(max_size=4), st.text(max_size=4), st.integers(0, 200), st.integers(0, 255))
def test_avro_fast_path_agrees(adds, rems, did, actor, where, byte):
    try:
        value = bytearray(encode_avro(Delta(tuple(adds), tuple(rems), did, actor)))
    except UnicodeEncodeError:  # a surrogate cannot be written
        return
    _check(bytes(value))
    if where < len(value):
        value[where] = byte
        _check(bytes(value))
    _check(bytes(value[: where % (len(value) + 1)]))


@given(TRIPLES, TRIPLES)
def test_compact_json_takes_the_fast_path(adds, rems):
    delta = Delta(tuple(adds), tuple(rems), "d1")
    try:
        value = encode_json(delta)
    except UnicodeEncodeError:
        return
    full, _ = _full(value)
    if b"\\u" in value:  # an escaped control character: the fast path leaves escapes to the full path
        return
    if type(full) is Delta and all(len(t) <= 1024 for tr in adds + rems for t in (*tr[:3], tr[3] or "")):
        assert decode.decode_valid(value, 4) == full

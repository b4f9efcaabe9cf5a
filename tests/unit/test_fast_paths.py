"""The decoders' fast paths agree with the full paths on every input (proposed for tests/).

decode.py has fast paths for the common JSON and Avro deltas (`_fast_json`,
`_fast_avro`, `decode_valid`) that either return exactly what the full path
returns or decline (None), and receipts.py uses `decode_valid` for canonical@1.
These properties compare each value's result with the fast paths switched off.
"""

from __future__ import annotations

import contextlib
import json
import json.decoder
import json.scanner
from types import SimpleNamespace
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from knhk_stream.protocol import decode
from knhk_stream.protocol.decode import Delta, Triple, decode_delta, decode_valid, encode_avro, encode_json
from knhk_stream.protocol.hooks import canonical, canonical_actions, canonical_encoded, encode_actions, load_hook
from knhk_stream.protocol.receipts import DeltaProcessor

PROC = DeltaProcessor(load_hook("canonical@1"), max_triples=4)


def _full(value: bytes, max_triples: int = 4):
    """decode_delta and the receipt with every fast path declining everything."""
    with (
        mock.patch.object(decode, "_native_json", lambda v: None),
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
    native = decode._native_json(value)
    if native is not None:  # the same delta as the full JSON decoder's, before the count and term checks
        assert value[:2] != decode.AVRO_MAGIC
        with (
            mock.patch.object(decode, "_native_json", lambda v: None),
            mock.patch.object(decode, "_fast_json", lambda v: None),
        ):
            assert native == decode._decode_json(value)
        assert type(full) is Delta or full.code in (decode.EMPTY, decode.TOO_LARGE)
    if type(full) is Delta:  # the table-driven encoders against the generic one
        actions = canonical(full)
        assert canonical_encoded(full) == (len(actions), encode_actions(actions))
    straight = canonical_actions(value, 4) if value else None
    assert straight is None or (type(full) is Delta and straight == canonical_encoded(full))
    assert PROC.outcome(value) == full_outcome
    receipt = PROC.receipt(1, 2, 3, 4, value)
    assert receipt[23:27] == full_outcome.lanes.to_bytes(4, "big")
    assert receipt[-64:] == full_outcome.delta_hash + full_outcome.a_hash


class Raw(str):
    """A JSON token written as it is: numbers of any size, and the constants that are not JSON."""


TERMS = st.one_of(
    st.sampled_from(["urn:a", "urn:b", "", "ü", "x" * 1024, "x" * 1025, "é" * 1100, "a\\b", 'q"z', "\x00"]),
    # protocol v2: brackets, quotes and escapes inside strings; lone surrogates (a pair is fine)
    st.sampled_from(["[[{", "]}", '\\"[', "\\", "\ud800", "x\udc00", "\ud83d\ude00", "\ufeff"]),
    st.text(max_size=6),
)
NUMBERS_AND_CONSTANTS = ("NaN", "Infinity", "-Infinity", "9" * 5000, "-" + "1" * 4400, "1.5e400", "-0.0E-9", "01")
RAW = st.sampled_from([Raw(t) for t in NUMBERS_AND_CONSTANTS])
SCALARS = st.one_of(TERMS, st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), RAW)


def _nest(depth: int, kinds: list[str], inner):
    """`inner` inside `depth` arrays and objects (kinds cycled: "a" array, "o" object {"k": ...})."""
    node = inner
    for i in range(depth):
        node = [node] if kinds[i % len(kinds)] == "a" else [("k", node)]
    return node


# From 1 to 70 levels in an ignored field: the field's depth plus the top-level object around it.
DEEP = st.builds(_nest, st.integers(1, 69), st.lists(st.sampled_from("ao"), min_size=1, max_size=3), SCALARS)


def _pairs(keys: st.SearchStrategy[str], values: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.tuples(keys, values), max_size=5)


TRIPLE = st.one_of(
    _pairs(st.sampled_from(["s", "p", "o", "g", "x"]), st.one_of(TERMS, SCALARS)),
    st.builds(lambda s, p, o: [("s", s), ("p", p), ("o", o)], TERMS, TERMS, TERMS),
)
FIELD_VALUE = st.one_of(st.lists(TRIPLE, max_size=3), SCALARS, _pairs(st.just("k"), SCALARS), DEEP)
TOP = _pairs(st.sampled_from(["additions", "removals", "id", "actor", "other"]), FIELD_VALUE)


def _dump(node, ensure_ascii: bool) -> str:
    """JSON text that keeps repeated keys (objects are lists of pairs)."""
    if isinstance(node, list) and all(isinstance(x, tuple) and len(x) == 2 for x in node) and node:
        return "{" + ",".join(json.dumps(k) + ":" + _dump(v, ensure_ascii) for k, v in node) + "}"
    if isinstance(node, list):
        return "[" + ",".join(_dump(x, ensure_ascii) for x in node) + "]"
    if isinstance(node, Raw):
        return str(node)
    return json.dumps(node, ensure_ascii=ensure_ascii)


def _parser_depth(text: str) -> int:
    """How deep the json module's scanner nests on `text` before it finishes or fails.

    The pure-Python scanner with counting parse_object / parse_array: the C scanner
    descends the same way.
    """
    dec = json.JSONDecoder(object_pairs_hook=list, parse_int=str, parse_float=str, parse_constant=str)
    level = [0, 0]

    def counted(parse):
        def f(*args, **kw):
            level[0] += 1
            level[1] = max(level[1], level[0])
            try:
                return parse(*args, **kw)
            finally:
                level[0] -= 1

        return f

    ctx = SimpleNamespace(
        strict=dec.strict,
        object_hook=dec.object_hook,
        object_pairs_hook=dec.object_pairs_hook,
        parse_float=dec.parse_float,
        parse_int=dec.parse_int,
        parse_constant=dec.parse_constant,
        memo=dec.memo,
        parse_string=dec.parse_string,
        parse_object=counted(dec.parse_object),
        parse_array=counted(dec.parse_array),
    )
    scan = json.scanner.py_make_scanner(ctx)
    with contextlib.suppress(StopIteration, ValueError):  # the end of the text, or not JSON
        scan(text, json.decoder.WHITESPACE.match(text, 0).end())
    return level[1]


def _is_json(text: str) -> bool:
    """Whether the json module reads `text` to the end (numbers and constants as text)."""
    try:
        json.loads(text, object_pairs_hook=list, parse_int=str, parse_float=str, parse_constant=str)
    except ValueError:
        return False
    return True


@settings(max_examples=800, deadline=None)
@given(TOP, st.booleans(), st.sampled_from(["", " ", "\n", "x", "]"]), st.integers(0, 3), st.booleans())
def test_json_fast_path_agrees(top, ensure_ascii, tail, cut, bom):
    text = _dump(top, ensure_ascii) if top else "{}"
    if cut == 3:
        text = text[: len(text) // 2]
    value = (text + tail).encode("utf-8", "surrogatepass")
    _check(value)
    if bom:
        _check(b"\xef\xbb\xbf" + value)
        assert decode_delta(b"\xef\xbb\xbf" + value).code == decode.MALFORMED
    # protocol v2: deeper than 64 levels is malformed, whatever else the text holds
    if cut != 3 and tail in ("", " ", "\n") and value.decode("utf-8", "surrogatepass"):
        deep = _parser_depth(text) > decode.MAX_DEPTH
        flagged = decode._depth_problem(value) is not None
        assert flagged or not deep  # the scanner never nests deeper than 64
        if _is_json(text):  # exact on JSON; a text the scanner stops in early (say at "01") is malformed anyway
            assert flagged is deep
        if deep:
            assert decode_delta(value) == (decode.MALFORMED, "not a JSON delta: nested deeper than 64 levels")


# Any text of these pieces: brackets, strings, escapes, in any order, valid or not.
SOUP = st.lists(
    st.sampled_from(["[", "]", "{", "}", '"', "\\", "\\\\", '\\"', "a", ",", ":", "1", '"k":', "[" * 30, "]" * 30]),
    max_size=80,
).map("".join)


@settings(max_examples=1500, deadline=None)
@given(SOUP)
def test_depth_check_bounds_the_json_scanner(text):
    """Whatever the text, the depth check lets the json module nest at most 64 levels."""
    value = text.encode()
    if decode._depth_problem(value) is None:
        assert _parser_depth(text) <= decode.MAX_DEPTH
    _check(value)
    _check(b'{"additions":[{"s":"a","p":"b","o":"c"}],"x":' + value + b"}")


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


# Strings full of what the depth check must see through: brackets, quotes, backslashes.
NASTY = st.one_of(
    st.text(alphabet='[]{}"\\ab', max_size=12),
    st.sampled_from(["[" * 70, "{" * 70 + "}" * 70, "\\", '\\"', "]" * 65, "\\u005b"]),
)
# Numbers and constants the json scanner reads (not "01", where it stops), so the text is JSON to the end.
SCANNED = st.sampled_from([Raw(t) for t in NUMBERS_AND_CONSTANTS if t != "01"])
TREE = st.recursive(
    st.one_of(NASTY, SCANNED, st.none()),
    lambda kids: st.one_of(st.lists(kids, max_size=3), _pairs(NASTY, kids)),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None)
@given(TREE, st.integers(0, 68), st.lists(st.sampled_from("ao"), min_size=1, max_size=3), st.booleans())
def test_depth_check_is_exact_on_json(tree, depth, kinds, ensure_ascii):
    """On JSON text the depth check says "too deep" exactly when the scanner would nest deeper than 64."""
    text = '{"additions":[{"s":"a","p":"b","o":"c"}],"x":' + _dump(_nest(depth, kinds, tree), ensure_ascii) + "}"
    value = text.encode("utf-8")
    assert (decode._depth_problem(value) is not None) is (_parser_depth(text) > decode.MAX_DEPTH)
    _check(value)


# The native paths (msgspec for JSON, the ASCII Avro reader) accept only the delta's exact shape.
# Everything near that shape, built as pair lists so that keys can repeat anywhere: triples with
# or without g (a string or null), the top-level fields in any order, and then one disturbance:
# a repeated key at either level, an unknown field, a wrong type, an escape, whitespace.
SHAPED_TERMS = st.one_of(
    st.sampled_from(["urn:a", "urn:b", "x" * 1024, "x" * 1025, "é" * 1024, "é" * 1025, "", "g", "s", '"', "\\"]),
    st.text(alphabet="ab:/éü😀\u2028", max_size=5),
)


@st.composite
def shaped_triple(draw):
    pairs = [("s", draw(SHAPED_TERMS)), ("p", draw(SHAPED_TERMS)), ("o", draw(SHAPED_TERMS))]
    g = draw(st.sampled_from(["absent", "null", "string"]))
    if g != "absent":
        pairs.append(("g", None if g == "null" else draw(SHAPED_TERMS)))
    return draw(st.permutations(pairs))


@st.composite
def shaped_delta(draw):
    pairs = []
    for field in ("additions", "removals"):
        if draw(st.booleans()) or field == "additions":
            pairs.append((field, draw(st.lists(shaped_triple(), max_size=3))))
    for field in ("id", "actor"):
        if draw(st.booleans()):
            pairs.append((field, draw(SHAPED_TERMS)))
    pairs = draw(st.permutations(pairs))
    kind = draw(st.sampled_from(["none", "repeat", "repeat-in-triple", "unknown", "wrong-type", "null-id"]))
    if kind == "repeat" and pairs:  # the same key again, with any value of its kind
        key, value = draw(st.sampled_from(pairs))
        again = draw(st.one_of(st.just(value), st.lists(shaped_triple(), max_size=1), SHAPED_TERMS))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, again))
    elif kind == "repeat-in-triple":
        triples = [t for _, v in pairs if isinstance(v, list) for t in v]
        if triples:
            t = draw(st.sampled_from(triples))
            key, value = draw(st.sampled_from(t))
            t.insert(draw(st.integers(0, len(t))), (key, draw(st.one_of(st.just(value), st.none(), SHAPED_TERMS))))
    elif kind == "unknown":
        pairs.append((draw(st.sampled_from(["x", "S", "additions "])), draw(SCALARS)))
    elif kind == "wrong-type" and pairs:
        i = draw(st.integers(0, len(pairs) - 1))
        pairs[i] = (pairs[i][0], draw(st.one_of(SCALARS, st.just([[("s", "a")]]))))
    elif kind == "null-id":
        pairs.append((draw(st.sampled_from(["id", "actor"])), None))
    return pairs


SEPARATORS = st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :"), ("\n,\t", "\r:\n"), (",", " : ")])


def _dump_spaced(node, ensure_ascii: bool, seps: tuple[str, str]) -> str:
    """_dump with other separators (whitespace before and after commas and colons)."""
    comma, colon = seps
    if isinstance(node, list) and all(isinstance(x, tuple) and len(x) == 2 for x in node) and node:
        return "{" + comma.join(json.dumps(k) + colon + _dump_spaced(v, ensure_ascii, seps) for k, v in node) + "}"
    if isinstance(node, list):
        return "[" + comma.join(_dump_spaced(x, ensure_ascii, seps) for x in node) + "]"
    if isinstance(node, Raw):
        return str(node)
    return json.dumps(node, ensure_ascii=ensure_ascii)


@settings(max_examples=1500, deadline=None)
@given(shaped_delta(), st.booleans(), SEPARATORS, st.sampled_from(["", " ", "\n", "\t\r"]))
def test_native_json_agrees_near_the_shape(pairs, ensure_ascii, seps, around):
    text = around + _dump_spaced(pairs, ensure_ascii, seps) + around
    value = text.encode("utf-8", "surrogatepass")
    _check(value)
    full, _ = _full(value)
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        assert decode.native_json(value) is None
        assert full == (decode.MALFORMED, full.reason) and "repeated key" in full.reason


REPEATED = [
    b'{"additions":[{"s":"a","p":"b","o":"c"}],"additions":[{"s":"a","p":"b","o":"d"}]}',
    b'{"additions":[{"s":"a","p":"b","o":"c","s":"z"}]}',
    b'{"additions":[{"s":"a","p":"b","o":"c","g":null,"g":"h"}]}',
    b'{"additions":[{"s":"a","p":"b","o":"c","g":null,"g":null}]}',
    b'{"additions":[{"s":"a","p":"b","o":"c"}],"id":"x","id":"x"}',
    b'{"additions":[{"s":"a","p":"b","o":"c"}],"removals":[],"removals":[]}',
    b'{"additions" :[{"s" :"a","p":"b","o":"c"}],"additions":[]}',
    b'{"id":"d","additions":[{"s":"a","p":"b","o":"c","o":"c"}],"actor":"x"}',
]


def test_native_json_refuses_every_repeated_key():
    """msgspec keeps the last of repeated keys: the quote count must catch each one."""
    for value in REPEATED:
        assert decode.native_json(value) is None
        assert canonical_actions(value) is None
        assert decode_delta(value).code == decode.MALFORMED
        assert "repeated key" in decode_delta(value).reason
        _check(value)


def test_native_paths_take_the_common_deltas():
    """What the bench measures goes through the native paths (not only their fallbacks)."""
    ascii_delta = Delta((Triple("urn:a", "urn:p", "v1"),), (Triple("urn:a", "urn:q", "old"),), "d0")
    other = Delta((Triple("urn:a", "urn:p", "v1", "urn:g"), Triple("urn:b", "urn:p", "é")), (), "d1", "me")
    for value in (encode_json(ascii_delta), encode_avro(ascii_delta), encode_json(other)):
        assert canonical_actions(value) == canonical_encoded(_full(value)[0])
    assert decode.native_json(encode_json(other)) is not None
    assert canonical_actions(encode_avro(other)) is None  # "é": not an ASCII body (decode_valid reads it)


ASCII_TERMS = st.one_of(st.text(alphabet="ab:/", min_size=0, max_size=70), st.sampled_from(["", "a" * 63, "a" * 64]))


def _zz(n: int) -> bytes:
    """An Avro long: zig-zag, then a varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _avro_str(t: str) -> bytes:
    b = t.encode()
    return _zz(len(b)) + b


def _avro_array(triples: list[Triple], sizes: list[int], byte_sizes: bool) -> bytes:
    """An Avro array of triples in blocks of the given sizes (the rest in one more block), each
    with its byte size (a negative count) if asked."""
    out, i = b"", 0
    for size in [*sizes, len(triples)]:
        chunk = triples[i : i + size]
        if not chunk:
            continue
        i += len(chunk)
        body = b"".join(
            _avro_str(t.s) + _avro_str(t.p) + _avro_str(t.o) + (b"\x00" if t.g is None else b"\x02" + _avro_str(t.g))
            for t in chunk
        )
        out += _zz(-len(chunk)) + _zz(len(body)) + body if byte_sizes else _zz(len(chunk)) + body
    return out + b"\x00"


ASCII_TRIPLES = st.lists(
    st.builds(Triple, ASCII_TERMS, ASCII_TERMS, ASCII_TERMS, st.one_of(st.none(), ASCII_TERMS)), max_size=5
)


@settings(max_examples=800, deadline=None)
@given(
    ASCII_TRIPLES,
    ASCII_TRIPLES,
    ASCII_TERMS,
    ASCII_TERMS,
    st.lists(st.integers(1, 3), max_size=3),
    st.booleans(),
    st.integers(0, 300),
    st.integers(0, 255),
)
def test_ascii_avro_reader_agrees(adds, rems, did, actor, sizes, byte_sizes, where, byte):
    """Blocks of any size (and with byte sizes, which it leaves to the others), lengths across the
    one-byte varint limit, every byte mutated: the ASCII reader agrees with the full path or declines."""
    value = bytearray(decode.AVRO_PREFIX)
    value += _avro_str(did) + _avro_array(adds, sizes, byte_sizes) + _avro_array(rems, sizes, byte_sizes)
    value += _avro_str(actor)
    if not byte_sizes and not sizes:  # one block each, as fastavro writes it
        assert bytes(value) == encode_avro(Delta(tuple(adds), tuple(rems), did, actor))
    _check(bytes(value))
    if where < len(value):
        value[where] = byte
        _check(bytes(value))
    _check(bytes(value[: where % (len(value) + 1)]))


def test_reused_hashers_are_per_thread():
    """Receipts and Merkle roots reuse BLAKE3 hashers (per thread, per root): threads that cut
    receipts and roots at once, switching as often as the interpreter lets them, get the bytes
    one thread alone gets."""
    import sys
    import threading

    from knhk_stream.protocol import merkle
    from knhk_stream.protocol.encoding import H

    values = [encode_json(Delta((Triple(f"urn:s{i}", "urn:p", f"v{i}"),), (), f"d{i}")) for i in range(300)]
    values += [encode_avro(Delta((Triple(f"urn:s{i}", "urn:p", f"v{i}"),), (), f"d{i}")) for i in range(300)]
    proc = DeltaProcessor(load_hook("canonical@1"))
    expected = [proc.receipt(0, 1, 2, i, v) for i, v in enumerate(values)]
    root = merkle.root(expected)
    hashes = [H(v) for v in values]
    bad: list[str] = []

    def work() -> None:
        for _ in range(3):
            if [proc.receipt(0, 1, 2, i, v) for i, v in enumerate(values)] != expected:
                bad.append("receipts")
            if merkle.root(expected) != root:
                bad.append("root")
            if [H(v) for v in values] != hashes:
                bad.append("H")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not bad

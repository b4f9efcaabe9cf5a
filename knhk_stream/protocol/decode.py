"""Decoding delta record values: Avro single-object encoding or JSON.

`decode_delta` never raises: any input bytes give a `Delta` or a `Rejected`
with one of the protocol's codes, so a peer never crashes on bad input and
never skips it.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from typing import Annotated, Any, NamedTuple

import fastavro
import msgspec
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from msgspec import UNSET, Meta, Struct, UnsetType

MALFORMED = "malformed"
EMPTY = "empty"
TOO_LARGE = "too_large"
INVALID_TERM = "invalid_term"
HOOK_ERROR = "hook_error"
REJECTION_CODES = (MALFORMED, EMPTY, TOO_LARGE, INVALID_TERM, HOOK_ERROR)

MAX_TERM_BYTES = 4096
MAX_DEPTH = 64  # arrays and objects nested in one another; the top-level object alone is 1
_SHORT = MAX_TERM_BYTES // 4  # code points that surely fit in MAX_TERM_BYTES
AVRO_MAGIC = b"\xc3\x01"


class Triple(NamedTuple):
    s: str
    p: str
    o: str
    g: str | None = None


class Delta(NamedTuple):
    additions: tuple[Triple, ...]
    removals: tuple[Triple, ...]
    id: str | None = None
    actor: str | None = None


class Rejected(NamedTuple):
    """A delta that cannot be applied: `code` goes into the receipt, `reason` into logs."""

    code: str
    reason: str


def _load_schema() -> dict[str, Any]:
    text = resources.files("knhk_stream").joinpath("schemas", "delta.avsc").read_text("utf-8")
    return json.loads(text)


DELTA_SCHEMA = parse_schema(_load_schema())
AVRO_FINGERPRINT = bytes.fromhex(fingerprint(to_parsing_canonical_form(DELTA_SCHEMA), "CRC-64-AVRO"))
AVRO_PREFIX = AVRO_MAGIC + AVRO_FINGERPRINT


class _Malformed(Exception):
    pass


_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'"[]{}')
_BOM = b"\xef\xbb\xbf"


def _depth_problem(value: bytes) -> str | None:
    """Why a JSON text nests arrays and objects deeper than MAX_DEPTH, or None when it does not.

    Iterative, over the bytes, before any parsing, so that the json module never
    recurses deeper than MAX_DEPTH and no recursion limit decides. A text with at
    most MAX_DEPTH `[` and `{` bytes cannot be deeper (the common case: two counts).
    Otherwise the brackets inside strings are dropped, then each round removes every
    innermost `[]` and `{}` pair: a well-nested text is empty after as many rounds as
    it is deep. What is left after MAX_DEPTH rounds, or what no round can shorten
    (brackets that do not match), is not JSON of depth <= MAX_DEPTH either way. Only
    for valid JSON does the answer need to be exact: any other text is malformed
    whatever this says.
    """
    if value.count(b"[") + value.count(b"{") <= MAX_DEPTH:
        return None
    v = value
    if b"\\" in v:  # escapes: drop escaped backslashes, then escaped quotes (both in strings only)
        v = v.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Keep quotes and brackets. Two adjacent quotes close and reopen a string or enclose
    # an empty one: dropping them leaves every other byte on its side of the strings.
    v = v.translate(None, _NOT_STRUCTURAL).replace(b'""', b"")
    if b'"' in v:
        v = b"".join(v.split(b'"')[::2])  # the even pieces are outside strings
    for _ in range(MAX_DEPTH):
        if not v:
            return None
        # One round removes exactly the pairs innermost now: the placeholder keeps a
        # removal from making a new pair within the round.
        w = v.replace(b"[]", b"\x00").replace(b"{}", b"\x00")
        if len(w) == len(v):
            return "unbalanced brackets"
        v = w.replace(b"\x00", b"")
    return f"nested deeper than {MAX_DEPTH} levels" if v else None


class _Number:
    """JSON numbers are never valid terms; keeping them opaque avoids int-size limits."""

    __slots__ = ()


def _number(_text: str) -> _Number:
    return _Number()


def _no_constant(name: str) -> None:
    raise _Malformed(f"{name} is not JSON (RFC 8259)")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Malformed(f"repeated key {k!r}")
            seen.add(k)
    return obj


_JSON = json.JSONDecoder(object_pairs_hook=_object, parse_int=_number, parse_float=_number, parse_constant=_no_constant)
# The fast path's scanner: objects come back as tuples of (key, value) pairs, built in C,
# and repeated keys are found afterwards (dict(pairs) is shorter than the pairs).
_SCAN_PAIRS = json.JSONDecoder(
    object_pairs_hook=tuple, parse_int=_number, parse_float=_number, parse_constant=_no_constant
).scan_once
_new = tuple.__new__  # NamedTuple construction without its Python-level __new__
_NONE: Any = object()
_CONTAINERS = (tuple, list)


def _check_no_surrogates(node: Any) -> None:
    """UnicodeEncodeError if any string or key of a parsed text holds a lone surrogate (no recursion)."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            node.encode("utf-8")
        elif isinstance(node, dict):
            for k, v in node.items():
                k.encode("utf-8")
                stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def _json_triples(obj: dict[str, Any], field: str) -> tuple[Triple, ...]:
    items = obj.get(field, [])
    if not isinstance(items, list):
        raise _Malformed(f"{field!r} must be an array of triples")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise _Malformed(f"{field}[{i}] must be an object with s, p, o")
        s, p, o, g = t.get("s"), t.get("p"), t.get("o"), t.get("g")
        if not (isinstance(s, str) and isinstance(p, str) and isinstance(o, str)):
            raise _Malformed(f"{field}[{i}]: s, p and o must be strings")
        if g is not None and not isinstance(g, str):
            raise _Malformed(f"{field}[{i}]: g must be a string or null")
        out.append(Triple(s, p, o, g))
    return tuple(out)


def _fast_json_triples(items: Any) -> list[Triple] | None:
    """A JSON array of triple objects (as pair tuples) as Triples, or None if anything is unusual."""
    if type(items) is not list:
        return None
    out = []
    for t in items:
        if type(t) is not tuple:
            return None
        if len(t) == 3:  # the common {"s":…,"p":…,"o":…} in this order
            (ks, s), (kp, p), (ko, o) = t
            if ks != "s" or kp != "p" or ko != "o":
                return None
            g = None
        else:
            d = dict(t)
            if len(d) != len(t):
                return None
            for v in d.values():
                if type(v) in _CONTAINERS:
                    return None
            s, p, o, g = d.get("s"), d.get("p"), d.get("o"), d.get("g")
            if g is not None and type(g) is not str:
                return None
        if type(s) is not str or type(p) is not str or type(o) is not str:
            return None
        out.append(_new(Triple, (s, p, o, g)))
    return out


def _fast_json(value: bytes) -> Delta | None:
    """The common JSON delta, decoded quickly; None when anything is unusual.

    None sends the value down the full path, which decides and explains; for every
    value this accepts, the full path returns the same Delta. It declines escapes
    (\\u, which may hide a lone surrogate), whitespace around the object, any
    repeated key, nested containers in other fields, and every wrong type. The
    caller has checked the depth (`_depth_problem`), so the scanner nests at most
    MAX_DEPTH levels.
    """
    try:
        text = value.decode("utf-8")
        obj, end = _SCAN_PAIRS(text, 0)
    except Exception:  # not decodable or not JSON: the full path says why
        return None
    if end != len(text) or type(obj) is not tuple or "\\u" in text:
        return None
    d = dict(obj)
    if len(d) != len(obj):
        return None
    adds = d.pop("additions", _NONE)
    rems = d.pop("removals", _NONE)
    did = d.pop("id", _NONE)
    actor = d.pop("actor", _NONE)
    if did is _NONE:
        did = None
    elif type(did) is not str:
        return None  # null too: the full path calls that malformed
    if actor is _NONE:
        actor = None
    elif type(actor) is not str:
        return None
    for v in d.values():  # other fields are ignored, but may not hide repeated keys
        if type(v) in _CONTAINERS:
            return None
    a = [] if adds is _NONE else _fast_json_triples(adds)
    r = [] if rems is _NONE else _fast_json_triples(rems)
    if a is None or r is None:
        return None
    return _new(Delta, (tuple(a), tuple(r), did, actor))


# The native fast path (msgspec): the delta's shape as typed structs, so that msgspec decodes and
# type-checks in C. Nothing else may be in the text: unknown fields are refused, and a term must be
# 1 to _SHORT code points (g: at most _SHORT), so that what it accepts needs no term check.
_Term = Annotated[str, Meta(min_length=1, max_length=_SHORT)]
_Graph = Annotated[str, Meta(max_length=_SHORT)]


class NativeTriple(Struct, forbid_unknown_fields=True, gc=False):
    """A triple object as native_json decodes it: g is UNSET when the object has no "g"."""

    s: _Term
    p: _Term
    o: _Term
    g: _Graph | UnsetType | None = UNSET


class NativeDelta(Struct, forbid_unknown_fields=True, gc=False):
    """A JSON delta as native_json decodes it: UNSET for each field the object does not have."""

    additions: list[NativeTriple] | UnsetType = UNSET
    removals: list[NativeTriple] | UnsetType = UNSET
    id: str | UnsetType = UNSET
    actor: str | UnsetType = UNSET


_NATIVE = msgspec.json.Decoder(NativeDelta).decode
_REENCODE = msgspec.json.Encoder().encode  # UNSET fields are left out, a null g is written
_BACKSLASH = ord("\\")
_QUOTE = ord('"')


def native_json(value: bytes) -> NativeDelta | None:
    """The common JSON delta as msgspec decodes it, or None when anything is unusual.

    Whatever this accepts, the full path (decode_delta) reads as the same delta: the same terms,
    id and actor (UNSET there is None), and its terms need no term check. None sends the value on
    (`_fast_json`, then the full path), which decides and explains.

    What msgspec accepts here is strict RFC 8259 JSON of the delta's exact shape: an object of
    the four fields, arrays of triple objects, strings (and a null g), at most 3 levels deep, so
    the depth rule, numbers and NaN/Infinity cannot arise; a byte-order mark, control characters
    and trailing bytes are refused by msgspec, and invalid UTF-8 by Python's own decoder. Any
    backslash is declined, so no escape (a lone surrogate, an escaped quote) is left to msgspec
    either.

    msgspec keeps the last of repeated keys without a word, so they are found by counting: with
    no backslash every `"` opens or closes a string, so a text without repeated keys has exactly
    as many as msgspec's own encoding of the decoded structs (each key and string value they
    hold, once), and a repeated key anywhere adds at least its own two. The common case needs no
    count: a text that is that encoding byte for byte (compact, in field order: what encode_json
    writes) has no repeated key.
    """
    if _BACKSLASH in value:
        return None
    if not value.isascii():
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        d = _NATIVE(value)
    except Exception:  # msgspec.DecodeError or ValidationError: the other paths decide
        return None
    again = _REENCODE(d)
    if again != value and again.count(_QUOTE) != value.count(_QUOTE):
        return None  # a repeated key
    return d


def _native_triples(items: list[NativeTriple] | UnsetType) -> tuple[Triple, ...]:
    if not items:
        return ()
    return tuple([_new(Triple, (t.s, t.p, t.o, None if t.g is UNSET else t.g)) for t in items])


def _native_json(value: bytes) -> Delta | None:
    """native_json's delta as a Delta (None: declined)."""
    d = native_json(value)
    if d is None:
        return None
    did, actor = d.id, d.actor
    return _new(
        Delta,
        (
            _native_triples(d.additions),
            _native_triples(d.removals),
            None if did is UNSET else did,
            None if actor is UNSET else actor,
        ),
    )


def _decode_json(value: bytes) -> Delta:
    native = _native_json(value)  # what it accepts is at most 3 levels deep
    if native is not None:
        return native
    too_deep = _depth_problem(value)  # before any other parsing, the Python fast path's included
    if too_deep:
        raise _Malformed(f"not a JSON delta: {too_deep}")
    fast = _fast_json(value)
    if fast is not None:
        return fast
    if value[:3] == _BOM:
        raise _Malformed("a byte-order mark is not JSON (RFC 8259)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = _JSON.decode(text)
    except (ValueError, RecursionError) as e:  # RecursionError: unreachable, the depth is checked
        raise _Malformed(f"not a JSON delta: {e}") from None
    if not isinstance(obj, dict):
        raise _Malformed("a JSON delta must be an object")
    if "\\u" in text:
        try:
            _check_no_surrogates(obj)
        except UnicodeEncodeError:
            raise _Malformed("lone surrogate in a JSON string") from None
    for opt in ("id", "actor"):
        if opt in obj and not isinstance(obj[opt], str):
            raise _Malformed(f"{opt!r} must be a string")
    return Delta(
        _json_triples(obj, "additions"),
        _json_triples(obj, "removals"),
        obj.get("id"),
        obj.get("actor"),
    )


def _varint(b: bytes, i: int) -> tuple[int, int]:
    """A zig-zag Avro long at b[i:] (IndexError past the end): (value, next index)."""
    n = shift = 0
    while True:
        x = b[i]
        i += 1
        n |= (x & 0x7F) << shift
        if x < 0x80:
            return (n >> 1) ^ -(n & 1), i
        shift += 7
        if shift > 63:
            raise ValueError("Avro long longer than 10 bytes")


def _avro_str(b: bytes, i: int) -> tuple[str, int]:
    x = b[i]
    if x < 0x80:
        n, i = (x >> 1) ^ -(x & 1), i + 1
    else:
        n, i = _varint(b, i)
    j = i + n
    if n < 0 or j > len(b):
        raise ValueError("bad Avro string length")
    return b[i:j].decode("utf-8"), j


def _avro_triples(b: bytes, i: int) -> tuple[list[Triple], int]:
    out: list[Triple] = []
    while True:
        count, i = _varint(b, i)
        if count == 0:
            return out, i
        if count < 0:  # a block with its byte size: rare, left to fastavro
            raise ValueError("Avro block with a byte size")
        for _ in range(count):
            s, i = _avro_str(b, i)
            p, i = _avro_str(b, i)
            o, i = _avro_str(b, i)
            branch = b[i]
            i += 1
            if branch == 0:
                g = None
            elif branch == 2:  # union index 1 (zig-zag): string
                g, i = _avro_str(b, i)
            else:
                raise ValueError("bad union index")
            out.append(_new(Triple, (s, p, o, g)))


def _fast_avro(value: bytes) -> Delta | None:
    """`io.knhk.Delta` read directly (the schema is fixed); None when anything is unusual.

    None sends the value down the full path (fastavro), which decides and explains;
    for every value this accepts, fastavro returns the same record.
    """
    try:
        did, i = _avro_str(value, 10)
        adds, i = _avro_triples(value, i)
        rems, i = _avro_triples(value, i)
        actor, i = _avro_str(value, i)
    except Exception:  # IndexError, UnicodeDecodeError, ValueError
        return None
    if i != len(value):
        return None
    return _new(Delta, (tuple(adds), tuple(rems), did, actor))


def _decode_avro(value: bytes) -> Delta:
    if value[2:10] != AVRO_FINGERPRINT:
        raise _Malformed(f"unknown Avro schema fingerprint {value[2:10].hex()}")
    fast = _fast_avro(value)
    if fast is not None:
        return fast
    buf = io.BytesIO(value)
    buf.seek(10)
    try:
        rec = fastavro.schemaless_reader(buf, DELTA_SCHEMA, None)
    except Exception as e:  # fastavro raises many kinds on bad bytes
        raise _Malformed(f"bad Avro body: {type(e).__name__}") from None
    if buf.tell() != len(value):
        raise _Malformed(f"{len(value) - buf.tell()} trailing bytes after the Avro body")

    def triples(items: list[dict[str, Any]]) -> tuple[Triple, ...]:
        return tuple(Triple(t["s"], t["p"], t["o"], t["g"]) for t in items)

    return Delta(triples(rec["additions"]), triples(rec["removals"]), rec["id"], rec["actor"])


def _bad_term(t: Triple, max_bytes: int) -> str | None:
    for name, term in (("s", t.s), ("p", t.p), ("o", t.o)):
        if not term:
            return f"empty {name}"
    for name, term in (("s", t.s), ("p", t.p), ("o", t.o), ("g", t.g)):
        # Only a term that might be too long is encoded to count its bytes.
        if term is not None and len(term) * 4 > max_bytes:
            try:
                n = len(term.encode("utf-8"))
            except UnicodeEncodeError:
                return f"{name} is not valid Unicode"
            if n > max_bytes:
                return f"{name} is {n} UTF-8 bytes, more than {max_bytes}"
    return None


def decode_delta(value: bytes | None, max_triples: int = 1024) -> Delta | Rejected:
    """Decode and validate one delta record value (a tick marker never gets here)."""
    if not value:
        return Rejected(MALFORMED, "empty or null value without the knhk-marker header")
    try:
        delta = _decode_avro(value) if value[:2] == AVRO_MAGIC else _decode_json(value)
        n = len(delta.additions) + len(delta.removals)
        if n == 0:
            return Rejected(EMPTY, "the delta has no triples")
        if n > max_triples:
            return Rejected(TOO_LARGE, f"{n} triples, more than max_triples={max_triples}")
        if _needs_term_check(delta):
            for field in delta[:2]:
                for t in field:
                    bad = _bad_term(_new(Triple, t), MAX_TERM_BYTES)
                    if bad:
                        return Rejected(INVALID_TERM, bad)
        return delta
    except _Malformed as e:
        return Rejected(MALFORMED, str(e))
    except Exception as e:  # never crash a peer on input bytes
        return Rejected(MALFORMED, f"undecodable: {type(e).__name__}: {e}")


def _needs_term_check(delta: Delta) -> bool:
    """True when some term is empty or long: a term of at most MAX_TERM_BYTES / 4 code points
    always fits in MAX_TERM_BYTES UTF-8 bytes, so only those need _bad_term's closer look."""
    for field in (delta[0], delta[1]):
        for s, p, o, g in field:
            if (
                not (s and p and o)
                or len(s) > _SHORT
                or len(p) > _SHORT
                or len(o) > _SHORT
                or (g is not None and len(g) > _SHORT)
            ):
                return True
    return False


def decode_valid(value: bytes, max_triples: int = 1024) -> Delta | None:
    """The hot path: the Delta decode_delta returns for `value` when it is valid, else None.

    None means "ask decode_delta": the value is rejected, or unusual (see `_fast_json`),
    or has a term that needs a closer look; decode_delta then decides and explains.
    """
    if value[:2] == AVRO_MAGIC:
        delta = _fast_avro(value) if value[2:10] == AVRO_FINGERPRINT else None
    else:
        delta = _native_json(value)
        if delta is not None:  # its terms need no check
            n = len(delta[0]) + len(delta[1])
            return delta if 0 < n <= max_triples else None
        if value.count(b"[") + value.count(b"{") > MAX_DEPTH and _depth_problem(value):
            return None  # malformed: decode_delta explains
        delta = _fast_json(value)
    if delta is None:
        return None
    adds, rems = delta[0], delta[1]
    n = len(adds) + len(rems)
    if n == 0 or n > max_triples:
        return None
    if _needs_term_check(delta):
        return None
    return delta


def encode_avro(delta: Delta) -> bytes:
    """Avro single-object encoding of a delta (what producers write)."""
    buf = io.BytesIO()
    buf.write(AVRO_PREFIX)
    fastavro.schemaless_writer(
        buf,
        DELTA_SCHEMA,
        {
            "id": delta.id or "",
            "actor": delta.actor or "",
            "additions": [t._asdict() for t in delta.additions],
            "removals": [t._asdict() for t in delta.removals],
        },
    )
    return buf.getvalue()


def encode_json(delta: Delta) -> bytes:
    """The JSON form of a delta, compact, with `g` only where present."""

    def triples(ts: tuple[Triple, ...]) -> list[dict[str, str]]:
        return [{"s": t.s, "p": t.p, "o": t.o} | ({"g": t.g} if t.g is not None else {}) for t in ts]

    obj: dict[str, Any] = {"additions": triples(delta.additions), "removals": triples(delta.removals)}
    if delta.id is not None:
        obj["id"] = delta.id
    if delta.actor is not None:
        obj["actor"] = delta.actor
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

"""Hooks turn a decoded delta into actions; `canonical@1` is the default.

A user hook is any importable `module:function` taking a `Delta` and
returning a list of actions `(op, s, p, o, g)`. Whatever it raises or
returns that is not a list of actions becomes the rejection `hook_error`,
whose receipt depends only on the delta, never on the exception's text,
so every peer running the same deterministic hook writes the same receipt.
"""

from __future__ import annotations

import importlib
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from knhk_stream.errors import HookError
from knhk_stream.protocol.decode import (
    AVRO_MAGIC,
    AVRO_PREFIX,
    MAX_TERM_BYTES,
    Delta,
    NativeTriple,
    Triple,
    native_json,
)
from knhk_stream.protocol.encoding import H

ADD = 1
REMOVE = 2
CANONICAL = "canonical@1"
HOOK_NAME = re.compile(r"^[A-Za-z0-9_.\-]+@[A-Za-z0-9_.\-]+$")

HookFunction = Callable[[Delta], Sequence[Any]]


_U32 = struct.Struct(">I")


def encode_actions(actions: Sequence[Any]) -> bytes:
    """`u8 op || str32 s || str32 p || str32 o || str32 g` for each action, in order."""
    parts: list[bytes] = []
    for a in actions:
        if not isinstance(a, (tuple, list)) or len(a) != 5:
            raise HookError(f"an action must be (op, s, p, o, g), got {type(a).__name__}")
        op, s, p, o, g = a
        if type(op) is not int or op not in (ADD, REMOVE):
            raise HookError(f"action op must be 1 (add) or 2 (remove), got {op!r}")
        parts.append(bytes((op,)))
        for term in (s, p, o, "" if g is None else g):
            if not isinstance(term, str):
                raise HookError(f"action terms must be strings, got {type(term).__name__}")
            b = term.encode("utf-8")
            parts.append(_U32.pack(len(b)))
            parts.append(b)
    return b"".join(parts)


_LEN = _U32.pack
_NO_GRAPH = bytes(4)  # str32 of the empty string
_OPS = (b"", bytes((ADD,)), bytes((REMOVE,)))
# str32 length prefixes, looked up rather than packed: every term of a decoded delta has at most
# MAX_TERM_BYTES; a longer one (a delta built by hand) takes _encode_side's packing fallback.
_LENS = tuple(_LEN(n) for n in range(MAX_TERM_BYTES + 1))


def _sorted_keys(triples: Sequence[Triple]) -> list[tuple[str, str, str, str]]:
    """(s, p, o, g or "") of each triple, sorted, without duplicates."""
    if len(triples) == 1:  # the common case: nothing to sort or drop
        s, p, o, g = triples[0]
        return [(s, p, o, g or "")]
    # Code-point order of str equals UTF-8 byte order for valid Unicode.
    return sorted({(s, p, o, g or "") for s, p, o, g in triples})


def canonical(delta: Delta) -> list[tuple[int, str, str, str, str]]:
    """Additions then removals, each sorted by (s, p, o, g) bytes, duplicates dropped."""
    adds = _sorted_keys(delta.additions) if delta.additions else []
    rems = _sorted_keys(delta.removals) if delta.removals else []
    return [(ADD, *k) for k in adds] + [(REMOVE, *k) for k in rems]


def _encode_side(parts: list[bytes], op: bytes, keys: Sequence[tuple[str, str, str, str | None]]) -> None:
    """Append the pieces of `u8 op || str32 s || str32 p || str32 o || str32 g` for each key."""
    lens = _LENS  # IndexError for a term longer than MAX_TERM_BYTES: the caller packs instead
    for s, p, o, g in keys:
        bs, bp, bo = s.encode(), p.encode(), o.encode()
        if g:
            bg = g.encode()
            parts += (op, lens[len(bs)], bs, lens[len(bp)], bp, lens[len(bo)], bo, lens[len(bg)], bg)
        else:
            parts += (op, lens[len(bs)], bs, lens[len(bp)], bp, lens[len(bo)], bo, _NO_GRAPH)


def canonical_encoded(delta: Delta) -> tuple[int, bytes]:
    """(lanes, encoded actions) of canonical@1, without building the action tuples."""
    adds, rems = delta[0], delta[1]
    try:
        return _canonical_pieces(adds, rems, _encode_side)
    except IndexError:  # a term longer than MAX_TERM_BYTES
        return _canonical_pieces(adds, rems, _encode_side_packed)


def _canonical_pieces(
    adds: Sequence[Triple], rems: Sequence[Triple], encode: Callable[[list[bytes], bytes, Any], None]
) -> tuple[int, bytes]:
    parts: list[bytes] = []
    lanes = 0
    if adds:
        keys = adds if len(adds) == 1 else sorted({(s, p, o, g or "") for s, p, o, g in adds})
        encode(parts, _OPS[ADD], keys)
        lanes = len(keys)
    if rems:
        keys = rems if len(rems) == 1 else sorted({(s, p, o, g or "") for s, p, o, g in rems})
        encode(parts, _OPS[REMOVE], keys)
        lanes += len(keys)
    return lanes, b"".join(parts)


def _encode_side_packed(parts: list[bytes], op: bytes, keys: Sequence[tuple[str, str, str, str | None]]) -> None:
    """_encode_side for terms of any length."""
    for s, p, o, g in keys:
        parts.append(op)
        for term in (s, p, o, g or ""):
            b = term.encode()
            parts += (_LEN(len(b)), b)


_ADD_S, _REMOVE_S = chr(ADD), chr(REMOVE)
_LENS_S = tuple(b.decode("latin-1") for b in _LENS)  # the same prefixes as str: one char per byte
_NO_GRAPH_S = _NO_GRAPH.decode("latin-1")


def canonical_actions(value: bytes, max_triples: int = 1024) -> tuple[int, bytes] | None:
    """canonical@1's (lanes, encoded actions) straight from a delta value, for the common deltas.

    Whenever this returns them, decode_delta(value, max_triples) is a Delta and they are exactly
    canonical_encoded of it. None: decode the value (decode_valid, else decode_delta) instead.
    JSON goes through decode.native_json; Avro with an all-ASCII body is read here, as bytes.
    Neither builds Triples or a Delta.
    """
    if value[:2] == AVRO_MAGIC:
        return _avro_actions(value, max_triples)
    d = native_json(value)
    if d is None:
        return None
    adds, rems = d.additions, d.removals  # each UNSET or a list
    n = (len(adds) if adds else 0) + (len(rems) if rems else 0)
    if not 0 < n <= max_triples:
        return None
    if value.isascii():  # so is every term: str pieces, UTF-8 = Latin-1, one encode at the end
        sparts: list[str] = []
        lanes = 0
        if adds:
            lanes = _ascii_side(sparts, _ADD_S, adds)
        if rems:
            lanes += _ascii_side(sparts, _REMOVE_S, rems)
        return lanes, "".join(sparts).encode("latin-1")
    parts: list[bytes] = []
    lanes = 0
    if adds:
        keys = [(t.s, t.p, t.o, t.g or "") for t in adds]
        keys = keys if len(keys) == 1 else sorted(set(keys))
        _encode_side(parts, _OPS[ADD], keys)
        lanes = len(keys)
    if rems:
        keys = [(t.s, t.p, t.o, t.g or "") for t in rems]
        keys = keys if len(keys) == 1 else sorted(set(keys))
        _encode_side(parts, _OPS[REMOVE], keys)
        lanes += len(keys)
    return lanes, b"".join(parts)


# A one-byte Avro long (a zig-zag varint below 0x80) as a length. Odd bytes (negative lengths)
# map far past any value's end, so that the next read raises IndexError or the final length
# check fails; for s, p and o so does 0 (an empty term: decode_delta's term check explains it).
_FAR = 1 << 40
_AVRO_LEN = tuple(_FAR if x & 1 or x >= 0x80 else x >> 1 for x in range(256))
_AVRO_TERM_LEN = tuple(_FAR if x & 1 or x >= 0x80 or x == 0 else x >> 1 for x in range(256))
_SIDES = (_OPS[ADD], _OPS[REMOVE])


def _avro_actions(value: bytes, max_triples: int) -> tuple[int, bytes] | None:
    """canonical_actions of an `io.knhk.Delta` in Avro single-object encoding whose body is all
    ASCII; None for anything else (decode_valid reads it then: `_fast_avro`, or fastavro).

    An ASCII body has only one-byte varints (every length and count below 64) and valid UTF-8,
    so the terms are read as byte slices: UTF-8 byte order is code-point order, so they sort as
    the decoded strings do. The body is `str id, array<Triple> additions, array<Triple> removals,
    str actor`, a Triple `str s, str p, str o, union {null, str} g`, an array blocks of
    `count, items` ended by a 0 count. A negative count (a block with its byte size), an empty
    s, p or o, a bad union branch, a short value or trailing bytes: None.
    """
    if not value.startswith(AVRO_PREFIX):
        return None
    b = value[10:]
    if not b.isascii():
        return None
    lens, term_lens, str32 = _AVRO_LEN, _AVRO_TERM_LEN, _LENS
    parts: list[bytes] = []
    lanes = n = 0
    try:
        i = 1 + lens[b[0]]  # past the id
        for op in _SIDES:
            side: list[tuple[bytes, bytes, bytes, bytes | None]] = []
            c = b[i]
            i += 1
            while c:
                if c & 1:  # a negative count
                    return None
                for _ in range(c >> 1):
                    k = i + 1
                    i = k + term_lens[b[i]]
                    s = b[k:i]
                    k = i + 1
                    i = k + term_lens[b[i]]
                    p = b[k:i]
                    k = i + 1
                    i = k + term_lens[b[i]]
                    o = b[k:i]
                    x = b[i]  # the union's branch: 0 null, 2 string
                    if x == 0:
                        g = None
                        i += 1
                    elif x == 2:
                        k = i + 2
                        i = k + lens[b[i + 1]]
                        g = b[k:i]
                    else:
                        return None
                    side.append((s, p, o, g))
                c = b[i]
                i += 1
            if len(side) == 1:  # the common case, inline
                s, p, o, g = side[0]
                if g:
                    parts += (op, str32[len(s)], s, str32[len(p)], p, str32[len(o)], o, str32[len(g)], g)
                else:
                    parts += (op, str32[len(s)], s, str32[len(p)], p, str32[len(o)], o, _NO_GRAPH)
                lanes += 1
                n += 1
            elif side:
                lanes += _bytes_side(parts, op, side)
                n += len(side)
        i += 1 + lens[b[i]]  # past the actor
    except IndexError:  # a length past the end
        return None
    if i != len(b) or not 0 < n <= max_triples:  # a short last string or trailing bytes; the count
        return None
    return lanes, b"".join(parts)


def _ascii_side(parts: list[str], op: str, items: list[NativeTriple]) -> int:
    """_encode_side for all-ASCII terms, as str pieces; returns the lanes."""
    lens = _LENS_S  # terms of at most _SHORT code points: always in the table
    if len(items) == 1:
        t = items[0]
        s, p, o, g = t.s, t.p, t.o, t.g
        if g:
            parts += (op, lens[len(s)], s, lens[len(p)], p, lens[len(o)], o, lens[len(g)], g)
        else:  # UNSET, None or ""
            parts += (op, lens[len(s)], s, lens[len(p)], p, lens[len(o)], o, _NO_GRAPH_S)
        return 1
    keys = sorted({(t.s, t.p, t.o, t.g or "") for t in items})
    for s, p, o, g in keys:
        if g:
            parts += (op, lens[len(s)], s, lens[len(p)], p, lens[len(o)], o, lens[len(g)], g)
        else:
            parts += (op, lens[len(s)], s, lens[len(p)], p, lens[len(o)], o, _NO_GRAPH_S)
    return len(keys)


def _bytes_side(parts: list[bytes], op: bytes, items: list[tuple[bytes, bytes, bytes, bytes | None]]) -> int:
    """_encode_side for terms given as UTF-8 bytes (byte order is code-point order); returns the lanes."""
    lens = _LENS
    keys = items if len(items) == 1 else sorted({(s, p, o, g or b"") for s, p, o, g in items})
    for s, p, o, g in keys:
        if g:
            parts += (op, lens[len(s)], s, lens[len(p)], p, lens[len(o)], o, lens[len(g)], g)
        else:
            parts += (op, lens[len(s)], s, lens[len(p)], p, lens[len(o)], o, _NO_GRAPH)
    return len(keys)


@dataclass(frozen=True)
class Hook:
    """A named, versioned hook: `name` (`name@version`) is what `hook_id` commits to."""

    name: str
    function: HookFunction

    @property
    def hook_id(self) -> bytes:
        return H(self.name.encode("utf-8"))

    def actions(self, delta: Delta) -> tuple[int, bytes]:
        """(lanes, encoded actions), or HookError for anything a hook gets wrong."""
        if self.function is canonical:  # the hot path: decoded terms are valid, skip the checks
            return canonical_encoded(delta)
        try:
            out = self.function(delta)
        except Exception as e:
            raise HookError(f"hook {self.name} raised {type(e).__name__}: {e}") from e
        if not isinstance(out, (list, tuple)):
            raise HookError(f"hook {self.name} returned {type(out).__name__}, not a list")
        try:
            return len(out), encode_actions(out)
        except HookError:
            raise
        except Exception as e:  # e.g. a lone surrogate in a term
            raise HookError(f"hook {self.name} returned a bad action: {e}") from e


def load_hook(name: str, entrypoint: str | None = None) -> Hook:
    """`canonical@1`, or a user hook `name@version` found at `module:function`."""
    if not HOOK_NAME.match(name):
        raise ValueError(f"hook name {name!r} must look like name@version, e.g. canonical@1")
    if entrypoint is None:
        if name == CANONICAL:
            return Hook(CANONICAL, canonical)
        raise ValueError(
            f"unknown hook {name!r}: the built-in hook is {CANONICAL}; "
            'for a user hook also set hook_entrypoint = "module:function"'
        )
    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"hook_entrypoint {entrypoint!r} must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"hook_entrypoint {entrypoint!r}: cannot import {module_name}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"hook_entrypoint {entrypoint!r}: {attr} is not a function of {module_name}")
    return Hook(name, fn)

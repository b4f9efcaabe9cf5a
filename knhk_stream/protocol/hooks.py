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
from knhk_stream.protocol.decode import Delta, Triple
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


_OP_LEN = struct.Struct(">BI").pack
_LEN = _U32.pack
_NO_GRAPH = bytes(4)  # str32 of the empty string


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


def canonical_encoded(delta: Delta) -> tuple[int, bytes]:
    """(lanes, encoded actions) of canonical@1, without building the action tuples."""
    parts = []
    for op, triples in ((ADD, delta[0]), (REMOVE, delta[1])):
        if not triples:
            continue
        for s, p, o, g in _sorted_keys(triples):
            bs, bp, bo = s.encode(), p.encode(), o.encode()
            if g:
                bg = g.encode()
                parts.append(_OP_LEN(op, len(bs)) + bs + _LEN(len(bp)) + bp + _LEN(len(bo)) + bo + _LEN(len(bg)) + bg)
            else:
                parts.append(_OP_LEN(op, len(bs)) + bs + _LEN(len(bp)) + bp + _LEN(len(bo)) + bo + _NO_GRAPH)
    return len(parts), b"".join(parts)


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

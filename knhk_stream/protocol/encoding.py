"""The byte encodings that go into hashes (protocol: "Encodings used in hashes")."""

from __future__ import annotations

import struct
import threading

from blake3 import blake3

ZERO_HASH = bytes(32)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class _Hashers(threading.local):
    """One reusable BLAKE3 hasher per thread: blake3-py's constructor costs about as much as
    hashing 100 bytes twice, reset() almost nothing. Per thread, because a reset/update/digest
    sequence on a shared hasher would interleave with another thread's."""

    def __init__(self) -> None:
        self.hasher = blake3()


# For hot loops that hash many values: `h = HASHERS.hasher`, then `h.reset()` and
# `h.update(data).digest()` is `H(data)`. Nothing else may use h between the two.
HASHERS = _Hashers()


def H(data: bytes) -> bytes:  # noqa: N802 - the protocol's name for it
    """BLAKE3 with 32 bytes of output."""
    h = HASHERS.hasher
    h.reset()
    return h.update(data).digest()


def u16(n: int) -> bytes:
    return _U16.pack(n)


def u32(n: int) -> bytes:
    return _U32.pack(n)


def u64(n: int) -> bytes:
    return _U64.pack(n)


def str16(s: str) -> bytes:
    """`str`: a u16 byte length followed by UTF-8."""
    b = s.encode("utf-8")
    return _U16.pack(len(b)) + b


def str32(s: str) -> bytes:
    """`str32` (actions): a u32 byte length followed by UTF-8."""
    b = s.encode("utf-8")
    return _U32.pack(len(b)) + b


def cycle_key(cycle: int) -> str:
    """Cycles are zero-padded to 20 digits wherever they appear in keys."""
    return f"{cycle:020d}"


def parse_hash(text: str, what: str = "hash") -> bytes:
    """A 32-byte hash from lowercase/uppercase hex, with an error naming `what`."""
    try:
        b = bytes.fromhex(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} is not hex: {text!r}") from e
    if len(b) != 32:
        raise ValueError(f"{what} must be 32 bytes (64 hex digits), got {len(b)} bytes")
    return b

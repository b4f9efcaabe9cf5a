"""Receipts: the 123 bytes a peer records for every delta, applied or rejected."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from knhk_stream.protocol.decode import HOOK_ERROR, REJECTION_CODES, Rejected, decode_delta, decode_valid
from knhk_stream.protocol.encoding import HASHERS, H
from knhk_stream.protocol.hooks import Hook, HookError, canonical, canonical_actions, canonical_encoded

RECEIPT_VERSION = 1
RECEIPT_SIZE = 123
APPLIED = 0
REJECTED = 1

# protocol "Receipts": u8 1 || u32 shard || u64 cycle || u8 tick || u64 offset || u8 status || u32 lanes
#                      || [32] hook_id || [32] delta_hash || [32] a_hash
RECEIPT_LAYOUT = (
    ("version", "B"),
    ("shard", "I"),
    ("cycle", "Q"),
    ("tick", "B"),
    ("offset", "Q"),
    ("status", "B"),
    ("lanes", "I"),
    ("hook_id", "32s"),
    ("delta_hash", "32s"),
    ("a_hash", "32s"),
)
_RECEIPT = struct.Struct(">" + "".join(code for _, code in RECEIPT_LAYOUT))
assert _RECEIPT.size == RECEIPT_SIZE
_PACK = _RECEIPT.pack


def _field_slices() -> dict[str, slice]:
    out, at = {}, 0
    for name, code in RECEIPT_LAYOUT:
        size = struct.calcsize(">" + code)
        out[name] = slice(at, at + size)
        at += size
    return out


# Where each field sits in the 123 bytes, to read one without unpacking the receipt.
RECEIPT_FIELD = _field_slices()
TICK_BYTE = RECEIPT_FIELD["tick"].start
STATUS_BYTE = RECEIPT_FIELD["status"].start
OFFSET_BYTES = RECEIPT_FIELD["offset"]
A_HASH_BYTES = RECEIPT_FIELD["a_hash"]


def receipt_tick(receipt: bytes) -> int:
    return receipt[TICK_BYTE]


def receipt_offset(receipt: bytes) -> int:
    """The offset a receipt is for (a big-endian u64)."""
    return int.from_bytes(receipt[OFFSET_BYTES], "big")


@dataclass(frozen=True, slots=True)
class Receipt:
    shard: int
    cycle: int
    tick: int
    offset: int
    status: int
    lanes: int
    hook_id: bytes
    delta_hash: bytes
    a_hash: bytes

    def to_bytes(self) -> bytes:
        return _RECEIPT.pack(
            RECEIPT_VERSION,
            self.shard,
            self.cycle,
            self.tick,
            self.offset,
            self.status,
            self.lanes,
            self.hook_id,
            self.delta_hash,
            self.a_hash,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        if len(data) != RECEIPT_SIZE:
            raise ValueError(f"a receipt is {RECEIPT_SIZE} bytes, got {len(data)}")
        version, *fields = _RECEIPT.unpack(data)
        if version != RECEIPT_VERSION:
            raise ValueError(f"unknown receipt version {version}")
        return cls(*fields)


def rejected_a_hash(code: str) -> bytes:
    return H(b"rejected:" + code.encode("ascii"))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a peer makes of one delta value, before it knows where it sits."""

    status: int
    lanes: int
    a_hash: bytes
    delta_hash: bytes
    code: str | None = None
    reason: str | None = None


class ReceiptMaker(Protocol):
    """What cuts receipts: a DeltaProcessor, or one per epoch (`ChainSettings.processor()` gives the right one)."""

    def receipt(self, shard: int, cycle: int, tick: int, offset: int, value: bytes | None) -> bytes: ...


class DeltaProcessor:
    """decode -> hook -> receipt, with the chain's hook and max_triples."""

    def __init__(self, hook: Hook, max_triples: int = 1024) -> None:
        self.hook = hook
        self.hook_id = hook.hook_id
        self.max_triples = max_triples
        self._canonical = hook.function is canonical

    def outcome(self, value: bytes | None) -> Outcome:
        delta_hash = H(value or b"")
        delta = decode_delta(value, self.max_triples)
        if isinstance(delta, Rejected):
            return Outcome(REJECTED, 0, rejected_a_hash(delta.code), delta_hash, *delta)
        try:
            lanes, actions = self.hook.actions(delta)
        except HookError as e:
            return Outcome(REJECTED, 0, rejected_a_hash(HOOK_ERROR), delta_hash, HOOK_ERROR, str(e))
        return Outcome(APPLIED, lanes, H(actions), delta_hash)

    def receipt(self, shard: int, cycle: int, tick: int, offset: int, value: bytes | None) -> bytes:
        enc = None
        if self._canonical and value:  # the hot path, without the Outcome (same bytes)
            enc = canonical_actions(value, self.max_triples)
            if enc is None:
                delta = decode_valid(value, self.max_triples)
                if delta is not None:
                    enc = canonical_encoded(delta)
        if enc is not None:
            lanes, actions = enc
            h = HASHERS.hasher  # H(value), H(actions) with this thread's hasher
            h.reset()
            delta_hash = h.update(value).digest()
            h.reset()
            status, a_hash = APPLIED, h.update(actions).digest()
        else:
            o = self.outcome(value)
            status, lanes, delta_hash, a_hash = o.status, o.lanes, o.delta_hash, o.a_hash
        return _PACK(RECEIPT_VERSION, shard, cycle, tick, offset, status, lanes, self.hook_id, delta_hash, a_hash)


_CODE_BY_A_HASH: dict[bytes, str] = {}


def rejections_by_code(receipts: Sequence[bytes]) -> dict[str, int]:
    """Count rejected receipts by code (a rejected receipt's a_hash names its code)."""
    if not _CODE_BY_A_HASH:
        _CODE_BY_A_HASH.update({rejected_a_hash(c): c for c in REJECTION_CODES})
    out: dict[str, int] = {}
    for r in receipts:
        if r[STATUS_BYTE] == REJECTED:
            code = _CODE_BY_A_HASH.get(r[A_HASH_BYTES], "unknown")
            out[code] = out.get(code, 0) + 1
    return out

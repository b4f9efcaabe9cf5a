"""Receipts: the 123 bytes a peer records for every delta, applied or rejected."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from blake3 import blake3 as _blake3

from knhk_stream.protocol.decode import HOOK_ERROR, REJECTION_CODES, Rejected, decode_delta, decode_valid
from knhk_stream.protocol.encoding import H
from knhk_stream.protocol.hooks import Hook, HookError, canonical, canonical_encoded

RECEIPT_VERSION = 1
RECEIPT_SIZE = 123
APPLIED = 0
REJECTED = 1

_RECEIPT = struct.Struct(">BIQBQBI32s32s32s")
assert _RECEIPT.size == RECEIPT_SIZE
_PACK = _RECEIPT.pack


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
        if self._canonical and value:  # the hot path, without the Outcome (same bytes)
            delta = decode_valid(value, self.max_triples)
            if delta is not None:
                lanes, actions = canonical_encoded(delta)
                return _PACK(
                    RECEIPT_VERSION,
                    shard,
                    cycle,
                    tick,
                    offset,
                    APPLIED,
                    lanes,
                    self.hook_id,
                    _blake3(value).digest(),
                    _blake3(actions).digest(),
                )
        o = self.outcome(value)
        return _PACK(
            RECEIPT_VERSION,
            shard,
            cycle,
            tick,
            offset,
            o.status,
            o.lanes,
            self.hook_id,
            o.delta_hash,
            o.a_hash,
        )


_CODE_BY_A_HASH: dict[bytes, str] = {}


def rejections_by_code(receipts: Sequence[bytes]) -> dict[str, int]:
    """Count rejected receipts by code (a rejected receipt's a_hash names its code)."""
    if not _CODE_BY_A_HASH:
        _CODE_BY_A_HASH.update({rejected_a_hash(c): c for c in REJECTION_CODES})
    out: dict[str, int] = {}
    for r in receipts:
        if r[22] == REJECTED:
            code = _CODE_BY_A_HASH.get(r[-32:], "unknown")
            out[code] = out.get(code, 0) + 1
    return out

"""Lockchain entries: one hash-chained link per committed beat of a shard."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from knhk_stream.protocol.beats import Beat
from knhk_stream.protocol.encoding import ZERO_HASH, H, str16, u32, u64


@dataclass(frozen=True, slots=True)
class Entry:
    chain_id: str
    shard: int
    cycle: int
    root: bytes
    receipt_count: int
    first_offset: int
    last_offset: int
    prev_entry_hash: bytes
    # entry_hash, once computed: a peer asks for it several times per vote (decode, count, commit)
    _entry_hash: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def entry_hash(self) -> bytes:
        h = self._entry_hash
        if h is None:
            h = self._hash()
            object.__setattr__(self, "_entry_hash", h)  # frozen: the fields it covers never change
        return h

    def _hash(self) -> bytes:
        return H(
            b"\x02"
            + str16(self.chain_id)
            + u32(self.shard)
            + u64(self.cycle)
            + self.root
            + u64(self.receipt_count)
            + u64(self.first_offset)
            + u64(self.last_offset)
            + self.prev_entry_hash
        )

    def to_fields(self) -> dict[str, str | int]:
        """The entry's fields as JSON-ready values (hashes as lowercase hex), in protocol order."""
        out: dict[str, str | int] = {}
        for name in ENTRY_FIELDS:
            v = getattr(self, name)
            out[name] = v.hex() if isinstance(v, bytes) else v
        return out

    @classmethod
    def from_fields(cls, f: dict[str, object]) -> Entry:
        """Inverse of to_fields; accepts ints as numbers or decimal strings, hashes as hex or bytes."""

        def h(name: str) -> bytes:
            v = f[name]
            b = v if isinstance(v, bytes) else bytes.fromhex(str(v))
            if len(b) != 32:
                raise ValueError(f"{name} must be 32 bytes, got {len(b)}")
            return b

        def n(name: str) -> int:
            v = f[name]
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ValueError(f"{name} must be an integer")
            i = int(v)
            if i < 0:
                raise ValueError(f"{name} must not be negative")
            return i

        def s(name: str) -> str:
            return str(f[name])

        read = {"int": n, "bytes": h, "str": s}
        return cls(*(read[kind](name) for name, kind in _KINDS))


# The entry's fields in protocol order (what entry_hash covers), as the dataclass above defines them.
_KINDS: tuple[tuple[str, str], ...] = tuple(
    (f.name, f.type if isinstance(f.type, str) else f.type.__name__) for f in fields(Entry) if f.init
)
ENTRY_FIELDS: tuple[str, ...] = tuple(name for name, _ in _KINDS)
ENTRY_INT_FIELDS: tuple[str, ...] = tuple(name for name, kind in _KINDS if kind == "int")
ENTRY_HASH_FIELDS: tuple[str, ...] = tuple(name for name, kind in _KINDS if kind == "bytes")


def entry_for_beat(chain_id: str, beat: Beat, prev_entry_hash: bytes = ZERO_HASH) -> Entry:
    return Entry(
        chain_id,
        beat.shard,
        beat.cycle,
        beat.root(),
        beat.receipt_count,
        beat.first_offset,
        beat.last_offset,
        prev_entry_hash,
    )


def record_key(chain_id: str, shard: int, cycle: int) -> str:
    """Key of vote and committed-root records: `chain_id/shard/cycle:020`."""
    return f"{chain_id}/{shard}/{cycle:020d}"

"""One peer's logic for the shards it holds: records in, signed votes out.

This is the engine the standalone worker, the Faust integration and any
embedding pipeline share. It does no I/O: the caller reads records, publishes
the votes it returns, and persists `ResumePoint`s once a vote is delivered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from knhk_stream.protocol.beats import Beat, BeatAssembler
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.entry import Entry, entry_for_beat
from knhk_stream.protocol.quorum import Vote, public_key_bytes, sign
from knhk_stream.protocol.receipts import DeltaProcessor
from knhk_stream.protocol.settings import ChainSettings

MARKER_HEADER = "knhk-marker"


@dataclass(frozen=True)
class ResumePoint:
    """Where a peer resumes a shard: a beat boundary and the entry hash to chain from."""

    next_offset: int
    prev_entry_hash: bytes = ZERO_HASH
    last_cycle: int | None = None  # cycle of the beat the peer last voted on

    @classmethod
    def after(cls, entry: Entry) -> ResumePoint:
        return cls(entry.last_offset + 1, entry.entry_hash, entry.cycle)


def is_marker(headers: list[tuple[str, bytes | None]] | dict[str, bytes] | None) -> bool:
    if not headers:
        return False
    names = headers.keys() if isinstance(headers, dict) else (h[0] for h in headers)
    return MARKER_HEADER in names


class _Shard:
    __slots__ = ("assembler", "last_beat", "prev_entry_hash", "resume")

    def __init__(self, assembler: BeatAssembler, resume: ResumePoint) -> None:
        self.assembler = assembler
        self.resume = resume
        self.prev_entry_hash = resume.prev_entry_hash
        self.last_beat: Beat | None = None


class PeerEngine:
    """Cuts beats per shard, chains entries locally, and signs a vote per closed beat."""

    def __init__(self, settings: ChainSettings, peer_id: str, key: Ed25519PrivateKey) -> None:
        known = settings.public_keys.get(peer_id)
        if known is None:
            raise ValueError(f"peer id {peer_id!r} is not in the chain settings' [[peers]]")
        if known != public_key_bytes(key):
            raise ValueError(f"the key given does not match the public key of peer {peer_id!r} in the chain settings")
        self.settings = settings
        self.peer_id = peer_id
        self.key = key
        self.processor = DeltaProcessor(settings.load_hook(), settings.max_triples)
        self._shards: dict[int, _Shard] = {}

    @property
    def shards(self) -> list[int]:
        return sorted(self._shards)

    def assign(self, shard: int, resume: ResumePoint) -> None:
        """Start (or restart) a shard at a resume point; the caller must read from resume.next_offset."""
        asm = BeatAssembler(shard, self.settings.tick_ms, self.processor)
        self._shards[shard] = _Shard(asm, resume)

    def revoke(self, shard: int) -> None:
        """Forget a shard; its open beat is dropped and rebuilt by whoever resumes it."""
        self._shards.pop(shard, None)

    def resume_point(self, shard: int) -> ResumePoint:
        return self._shards[shard].resume

    def feed(self, shard: int, offset: int, timestamp_ms: int, marker: bool, value: bytes | None) -> Vote | None:
        """One record of `shard` in offset order; returns a vote when it closes a beat."""
        state = self._shards[shard]
        if offset < state.resume.next_offset:
            return None  # before the resume point: already voted on
        beat = state.assembler.feed(offset, timestamp_ms, marker, value)
        return self._vote(state, beat) if beat is not None else None

    def _vote(self, state: _Shard, beat: Beat) -> Vote:
        entry = entry_for_beat(self.settings.chain_id, beat, state.prev_entry_hash)
        state.prev_entry_hash = entry.entry_hash
        state.last_beat = beat
        return Vote(entry, self.peer_id, sign(self.key, entry.entry_hash), int(time.time() * 1000))

    def delivered(self, vote: Vote) -> ResumePoint:
        """Record that `vote` is on the votes topic; returns the new resume point to persist."""
        point = ResumePoint.after(vote.entry)
        state = self._shards.get(vote.entry.shard)
        if state is not None and (state.resume.last_cycle is None or vote.entry.cycle > state.resume.last_cycle):
            state.resume = point
        return point

    def open_beat(self, shard: int) -> tuple[int | None, int | None, int]:
        """(cycle, first offset, deltas so far) of a shard's open beat, for tick markers."""
        asm = self._shards[shard].assembler
        return asm.open_cycle, asm.open_first_offset, asm.open_deltas

    def last_beat(self, shard: int) -> Beat | None:
        """The beat of the shard's newest vote (for metrics)."""
        return self._shards[shard].last_beat

    def beat_end_ms(self, cycle: int) -> int:
        """Wall-clock ms at which a beat of `cycle` is over."""
        return (cycle + 1) * 8 * self.settings.tick_ms

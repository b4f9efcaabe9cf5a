"""One peer's logic for the shards it holds: records in, signed votes out.

This is the engine the standalone worker, the Faust integration and any
embedding pipeline share. It does no I/O: the caller reads records, publishes
the votes it returns, and persists `ResumePoint`s once a vote is delivered.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from knhk_stream.protocol.beats import TICKS_PER_BEAT, Beat, BeatAssembler
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.entry import Entry, entry_for_beat
from knhk_stream.protocol.quorum import Vote, public_key_bytes, sign
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


def is_marker(headers: list[tuple[str, bytes | None]] | dict[str, bytes] | None, value: bytes | None) -> bool:
    """Whether a deltas-topic record is a tick marker: the `knhk-marker` header and a null or empty value.

    A record with the header and a non-empty value is a delta like any other and gets
    its receipt (protocol "Deltas topic": a header cannot hide a delta). Every reader
    of the deltas topic (worker, Faust peer, audit replay) decides here.
    """
    if value or not headers:
        return False
    names = headers.keys() if isinstance(headers, dict) else (h[0] for h in headers)
    return MARKER_HEADER in names


MAX_RECENT = 256  # own uncommitted entries kept per shard for re-signing after a dissent


class _Shard:
    __slots__ = ("assembler", "dissents", "last_beat", "last_committed", "prev_entry_hash", "recent", "resume")

    def __init__(self, assembler: BeatAssembler, resume: ResumePoint) -> None:
        self.assembler = assembler
        self.resume = resume
        self.prev_entry_hash = resume.prev_entry_hash
        self.last_beat: Beat | None = None
        self.recent: dict[int, Entry] = {}  # cycle -> own entry not yet known committed
        self.last_committed: tuple[int, bytes] | None = None
        self.dissents = 0


class PeerEngine:
    """Cuts beats per shard, chains entries, and signs a vote per closed beat with the epoch of its cycle.

    A peer chains from the committed entry of the previous beat when it knows
    it; when a committed entry differs from its own vote (it dissented), it
    re-signs its later votes chained from the committed entry, and so rejoins.
    """

    def __init__(
        self, settings: ChainSettings, peer_id: str, key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey]
    ) -> None:
        keys = [key] if isinstance(key, Ed25519PrivateKey) else list(key)
        self.keys = {public_key_bytes(k): k for k in keys}
        self.peer_id = peer_id
        self.settings = settings
        self.max_voted: int | None = None  # newest cycle voted on, any shard
        self.check_membership(settings)
        self.processor = settings.processor()
        self._shards: dict[int, _Shard] = {}

    def check_membership(self, settings: ChainSettings) -> None:
        """The peer must be in some epoch, holding a key of it; ValueError saying what is wrong."""
        epochs = settings.epoch_chain.epochs
        listed = [e for e in epochs if self.peer_id in e.public_keys]
        if not listed:
            raise ValueError(f"peer id {self.peer_id!r} is not in the chain settings' [[peers]] of any epoch")
        if not any(e.public_keys[self.peer_id] in self.keys for e in listed):
            raise ValueError(
                f"the key(s) given do not match the public key of peer {self.peer_id!r} in the chain settings"
                f" (epochs {', '.join(str(e.number) for e in listed)})"
            )

    def update_settings(self, settings: ChainSettings) -> None:
        """Take newer settings (a new epoch): refused when an epoch starts at or below a cycle already voted on."""
        old = {e.epoch_hash for e in self.settings.epoch_chain.epochs}
        for e in settings.epoch_chain.epochs:
            if e.epoch_hash not in old and self.max_voted is not None and e.from_cycle <= self.max_voted:
                raise ValueError(
                    f"epoch {e.number} starts at cycle {e.from_cycle}, at or below cycle {self.max_voted} "
                    "this peer already voted on: refused"
                )
        self.settings = settings
        self.processor = settings.processor()
        for state in self._shards.values():
            state.assembler.processor = self.processor

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
        """One record of `shard` in offset order; returns a vote when it closes a beat.

        `marker` is `is_marker(headers, value)` of the record.
        """
        state = self._shards[shard]
        if offset < state.resume.next_offset:
            return None  # before the resume point: already voted on
        beat = state.assembler.feed(offset, timestamp_ms, marker, value)
        return self._vote(state, beat) if beat is not None else None

    def _sign(self, entry: Entry) -> Vote | None:
        epoch = self.settings.epoch_for(entry.cycle)
        pub = epoch.public_keys.get(self.peer_id)
        key = self.keys.get(pub) if pub is not None else None
        if key is None:
            return None  # not a peer of this epoch, or its key is not held here: no vote
        if self.max_voted is None or entry.cycle > self.max_voted:
            self.max_voted = entry.cycle
        sig = sign(key, epoch.epoch_hash, entry.entry_hash)
        return Vote(entry, self.peer_id, sig, int(time.time() * 1000), epoch.number)

    def _vote(self, state: _Shard, beat: Beat) -> Vote | None:
        entry = entry_for_beat(self.settings.chain_id, beat, state.prev_entry_hash)
        lc = state.last_committed
        # behind the committed chain: the next beat follows the committed entry of this cycle
        behind = lc is not None and lc[0] == beat.cycle
        if behind and entry.entry_hash != lc[1]:
            state.dissents += 1  # its vote for a cycle already committed as another entry
        state.prev_entry_hash = lc[1] if behind else entry.entry_hash
        state.last_beat = beat
        if lc is None or beat.cycle > lc[0]:
            state.recent[beat.cycle] = entry
            while len(state.recent) > MAX_RECENT:
                del state.recent[min(state.recent)]
        return self._sign(entry)

    def on_committed(self, shard: int, cycle: int, entry_hash: bytes) -> list[Vote]:
        """The committed head of `shard` is now (cycle, entry_hash); returns re-signed votes after a dissent."""
        state = self._shards.get(shard)
        if state is None or (state.last_committed is not None and cycle <= state.last_committed[0]):
            return []
        state.last_committed = (cycle, entry_hash)
        own = state.recent.get(cycle)
        later = sorted(c for c in state.recent if c > cycle)
        for c in [c for c in state.recent if c <= cycle]:
            del state.recent[c]
        last = state.last_beat.cycle if state.last_beat is not None else None
        if last is None or last < cycle:
            return []  # this beat is not closed here yet: _vote follows the committed entry then
        if own is None or own.entry_hash == entry_hash:
            # agreed, or committed history this peer holds no own vote of (resumed after it, or voted on it
            # knowing the commit): its later entries do not follow this one, so nothing is re-chained
            return []
        state.dissents += 1
        prev = entry_hash
        votes: list[Vote] = []
        for c in later:
            e = replace(state.recent[c], prev_entry_hash=prev)
            state.recent[c] = e
            prev = e.entry_hash
            v = self._sign(e)
            if v is not None:
                votes.append(v)
        state.prev_entry_hash = prev
        return votes

    def delivered(self, vote: Vote) -> ResumePoint:
        """Record that `vote` is on the votes topic; returns the new resume point to persist."""
        point = ResumePoint.after(vote.entry)
        state = self._shards.get(vote.entry.shard)
        if state is not None and (state.resume.last_cycle is None or vote.entry.cycle >= state.resume.last_cycle):
            state.resume = point
        return point

    def open_beat(self, shard: int) -> tuple[int | None, int | None, int]:
        """(cycle, first offset, deltas so far) of a shard's open beat, for tick markers."""
        asm = self._shards[shard].assembler
        return asm.open_cycle, asm.open_first_offset, asm.open_deltas

    def hash_ahead(self, shard: int) -> None:
        """Hash what is complete of the shard's open beat's Merkle tree (`BeatAssembler.hash_ahead`)."""
        self._shards[shard].assembler.hash_ahead()

    def open_hashed(self, shard: int) -> int:
        """Receipts of the shard's open beat already hashed into its Merkle tree."""
        return self._shards[shard].assembler.open_hashed

    def last_tick_ms(self, shard: int) -> int | None:
        """T of the shard's last record in ms: the running maximum of the records' timestamps (a record
        stamped earlier does not move it back), None before the first record."""
        tick = self._shards[shard].assembler.last_tick
        return None if tick is None else tick * self.settings.tick_ms

    def last_beat(self, shard: int) -> Beat | None:
        """The beat of the shard's newest vote (for metrics)."""
        return self._shards[shard].last_beat

    def dissents(self, shard: int) -> int:
        state = self._shards.get(shard)
        return state.dissents if state is not None else 0

    def beat_end_ms(self, cycle: int) -> int:
        """Wall-clock ms at which a beat of `cycle` is over."""
        return (cycle + 1) * TICKS_PER_BEAT * self.settings.tick_ms

"""Cutting a shard's records into beats of 8 ticks, deterministically.

T(r) is a running maximum of floor(ts / tick_ms) in offset order, so every
peer that starts at a beat boundary cuts every later beat identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from knhk_stream.protocol import merkle
from knhk_stream.protocol.receipts import ReceiptMaker, receipt_tick

TICKS_PER_BEAT = 8
# `BeatAssembler.hash_ahead` hashes each complete run of this many receipts of the open beat into
# its Merkle tree, so that closing the beat then hashes fewer than this many leaves (and one node a
# level) instead of every receipt: the vote of a long beat leaves that much sooner. Runs cost some
# 10% more hashing than one tree at the close, which is why the caller hashes ahead only while it
# has time to spare (bench/README.md, "Closing a long beat"). A power of two.
ROOT_CHUNK = 128


def beat_ms(tick_ms: int) -> int:
    """How long a beat lasts."""
    return TICKS_PER_BEAT * tick_ms


def beat_end_ms(cycle: int, tick_ms: int) -> int:
    """The first millisecond after beat `cycle`: where cycle + 1 starts."""
    return (cycle + 1) * beat_ms(tick_ms)


@dataclass(frozen=True, slots=True)
class Beat:
    """A closed beat of one shard with the receipts of its deltas in offset order."""

    shard: int
    cycle: int
    first_offset: int
    last_offset: int
    receipts: tuple[bytes, ...]
    merkle_root: bytes | None = None  # the root of `receipts`, when its assembler built it as they came

    @property
    def receipt_count(self) -> int:
        return len(self.receipts)

    @property
    def ticks(self) -> tuple[int, ...]:
        """The tick of each receipt."""
        return tuple(receipt_tick(r) for r in self.receipts)

    def root(self) -> bytes:
        return self.merkle_root if self.merkle_root is not None else merkle.root(self.receipts)


@dataclass(slots=True)
class _OpenBeat:
    cycle: int
    first_offset: int
    last_offset: int
    receipts: list[bytes] = field(default_factory=list)
    tree: merkle.CompactRange | None = None  # the runs of ROOT_CHUNK receipts hashed so far

    def hash_ahead(self) -> None:
        """Every complete run of ROOT_CHUNK receipts not yet in the tree, into it."""
        receipts, tree = self.receipts, self.tree
        done = tree.leaves if tree is not None else 0
        while len(receipts) - done >= ROOT_CHUNK:
            if tree is None:
                tree = self.tree = merkle.CompactRange()
            tree.add(ROOT_CHUNK, merkle.root(receipts[done : done + ROOT_CHUNK]))
            done += ROOT_CHUNK

    def closed(self, shard: int) -> Beat:
        receipts = self.receipts
        if self.tree is None:
            root = merkle.root(receipts)
        else:
            self.hash_ahead()  # the runs completed since: the tail must be shorter than every subtree
            tree = self.tree
            tail = receipts[tree.leaves :]
            root = tree.root(merkle.root(tail) if tail else None)
        return Beat(shard, self.cycle, self.first_offset, self.last_offset, tuple(receipts), root)


class BeatAssembler:
    """Feed one shard's records in offset order; get each beat when it closes."""

    def __init__(self, shard: int, tick_ms: int, processor: ReceiptMaker) -> None:
        if tick_ms < 1:
            raise ValueError(f"tick_ms must be at least 1, got {tick_ms}")
        self.shard = shard
        self.tick_ms = tick_ms
        self.processor = processor
        self.last_tick: int | None = None  # T of the last record fed
        self._open: _OpenBeat | None = None

    @property
    def open_cycle(self) -> int | None:
        return self._open.cycle if self._open else None

    @property
    def open_deltas(self) -> int:
        return len(self._open.receipts) if self._open else 0

    @property
    def open_hashed(self) -> int:
        """Receipts of the open beat already in its Merkle tree (`hash_ahead`)."""
        tree = self._open.tree if self._open else None
        return tree.leaves if tree is not None else 0

    @property
    def open_first_offset(self) -> int | None:
        """Where a fresh assembler must start to rebuild the open beat."""
        return self._open.first_offset if self._open else None

    def feed(self, offset: int, timestamp_ms: int, marker: bool, value: bytes | None) -> Beat | None:
        """Take one record; returns the beat it closes, if it closes one that holds deltas."""
        # A negative timestamp counts as 0 (protocol "Beats"; -1 is "no timestamp").
        tick_index = timestamp_ms // self.tick_ms if timestamp_ms > 0 else 0
        last = self.last_tick
        if last is not None and tick_index < last:
            tick_index = last
        self.last_tick = tick_index
        cycle, tick = divmod(tick_index, TICKS_PER_BEAT)
        ob = self._open
        if ob is not None and cycle == ob.cycle:  # the common case: the open beat goes on
            if offset <= ob.last_offset:
                raise ValueError(f"shard {self.shard}: offset {offset} after {ob.last_offset}")
            ob.last_offset = offset
            if not marker:
                ob.receipts.append(self.processor.receipt(self.shard, cycle, tick, offset, value))
            return None
        closed: Beat | None = None
        if ob is not None:
            if offset <= ob.last_offset:
                raise ValueError(f"shard {self.shard}: offset {offset} after {ob.last_offset}")
            if ob.receipts:
                closed = ob.closed(self.shard)
        ob = self._open = _OpenBeat(cycle, offset, offset)
        if not marker:
            ob.receipts.append(self.processor.receipt(self.shard, cycle, tick, offset, value))
        return closed

    def hash_ahead(self) -> None:
        """Hash the open beat's complete runs of ROOT_CHUNK receipts now, so its close costs less
        (the root is the same either way). For a caller with time to spare: not in a backlog."""
        if self._open is not None:
            self._open.hash_ahead()

"""Restoring a shard's Redis chain from verified committed entries (the roots topic).

Used after Redis lost data (a restart without persistence, a flush, an old
backup): the chain is rebuilt from genesis by its links, and never written
over a conflicting chain. The entries given must already be verified
(quorum, epoch, hash): see `kafka.history.read_roots`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from knhk_stream.errors import LockchainError
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.store.lockchain import LockchainStore


class ConflictingChain(LockchainError):
    """Redis holds a chain that the verified entries contradict: nothing is written over it."""


@dataclass
class LinkedChain:
    entries: list[CommittedEntry]
    findings: list[str] = field(default_factory=list)


def linked_chain(entries: Iterable[CommittedEntry]) -> LinkedChain:
    """The chain from genesis by prev_entry_hash, as far as it links; forks and gaps are findings."""
    by_prev: dict[bytes, list[CommittedEntry]] = {}
    for ce in entries:
        by_prev.setdefault(ce.entry.prev_entry_hash, []).append(ce)
    out = LinkedChain([])
    h, last_cycle = ZERO_HASH, -1
    while h in by_prev:
        nxt = [ce for ce in by_prev.pop(h) if ce.entry.cycle > last_cycle]
        if not nxt:
            break
        if len({ce.entry_hash for ce in nxt}) > 1:
            cycles = ", ".join(f"cycle {ce.entry.cycle} {ce.entry_hash.hex()[:16]}…" for ce in nxt)
            out.findings.append(f"fork: two quorum-signed successors of {h.hex()[:16]}… ({cycles}); stopped before it")
            break
        ce = nxt[0]
        out.entries.append(ce)
        h, last_cycle = ce.entry_hash, ce.entry.cycle
    left = sum(len(v) for v in by_prev.values())
    if left:
        out.findings.append(f"{left} valid entr{'y' if left == 1 else 'ies'} do not link to the chain from genesis")
    return out


@dataclass
class RebuildResult:
    shard: int
    appended: int = 0
    already: int = 0
    first_cycle: int | None = None
    last_cycle: int | None = None


def rebuild_shard(
    store: LockchainStore,
    shard: int,
    chain: list[CommittedEntry],
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RebuildResult:
    """Append what Redis lacks of `chain` (verified and linked: from genesis, or from the Redis head as its
    base); ConflictingChain if Redis disagrees. Entries another writer appended meanwhile count as `already`."""
    result = RebuildResult(shard)
    head = store.head(shard)
    have = store.entry_hashes(shard, [ce.entry.cycle for ce in chain])
    for ce in chain:
        got = have.get(ce.entry.cycle)
        if got is not None and got != ce.entry_hash:
            raise ConflictingChain(
                f"shard {shard} cycle {ce.entry.cycle}: Redis holds entry {got.hex()[:16]}…, the roots topic "
                f"{ce.entry_hash.hex()[:16]}…: refusing to write over a conflicting chain (audit it first)"
            )
    on_base = bool(chain) and head is not None and head.entry_hash == chain[0].entry.prev_entry_hash
    if (head is not None and chain and not on_base and head.cycle <= chain[-1].entry.cycle
            and have.get(head.cycle) != head.entry_hash):  # fmt: skip
        raise ConflictingChain(
            f"shard {shard}: the Redis head (cycle {head.cycle}) is not an entry of the chain on the roots "
            "topic: refusing to write over a conflicting chain"
        )
    todo = [ce for ce in chain if ce.entry.cycle not in have and (head is None or ce.entry.cycle > head.cycle)]
    result.already = len(chain) - len(todo)
    if todo:
        result.first_cycle, result.last_cycle = todo[0].entry.cycle, todo[-1].entry.cycle
    for ce in todo:
        if dry_run or store.append(ce):
            result.appended += 1
        else:
            result.already += 1  # the same entry, appended meanwhile by another peer
        if progress:
            progress(1)
    return result

"""Votes (Ed25519 over `"knhk-vote/2" || epoch_hash || entry_hash`) and finding a quorum among them.

Only votes from peers of the epoch of the entry's cycle with valid signatures
count; a repeated vote counts once; a peer that signs two different successors
of one entry in one epoch equivocates, and both votes are kept as evidence.
A peer's first vote for a successor counts: votes for one shard share a
partition of the votes topic, so every observer sees the same first vote.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from enum import Enum

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.epochs import Epoch, EpochChain, default_threshold, threshold_problem  # noqa: F401
from knhk_stream.protocol.keys import (  # noqa: F401 - keys were imported from here in 0.1
    generate_key,
    key_from_seed,
    load_private_key,
    parse_public_key,
    public_key_bytes,
    save_private_key,
    sign_message,
    verify_signature,
)

VOTE_DOMAIN = b"knhk-vote/2"


def check_threshold(threshold: int, n: int) -> None:
    """floor(n/2) + 1 <= threshold <= n, or a ValueError that says what would work."""
    bad = threshold_problem(threshold, n)
    if bad:
        raise ValueError(bad)


def vote_message(epoch_hash: bytes, entry_hash: bytes) -> bytes:
    """`"knhk-vote/2" || epoch_hash || entry_hash`: a vote is bound to the epoch of its cycle."""
    return VOTE_DOMAIN + epoch_hash + entry_hash


def sign(key: Ed25519PrivateKey, epoch_hash: bytes, entry_hash: bytes) -> bytes:
    return sign_message(key, vote_message(epoch_hash, entry_hash))


def verify_vote(public_key: bytes, epoch_hash: bytes, entry_hash: bytes, signature: bytes) -> bool:
    return verify_signature(public_key, vote_message(epoch_hash, entry_hash), signature)


@dataclass(frozen=True, slots=True)
class Vote:
    """One peer's signed vote for an entry (what travels on the votes topic)."""

    entry: Entry
    peer_id: str
    signature: bytes
    voted_at_ms: int = 0
    epoch: int = 0  # number of the epoch of the entry's cycle (protocol v2)

    @property
    def entry_hash(self) -> bytes:
        return self.entry.entry_hash


@dataclass(frozen=True, slots=True)
class QuorumCheck:
    valid: bool
    signers: tuple[str, ...]
    rejected: tuple[str, ...]  # why each vote that did not count was refused
    problems: tuple[str, ...]  # rejected, and the shortfall when below the threshold


def check_quorum(
    entry_hash: bytes,
    votes: Iterable[tuple[str, bytes]],
    epoch: Epoch,
    verified: Collection[tuple[str, bytes]] = (),
) -> QuorumCheck:
    """Is `votes` a valid quorum proof for `entry_hash` in `epoch`? Says why each vote did not count.

    A peer listed several times counts once, if any one of its signatures verifies. `verified`:
    (peer id, signature) pairs the caller has verified for this entry hash in this epoch, counted
    without a second check (a peer comparing a stored quorum with its own)."""
    peers, epoch_hash = epoch.public_keys, epoch.epoch_hash
    signers: list[str] = []
    rejected: list[str] = []
    for i, (peer_id, signature) in enumerate(votes):
        where = f"votes[{i}] ({peer_id!r})"
        if peer_id in signers:
            rejected.append(f"{where}: repeated peer; a vote counts once")
        elif peer_id not in peers:
            rejected.append(f"{where}: not a peer of epoch {epoch.number} (its peers: {', '.join(sorted(peers))})")
        elif (peer_id, signature) not in verified and not verify_vote(
            peers[peer_id], epoch_hash, entry_hash, signature
        ):
            rejected.append(
                f"{where}: bad signature, it does not verify for entry hash {entry_hash.hex()} in epoch {epoch.number}"
            )
        else:
            signers.append(peer_id)
    problems = list(rejected)
    if len(signers) < epoch.threshold:
        problems.append(f"{len(signers)} valid votes, threshold {epoch.threshold} (epoch {epoch.number})")
    return QuorumCheck(len(signers) >= epoch.threshold, tuple(signers), tuple(rejected), tuple(problems))


def backdated_problem(
    chain: EpochChain, cycle: int, entry_hash: bytes, votes: Iterable[tuple[str, bytes]]
) -> str | None:
    """When an entry fails under the epoch of its cycle but holds a quorum of the epoch before:
    that epoch was signed after the fact with an earlier from_cycle (protocol "Epochs")."""
    epoch = chain.for_cycle(cycle)
    prev = chain.by_number(epoch.number - 1)
    if prev is None or not check_quorum(entry_hash, list(votes), prev).valid:
        return None
    return (
        f"epoch {epoch.number} is backdated: it starts at cycle {epoch.from_cycle}, but this entry of cycle "
        f"{cycle} was committed by a quorum of epoch {prev.number}; the epoch was signed after the fact"
    )


class VoteStatus(Enum):
    COUNTED = "counted"
    QUORUM = "quorum"  # this vote brought its entry hash to the threshold
    REPEATED = "repeated"
    UNKNOWN_PEER = "unknown_peer"
    BAD_SIGNATURE = "bad_signature"
    WRONG_EPOCH = "wrong_epoch"  # the record names another epoch than the one of its cycle
    EQUIVOCATION = "equivocation"
    UNLINKED = "unlinked"  # follows neither the committed head nor a held vote of an earlier cycle: dropped
    OUT_OF_WINDOW = "out_of_window"  # more than WINDOW cycles ahead: dropped
    OVER_SHARE = "over_share"  # the peer already has MAX_HELD_PER_PEER votes held on the shard: dropped
    # its entry hash already holds a quorum here: kept unverified and uncounted (checked only should the
    # peer later sign another successor of the same entry, so that equivocation is still caught)
    BEYOND_QUORUM = "beyond_quorum"


WINDOW = 64  # a vote is kept only while its cycle is at most this far ahead (protocol "Votes and quorum")
# Votes held per peer and shard: an honest peer holds one vote per beat within the window, and
# as many again re-signed after a dissent; more is what nobody honest sends, and is dropped.
MAX_HELD_PER_PEER = 4 * WINDOW
MAX_EVIDENCE_PER_ROUND = 4  # equivocation records kept per (peer, shard, prev_entry_hash, epoch)
MAX_EQUIVOCATIONS = 1024  # equivocation records kept in all (the oldest go first)


def in_window(cycle: int, horizon: int | None) -> bool:
    """Whether a vote for `cycle` may be kept: at most WINDOW cycles after the horizon (the larger of
    the committed head's cycle and the newest record's cycle read on the shard; None: no bound yet)."""
    return horizon is None or cycle <= horizon + WINDOW


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Two different successors of one entry signed by one peer in one epoch."""

    peer_id: str
    shard: int
    prev_entry_hash: bytes
    epoch: int
    first: Vote
    second: Vote

    @property
    def cycle(self) -> int:
        return self.second.entry.cycle


@dataclass(slots=True)
class _Successors:
    """The votes for successors of one entry (one shard, one prev_entry_hash, one epoch)."""

    by_peer: dict[str, Vote] = field(default_factory=dict)  # each peer's first valid vote
    by_hash: dict[bytes, dict[str, Vote]] = field(default_factory=dict)
    evidence: dict[str, set[bytes]] = field(default_factory=dict)  # peer -> second entry hashes recorded
    beyond: dict[str, Vote] = field(default_factory=dict)  # peer -> its first vote after a quorum, unverified


class QuorumCollector:
    """Votes indexed by the entry they follow, so finding the next commit costs O(votes for it).

    A peer's vote counts once per (shard, prev_entry_hash, epoch); a second valid
    vote of that peer for a different successor is equivocation. Votes that
    cannot link (to the head, or to a held vote of an earlier cycle: cycles
    strictly increase along a chain), lie beyond the window, or exceed a peer's
    share (`MAX_HELD_PER_PEER` per shard) are dropped, and equivocation records
    are bounded too, so memory is bounded whatever others send.
    """

    def __init__(self, epoch_for: Callable[[int], Epoch]) -> None:
        self.epoch_for = epoch_for
        # shard -> prev_entry_hash -> epoch -> its successors' votes (by shard: a prune walks one shard's rounds)
        self._rounds: dict[int, dict[bytes, dict[int, _Successors]]] = {}
        self._held: dict[int, dict[bytes, Vote]] = {}  # shard -> entry hash -> one vote for it
        self._per_peer: dict[tuple[int, str], int] = {}  # (shard, peer) -> votes of it held
        self.equivocations: list[Equivocation] = []  # the newest MAX_EQUIVOCATIONS records
        self._new_evidence: list[Equivocation] = []

    def add(self, vote: Vote, head_hash: bytes, horizon: int | None, verified: bool = False) -> VoteStatus:
        """Take a vote. `head_hash` is the shard's committed head (zeros before genesis);
        `horizon` the larger of the head's cycle and the newest record's cycle read on the shard.
        `verified`: the caller knows the signature is good (this peer's own vote, read back byte for
        byte as it was signed here), so it is not checked again.

        Signatures are checked only while they can matter: a vote for an entry hash that already
        holds a quorum is kept aside unverified (BEYOND_QUORUM), and verified only if its peer later
        signs another successor of the same entry (then it is that peer's first vote, as before)."""
        e = vote.entry
        epoch = self.epoch_for(e.cycle)
        pub = epoch.public_keys.get(vote.peer_id)
        if pub is None:
            return VoteStatus.UNKNOWN_PEER
        if vote.epoch != epoch.number:
            return VoteStatus.WRONG_EPOCH
        if not in_window(e.cycle, horizon):
            return VoteStatus.OUT_OF_WINDOW
        held = self._held.setdefault(e.shard, {})
        if e.prev_entry_hash != head_hash:
            before = held.get(e.prev_entry_hash)
            if before is None or e.cycle <= before.entry.cycle:
                return VoteStatus.UNLINKED  # no held predecessor, or not after it
        rounds = self._rounds.get(e.shard, {}).get(e.prev_entry_hash)
        succ = rounds.get(epoch.number) if rounds is not None else None
        first = succ.by_peer.get(vote.peer_id) if succ is not None else None
        entry_hash = vote.entry_hash
        if first is None and succ is not None and succ.beyond:
            aside = succ.beyond.get(vote.peer_id)
            if aside is not None:
                if aside.entry_hash == entry_hash:
                    return VoteStatus.REPEATED
                del succ.beyond[vote.peer_id]  # another successor: the vote kept aside is checked now
                if verify_vote(pub, epoch.epoch_hash, aside.entry_hash, aside.signature):
                    succ.by_peer[vote.peer_id] = first = aside
                    succ.by_hash[aside.entry_hash][vote.peer_id] = aside
                    self._per_peer[(e.shard, vote.peer_id)] = self._per_peer.get((e.shard, vote.peer_id), 0) + 1
        if first is not None and first.entry_hash == entry_hash:
            return VoteStatus.REPEATED
        if first is not None and entry_hash in succ.evidence.get(vote.peer_id, ()):
            return VoteStatus.EQUIVOCATION  # seen before: recorded once
        share = (e.shard, vote.peer_id)
        if first is None and self._per_peer.get(share, 0) >= MAX_HELD_PER_PEER:
            return VoteStatus.OVER_SHARE
        if first is None and succ is not None and len(succ.by_hash.get(entry_hash, ())) >= epoch.threshold:
            succ.beyond[vote.peer_id] = vote  # one a peer and round: bounded like the rounds themselves
            return VoteStatus.BEYOND_QUORUM
        if not verified and not verify_vote(pub, epoch.epoch_hash, entry_hash, vote.signature):
            return VoteStatus.BAD_SIGNATURE
        if first is not None:
            recorded = succ.evidence.setdefault(vote.peer_id, set())
            if len(recorded) < MAX_EVIDENCE_PER_ROUND:
                recorded.add(entry_hash)
                ev = Equivocation(vote.peer_id, e.shard, e.prev_entry_hash, epoch.number, first, vote)
                self.equivocations.append(ev)
                if len(self.equivocations) > MAX_EQUIVOCATIONS:
                    del self.equivocations[: len(self.equivocations) - MAX_EQUIVOCATIONS]
                self._new_evidence.append(ev)
                del self._new_evidence[:-MAX_EQUIVOCATIONS]
            return VoteStatus.EQUIVOCATION
        if succ is None:
            by_prev = self._rounds.setdefault(e.shard, {})
            succ = by_prev.setdefault(e.prev_entry_hash, {})[epoch.number] = _Successors()
        succ.by_peer[vote.peer_id] = vote
        voters = succ.by_hash.setdefault(entry_hash, {})
        voters[vote.peer_id] = vote
        held.setdefault(entry_hash, vote)
        self._per_peer[share] = self._per_peer.get(share, 0) + 1
        return VoteStatus.QUORUM if len(voters) == epoch.threshold else VoteStatus.COUNTED

    def take_equivocations(self) -> list[Equivocation]:
        """The equivocation records found since the last call (each is reported once)."""
        out, self._new_evidence = self._new_evidence, []
        return out

    def held_votes(self, shard: int | None = None) -> int:
        """How many votes are held (for one shard, or in all): what bounds this collector's memory."""
        return sum(n for (s, _), n in self._per_peer.items() if shard is None or s == shard)

    def held_by(self, shard: int, peer_id: str) -> int:
        """How many votes of one peer are held on a shard (its share is MAX_HELD_PER_PEER)."""
        return self._per_peer.get((shard, peer_id), 0)

    def successors(self, shard: int, prev_entry_hash: bytes) -> dict[bytes, dict[str, Vote]]:
        """Counted votes for successors of `prev_entry_hash`, by entry hash (all epochs)."""
        out: dict[bytes, dict[str, Vote]] = {}
        for succ in self._rounds.get(shard, {}).get(prev_entry_hash, {}).values():
            for h, voters in succ.by_hash.items():
                out.setdefault(h, {}).update(voters)
        return out

    def quorum_after(
        self, shard: int, prev_entry_hash: bytes, after_cycle: int | None
    ) -> tuple[Entry, list[Vote]] | None:
        """A successor of `prev_entry_hash` with a quorum of its epoch, and those votes."""
        for voters in self.successors(shard, prev_entry_hash).values():
            some = next(iter(voters.values()))
            if after_cycle is not None and some.entry.cycle <= after_cycle:
                continue
            epoch = self.epoch_for(some.entry.cycle)
            if len(voters) >= epoch.threshold:
                return some.entry, sorted(voters.values(), key=lambda v: v.peer_id)
        return None

    def stuck_after(self, shard: int, prev_entry_hash: bytes) -> int | None:
        """The cycle at which no successor of `prev_entry_hash` can still reach its threshold, if so."""
        succ = self.successors(shard, prev_entry_hash)
        if not succ:
            return None
        cycle = min(next(iter(v.values())).entry.cycle for v in succ.values())
        epoch = self.epoch_for(cycle)
        voted = {p for voters in succ.values() for p in voters}
        missing = len(epoch.peers) - len(voted & set(epoch.public_keys))
        if all(len(v) + missing < epoch.threshold for v in succ.values()):
            return cycle
        return None

    def prune(self, shard: int, head_cycle: int, head_hash: bytes) -> None:
        """Keep only votes after the head that link to it through held votes (work: this shard's rounds)."""
        by_prev = self._rounds.get(shard, {})
        reachable = {head_hash}
        frontier = [head_hash]
        keep: dict[bytes, dict[int, _Successors]] = {}  # the rounds kept, by prev_entry_hash
        while frontier:
            h = frontier.pop()
            rounds = by_prev.get(h)
            if rounds is None:
                continue
            keep[h] = rounds
            for succ in rounds.values():
                for entry_hash, voters in succ.by_hash.items():
                    if entry_hash not in reachable and next(iter(voters.values())).entry.cycle > head_cycle:
                        reachable.add(entry_hash)
                        frontier.append(entry_hash)
        if keep:
            self._rounds[shard] = keep
        else:
            self._rounds.pop(shard, None)
        held = self._held.get(shard, {})
        for h in [h for h in held if h not in reachable]:
            del held[h]
        for key in [k for k in self._per_peer if k[0] == shard]:
            del self._per_peer[key]
        for rounds in keep.values():
            for succ in rounds.values():
                for peer in succ.by_peer:
                    self._per_peer[(shard, peer)] = self._per_peer.get((shard, peer), 0) + 1

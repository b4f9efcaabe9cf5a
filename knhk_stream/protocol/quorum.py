"""Ed25519 votes over entry hashes, and finding a quorum among them.

Only votes from known peers with valid signatures count; a repeated vote
counts once; a peer that signs two entry hashes for one (shard, cycle)
equivocates, and both votes are kept as evidence. Only a peer's first vote
for a (shard, cycle) counts: votes for one key share a partition of the
votes topic, so every observer sees the same first vote.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from knhk_stream.protocol.entry import Entry

VOTE_DOMAIN = b"knhk-vote/1"


def default_threshold(n: int) -> int:
    """floor(2n/3) + 1."""
    return 2 * n // 3 + 1


def check_threshold(threshold: int, n: int) -> None:
    """floor(n/2) + 1 <= threshold <= n, or a ValueError that says what would work."""
    low = n // 2 + 1
    if not low <= threshold <= n:
        raise ValueError(
            f"threshold {threshold} is not valid for {n} peers: it must be from {low} to {n} "
            f"(the default for {n} peers is {default_threshold(n)})"
        )


# -- keys ---------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def save_private_key(key: Ed25519PrivateKey, path: str | Path, overwrite: bool = False) -> None:
    """PKCS#8 PEM, created with mode 0600 (never briefly world-readable)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode on open: fix it before writing
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """A PKCS#8 PEM Ed25519 key, or a file holding the 32-byte seed as hex."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: cannot read the PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    try:
        seed = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: neither a PEM private key nor a hex seed") from None
    if len(seed) != 32:
        raise ValueError(f"{path}: an Ed25519 seed is 32 bytes, got {len(seed)}")
    return key_from_seed(seed)


def parse_public_key(hex_text: str) -> bytes:
    """32 raw bytes of an Ed25519 public key from hex, checked to be a valid point."""
    try:
        raw = bytes.fromhex(hex_text)
    except (ValueError, TypeError):
        raise ValueError(f"public_key {hex_text!r} is not hex") from None
    if len(raw) != 32:
        raise ValueError(f"public_key must be 32 bytes (64 hex digits), got {len(raw)} bytes")
    if not _is_curve_point(raw):
        raise ValueError(f"public_key {hex_text} is not a point on the Ed25519 curve")
    return raw


_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P


def _is_curve_point(raw: bytes) -> bool:
    """RFC 8032 5.1.3 decoding: y < p and x^2 = (y^2 - 1) / (d y^2 + 1) has a root."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P:
        return False
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x2 = u * pow(v, _P - 2, _P) % _P
    if x2 == 0:
        return not raw[31] >> 7  # x = 0 must not be negative
    return pow(x2, (_P - 1) // 2, _P) == 1


# -- votes --------------------------------------------------------------------------------


def vote_message(entry_hash: bytes) -> bytes:
    return VOTE_DOMAIN + entry_hash


def sign(key: Ed25519PrivateKey, entry_hash: bytes) -> bytes:
    return key.sign(vote_message(entry_hash))


def verify_signature(public_key: bytes, entry_hash: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, vote_message(entry_hash))
        return True
    except (InvalidSignature, ValueError):
        return False


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
    peers: Mapping[str, bytes],
    threshold: int,
) -> QuorumCheck:
    """Is `votes` a valid quorum proof for `entry_hash`? Says why each vote did not count."""
    signers: list[str] = []
    rejected: list[str] = []
    for i, (peer_id, signature) in enumerate(votes):
        where = f"votes[{i}] ({peer_id!r})"
        if peer_id in signers:
            rejected.append(f"{where}: repeated peer; a vote counts once")
        elif peer_id not in peers:
            rejected.append(f"{where}: unknown peer (known: {', '.join(sorted(peers))})")
        elif not verify_signature(peers[peer_id], entry_hash, signature):
            rejected.append(f"{where}: bad signature, it does not verify for entry hash {entry_hash.hex()}")
        else:
            signers.append(peer_id)
    problems = list(rejected)
    if len(signers) < threshold:
        problems.append(f"{len(signers)} valid votes, threshold {threshold}")
    return QuorumCheck(len(signers) >= threshold, tuple(signers), tuple(rejected), tuple(problems))


class VoteStatus(Enum):
    COUNTED = "counted"
    QUORUM = "quorum"  # this vote brought its entry hash to the threshold
    REPEATED = "repeated"
    UNKNOWN_PEER = "unknown_peer"
    BAD_SIGNATURE = "bad_signature"
    EQUIVOCATION = "equivocation"


@dataclass(frozen=True, slots=True)
class Equivocation:
    peer_id: str
    shard: int
    cycle: int
    first: Vote
    second: Vote


@dataclass(slots=True)
class _Round:
    """All counted votes for one (shard, cycle)."""

    by_hash: dict[bytes, dict[str, Vote]] = field(default_factory=dict)
    first_vote: dict[str, Vote] = field(default_factory=dict)


class QuorumCollector:
    """Collects votes per (shard, cycle) and says when an entry hash reaches the threshold."""

    def __init__(self, peers: Mapping[str, bytes], threshold: int) -> None:
        check_threshold(threshold, len(peers))
        self.peers = dict(peers)
        self.threshold = threshold
        self._rounds: dict[tuple[int, int], _Round] = {}
        self.equivocations: list[Equivocation] = []

    def add(self, vote: Vote) -> VoteStatus:
        key = vote.peer_id
        pub = self.peers.get(key)
        if pub is None:
            return VoteStatus.UNKNOWN_PEER
        entry_hash = vote.entry_hash
        round_key = (vote.entry.shard, vote.entry.cycle)
        rnd = self._rounds.get(round_key)
        first = rnd.first_vote.get(key) if rnd is not None else None
        if first is not None and first.entry_hash == entry_hash and first.signature == vote.signature:
            return VoteStatus.REPEATED
        if not verify_signature(pub, entry_hash, vote.signature):
            return VoteStatus.BAD_SIGNATURE
        if rnd is None:
            rnd = self._rounds[round_key] = _Round()
        if first is not None:
            if first.entry_hash == entry_hash:
                return VoteStatus.REPEATED  # same entry, another valid signature
            if not any(e.peer_id == key and e.second.entry_hash == entry_hash for e in self.equivocations):
                self.equivocations.append(Equivocation(key, vote.entry.shard, vote.entry.cycle, first, vote))
            return VoteStatus.EQUIVOCATION
        rnd.first_vote[key] = vote
        voters = rnd.by_hash.setdefault(entry_hash, {})
        voters[key] = vote
        return VoteStatus.QUORUM if len(voters) == self.threshold else VoteStatus.COUNTED

    def quorum(self, shard: int, cycle: int) -> tuple[Entry, list[Vote]] | None:
        """The entry of (shard, cycle) with at least threshold votes, and those votes."""
        rnd = self._rounds.get((shard, cycle))
        if rnd is None:
            return None
        for voters in rnd.by_hash.values():
            if len(voters) >= self.threshold:
                votes = sorted(voters.values(), key=lambda v: v.peer_id)
                return votes[0].entry, votes
        return None

    def votes(self, shard: int, cycle: int) -> dict[bytes, dict[str, Vote]]:
        """Counted votes of (shard, cycle) by entry hash (for status and dissent)."""
        rnd = self._rounds.get((shard, cycle))
        return {h: dict(v) for h, v in rnd.by_hash.items()} if rnd else {}

    def stuck(self, shard: int, cycle: int) -> bool:
        """True when no entry hash of this round can still reach the threshold."""
        rnd = self._rounds.get((shard, cycle))
        if rnd is None:
            return False
        missing = len(self.peers) - len(rnd.first_vote)
        return all(len(v) + missing < self.threshold for v in rnd.by_hash.values())

    def forget_until(self, shard: int, cycle: int) -> None:
        """Drop rounds of `shard` up to and including `cycle` (committed history)."""
        for key in [k for k in self._rounds if k[0] == shard and k[1] <= cycle]:
            del self._rounds[key]

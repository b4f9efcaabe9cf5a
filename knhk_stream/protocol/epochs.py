"""Epochs: numbered periods of a chain with one peer set, threshold, hook and max_triples.

An epoch after 0 is believed only through a valid chain of statements back to
epoch 0 (protocol section "Epochs"): well-formed whoever signed it, linked by
`prev_epoch_hash`, later `from_cycle`, and signed by the old quorum, the new
quorum and every new key. Everything here is a pure function of its input;
hostile input gives problems (strings), never an exception.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from knhk_stream.errors import EpochError
from knhk_stream.protocol.encoding import ZERO_HASH, H, str16, u16, u32, u64
from knhk_stream.protocol.keys import key_problem, sign_message, verify_signature

EPOCH_DOMAIN = b"knhk-epoch/2"
MAX_PEERS = 65535
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
EPOCH_FIELDS = (
    "chain_id",
    "tick_ms",
    "epoch",
    "from_cycle",
    "threshold",
    "hook",
    "max_triples",
    "peers",
    "prev_epoch_hash",
    "epoch_hash",
    "signatures",
)


def default_threshold(n: int) -> int:
    """floor(2n/3) + 1."""
    return 2 * n // 3 + 1


def threshold_problem(threshold: int, n: int) -> str | None:
    """floor(n/2) + 1 <= threshold <= n, or what would work."""
    low = n // 2 + 1
    if type(threshold) is int and low <= threshold <= n:
        return None
    return (
        f"threshold {threshold} is not valid for {n} peers: it must be from {low} to {n} "
        f"(the default for {n} peers is {default_threshold(n)})"
    )


@dataclass(frozen=True)
class Peer:
    id: str
    public_key: bytes


@dataclass(frozen=True)
class Epoch:
    """One epoch statement: its fields, and the signatures collected over its hash."""

    chain_id: str
    tick_ms: int
    number: int
    from_cycle: int
    threshold: int
    hook: str
    max_triples: int
    peers: tuple[Peer, ...]
    prev_epoch_hash: bytes = ZERO_HASH
    signatures: tuple[tuple[str, bytes], ...] = ()
    hook_entrypoint: str | None = field(default=None, compare=False)  # local: how to load the hook; not hashed

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.peers, key=lambda p: p.id.encode("utf-8", "surrogatepass")))
        object.__setattr__(self, "peers", ordered)

    @cached_property
    def public_keys(self) -> dict[str, bytes]:
        return {p.id: p.public_key for p in self.peers}

    @cached_property
    def epoch_hash(self) -> bytes:
        """H(0x03 || str chain_id || u32 tick_ms || u32 e || u64 from_cycle || u16 threshold || str hook
        || u32 max_triples || u16 n || (str id || [32] key)* || [32] prev_epoch_hash); raises on out-of-range
        fields, so call `problems()` first on untrusted input."""
        parts = [
            b"\x03",
            str16(self.chain_id),
            u32(self.tick_ms),
            u32(self.number),
            u64(self.from_cycle),
            u16(self.threshold),
            str16(self.hook),
            u32(self.max_triples),
            u16(len(self.peers)),
        ]
        for p in self.peers:
            parts += [str16(p.id), p.public_key]
        parts.append(self.prev_epoch_hash)
        return H(b"".join(parts))

    @property
    def message(self) -> bytes:
        """What every signer of this statement signs."""
        return EPOCH_DOMAIN + self.epoch_hash

    def signed_by(self, peer_id: str, key: Ed25519PrivateKey) -> Epoch:
        """This statement with `peer_id`'s signature added (replacing an earlier one of that peer)."""
        sig = sign_message(key, self.message)
        rest = tuple(s for s in self.signatures if s[0] != peer_id)
        return replace(self, signatures=tuple(sorted((*rest, (peer_id, sig)), key=lambda s: s[0].encode())))

    def problems(self) -> list[str]:
        """Why this epoch is not well-formed, whoever signed it (empty: well-formed)."""
        out: list[str] = []
        n = len(self.peers)
        if not 1 <= n <= MAX_PEERS:
            out.append(f"it must list 1 to {MAX_PEERS} peers, it lists {n}")
        for name, value, top in (("epoch", self.number, U32_MAX), ("from_cycle", self.from_cycle, U64_MAX)):
            if type(value) is not int or not 0 <= value <= top:
                out.append(f"{name} {value!r} is out of range 0..{top}")
        if type(self.tick_ms) is not int or not 1 <= self.tick_ms <= 65535:
            out.append(f"tick_ms {self.tick_ms!r} is out of range 1..65535")
        if not isinstance(self.chain_id, str) or not 1 <= len(_utf8(self.chain_id)) <= 64:
            out.append("chain_id must be 1 to 64 bytes of UTF-8")
        ids: set[str] = set()
        keys: set[bytes] = set()
        for p in self.peers:
            if not isinstance(p.id, str) or not 1 <= len(_utf8(p.id)) <= 64:
                out.append(f"peer id {p.id!r} must be 1 to 64 bytes of UTF-8")
            elif p.id in ids:
                out.append(f"peer id {p.id!r} is listed twice")
            ids.add(p.id)
            bad = key_problem(p.public_key)
            if bad:
                out.append(f"peer {p.id!r}: {bad}")
            elif p.public_key in keys:
                out.append(f"peer {p.id!r} reuses the public key of another peer")
            keys.add(p.public_key)
        if n:
            bad = threshold_problem(self.threshold, n)
            if bad:
                out.append(bad)
        if not isinstance(self.hook, str) or not self.hook or len(_utf8(self.hook)) > 65535:
            out.append("hook must be a non-empty string such as canonical@1")
        if type(self.max_triples) is not int or not 1 <= self.max_triples <= U32_MAX:
            out.append(f"max_triples {self.max_triples!r} must be from 1 to {U32_MAX}")
        if not isinstance(self.prev_epoch_hash, bytes) or len(self.prev_epoch_hash) != 32:
            out.append("prev_epoch_hash must be 32 bytes")
        return out

    # -- JSON (statement files, Redis, settings tables) ------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "tick_ms": self.tick_ms,
            "epoch": self.number,
            "from_cycle": self.from_cycle,
            "threshold": self.threshold,
            "hook": self.hook,
            "max_triples": self.max_triples,
            "peers": [{"id": p.id, "public_key": p.public_key.hex()} for p in self.peers],
            "prev_epoch_hash": self.prev_epoch_hash.hex(),
            "epoch_hash": self.epoch_hash.hex(),
            "signatures": [{"peer_id": p, "signature": s.hex()} for p, s in self.signatures],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, data: Any, chain_id: str | None = None, tick_ms: int | None = None) -> Epoch:
        """Parse a statement; EpochError naming the field on anything malformed.

        `epoch_hash`, when present, must match the fields. `chain_id`/`tick_ms` fill
        in what a settings table may leave out."""
        if not isinstance(data, Mapping):
            raise EpochError("an epoch statement must be a JSON object")
        if _has_lone_surrogate(data):
            raise EpochError("a string of the statement holds a lone surrogate: it is not UTF-8")
        known = {*EPOCH_FIELDS, "hook_entrypoint"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EpochError(f"unknown field(s) {', '.join(unknown)}; known ones are {', '.join(EPOCH_FIELDS)}")

        def get(name: str, kind: type, default: Any = None) -> Any:
            v = data.get(name, default)
            if v is None or (kind is int and (type(v) is not int)) or not isinstance(v, kind):
                raise EpochError(f"{name} must be {'an integer' if kind is int else 'a ' + kind.__name__}, got {v!r}")
            return v

        def hexbytes(name: str, v: Any, size: int) -> bytes:
            try:
                b = bytes.fromhex(v) if isinstance(v, str) else None
            except ValueError:
                b = None
            if b is None or len(b) != size or v != v.lower():
                raise EpochError(f"{name} must be {size} bytes as lowercase hex, got {v!r}")
            return b

        raw_peers = data.get("peers")
        if not isinstance(raw_peers, list):
            raise EpochError("peers must be a list of {id, public_key}")
        peers = []
        for i, p in enumerate(raw_peers):
            if not isinstance(p, Mapping) or set(p) - {"id", "public_key"} or not isinstance(p.get("id"), str):
                raise EpochError(f"peers[{i}] must be an object with id and public_key (and nothing else)")
            peers.append(Peer(p["id"], hexbytes(f"peers[{i}].public_key", p.get("public_key"), 32)))
        raw_sigs = data.get("signatures", [])
        if not isinstance(raw_sigs, list):
            raise EpochError("signatures must be a list of {peer_id, signature}")
        sigs = []
        for i, s in enumerate(raw_sigs):
            if not isinstance(s, Mapping) or not isinstance(s.get("peer_id"), str):
                raise EpochError(f"signatures[{i}] must be an object with peer_id and signature")
            sigs.append((s["peer_id"], hexbytes(f"signatures[{i}].signature", s.get("signature"), 64)))
        entrypoint = data.get("hook_entrypoint")
        if entrypoint is not None and not isinstance(entrypoint, str):
            raise EpochError("hook_entrypoint must be a string 'module:function'")
        e = cls(
            get("chain_id", str, chain_id),
            get("tick_ms", int, tick_ms),
            get("epoch", int),
            get("from_cycle", int),
            get("threshold", int),
            get("hook", str),
            get("max_triples", int),
            tuple(peers),
            hexbytes("prev_epoch_hash", data.get("prev_epoch_hash"), 32),
            tuple(sigs),
            entrypoint,
        )
        bad = e.problems()
        if bad:
            raise EpochError(f"epoch {e.number} is not well-formed: {'; '.join(bad)}")
        if "epoch_hash" in data and hexbytes("epoch_hash", data["epoch_hash"], 32) != e.epoch_hash:
            raise EpochError(
                f"epoch_hash {data['epoch_hash']} does not match the fields (they hash to {e.epoch_hash.hex()}): "
                "the statement was changed after it was proposed"
            )
        return e


def parse_epochs(raw: Any, chain_id: str, tick_ms: int) -> list[Epoch]:
    """A list of statements (a bundle's `epochs`, a settings file's `[[epochs]]`); EpochError naming the index."""
    if not isinstance(raw, list):
        raise EpochError("epochs must be a list of epoch statements", "epochs")
    out = []
    for i, item in enumerate(raw):
        try:
            e = Epoch.from_json(item, chain_id, tick_ms)
        except EpochError as err:
            raise EpochError(str(err), f"epochs[{i}]") from None
        if e.chain_id != chain_id or e.tick_ms != tick_ms:
            raise EpochError("chain_id and tick_ms never change between epochs", f"epochs[{i}]")
        out.append(e)
    return out


def _has_lone_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(v, Mapping):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(x) for k, x in v.items())
    if isinstance(v, list):
        return any(_has_lone_surrogate(x) for x in v)
    return False


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def signers(epoch: Epoch, keys: Mapping[str, bytes]) -> set[str]:
    """Peers of `keys` whose signature on `epoch` verifies with their key in `keys`."""
    message = epoch.message
    return {p for p, sig in epoch.signatures if p in keys and verify_signature(keys[p], message, sig)}


def transition_problems(prev: Epoch, nxt: Epoch) -> list[str]:
    """Why `nxt` is not a valid successor of the (valid) epoch `prev`; empty when it is."""
    out = [f"not well-formed: {p}" for p in nxt.problems()]
    if out:
        return out
    if nxt.chain_id != prev.chain_id or nxt.tick_ms != prev.tick_ms:
        out.append("chain_id and tick_ms never change between epochs")
    if nxt.number != prev.number + 1:
        out.append(f"it is numbered {nxt.number}, the next epoch after {prev.number} is {prev.number + 1}")
    if nxt.prev_epoch_hash != prev.epoch_hash:
        out.append(
            f"prev_epoch_hash {nxt.prev_epoch_hash.hex()[:16]}… is not the hash of epoch {prev.number} "
            f"({prev.epoch_hash.hex()[:16]}…)"
        )
    if nxt.from_cycle <= prev.from_cycle:
        out.append(f"from_cycle {nxt.from_cycle} must be greater than epoch {prev.number}'s ({prev.from_cycle})")
    old = signers(nxt, prev.public_keys)
    new = signers(nxt, nxt.public_keys)
    if len(old) < prev.threshold:
        out.append(
            f"signed by {len(old)} peer(s) of epoch {prev.number} with their epoch-{prev.number} keys "
            f"({', '.join(sorted(old)) or 'none'}), its threshold is {prev.threshold}"
        )
    if len(new) < nxt.threshold:
        out.append(
            f"signed by {len(new)} peer(s) of epoch {nxt.number} with their new keys "
            f"({', '.join(sorted(new)) or 'none'}), its threshold is {nxt.threshold}"
        )
    old_keys = set(prev.public_keys.values())
    unproven = sorted(p.id for p in nxt.peers if p.public_key not in old_keys and p.id not in new)
    if unproven:
        out.append(f"new key(s) not shown to be held: {', '.join(unproven)} must sign the statement")
    return out


@dataclass(frozen=True)
class EpochFork:
    number: int
    hashes: tuple[bytes, bytes]
    peers: tuple[str, ...]  # signed both
    from_cycle: int  # every cycle from here on fails


@dataclass
class EpochChain:
    """The epochs of a chain accepted from epoch 0, and what was refused on the way."""

    epochs: list[Epoch]
    refused: list[tuple[Epoch, list[str]]] = field(default_factory=list)
    forks: list[EpochFork] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._starts = [e.from_cycle for e in self.epochs]

    @property
    def genesis(self) -> Epoch:
        return self.epochs[0]

    @property
    def newest(self) -> Epoch:
        return self.epochs[-1]

    def for_cycle(self, cycle: int) -> Epoch:
        """The valid epoch with the largest from_cycle <= cycle."""
        return self.epochs[bisect.bisect_right(self._starts, cycle) - 1]

    def by_number(self, number: int) -> Epoch | None:
        return self.epochs[number] if 0 <= number < len(self.epochs) else None

    def forked_from(self) -> int | None:
        """The first cycle that no verification may pass because of an epoch fork."""
        return min((f.from_cycle for f in self.forks), default=None)

    def problem_for_cycle(self, cycle: int) -> str | None:
        start = self.forked_from()
        if start is not None and cycle >= start:
            f = next(f for f in self.forks if f.from_cycle == start)
            return (
                f"epoch {f.number} is forked (two valid statements, signed by both: {', '.join(f.peers)}); "
                f"every cycle from {start} on fails"
            )
        return None


def build_chain(genesis: Epoch, candidates: Iterable[Epoch]) -> EpochChain:
    """Accept candidates number by number from `genesis`, each only through the one before it.

    Two different valid statements for one number are a fork: reported, and the
    chain stops before that number."""
    by_number: dict[int, list[Epoch]] = {}
    for c in candidates:
        if c.number == genesis.number and c.epoch_hash == genesis.epoch_hash:
            continue
        if all(c.epoch_hash != o.epoch_hash for o in by_number.get(c.number, [])):
            by_number.setdefault(c.number, []).append(c)
    chain = EpochChain([genesis])
    refused: list[tuple[Epoch, list[str]]] = []
    forks: list[EpochFork] = []
    number = genesis.number + 1
    while number in by_number:
        prev = chain.epochs[-1]
        valid = []
        for c in by_number.pop(number):
            bad = transition_problems(prev, c)
            (refused.append((c, bad)) if bad else valid.append(c))
        if not valid:
            break
        if len(valid) > 1:
            a, b = valid[0], valid[1]
            both = sorted({p for p, _ in a.signatures} & {p for p, _ in b.signatures})
            forks.append(EpochFork(number, (a.epoch_hash, b.epoch_hash), tuple(both), min(a.from_cycle, b.from_cycle)))
            break
        chain.epochs.append(valid[0])
        number += 1
    for rest in by_number.values():
        refused += [(c, ["does not follow a valid epoch"]) for c in rest]
    return EpochChain(chain.epochs, refused, forks)


def genesis_epoch(
    chain_id: str, tick_ms: int, threshold: int, hook: str, max_triples: int, peers: Sequence[Peer]
) -> Epoch:
    return Epoch(chain_id, tick_ms, 0, 0, threshold, hook, max_triples, tuple(peers))

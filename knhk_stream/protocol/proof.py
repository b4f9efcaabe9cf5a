"""Proof bundles: one delta's way from its record bytes to a quorum-signed entry.

A bundle is a self-contained JSON object an auditor can check offline with
nothing but the chain settings: record -> delta_hash -> receipt -> audit path
-> root -> entry hash -> quorum signatures. This module is pure: it imports
no Kafka and no Redis, so a verifier can run anywhere.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from knhk_stream.errors import EpochError
from knhk_stream.protocol import PROTOCOL, merkle
from knhk_stream.protocol.beats import TICKS_PER_BEAT
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import H
from knhk_stream.protocol.entry import ENTRY_FIELDS, ENTRY_INT_FIELDS, Entry
from knhk_stream.protocol.epochs import U32_MAX, U64_MAX, Epoch, parse_epochs
from knhk_stream.protocol.quorum import backdated_problem, check_quorum
from knhk_stream.protocol.receipts import (
    A_HASH_BYTES,
    APPLIED,
    RECEIPT_SIZE,
    Receipt,
    receipt_offset,
    rejections_by_code,
)
from knhk_stream.protocol.settings import ChainSettings

BUNDLE_VERSION = 2
# The checks, in the order they run; each links one item to the next.
STEPS = ("bundle", "delta_hash", "receipt", "audit_path", "root", "entry_hash", "quorum")


def make_bundle(
    committed: CommittedEntry,
    receipts: Sequence[bytes],
    leaf_index: int,
    value: bytes | None,
    hash_only: bool = False,
    epochs: Sequence[Epoch] = (),
) -> dict[str, Any]:
    """The proof bundle for leaf `leaf_index` of the beat whose receipts are `receipts`.

    The caller rebuilt `receipts` by replay; `value` is the record value at that
    leaf's offset (None or b"" for a null value). With `hash_only` the bundle
    carries only the value's hash, for deltas that must not leave the cluster.
    `epochs` are the statements after epoch 0 up to the entry's epoch, so that
    the bundle can be checked offline from epoch 0 alone.
    """
    e = committed.entry
    receipt = receipts[leaf_index]
    bundle: dict[str, Any] = {
        "protocol": PROTOCOL,
        "version": BUNDLE_VERSION,
        "chain_id": e.chain_id,
        "shard": e.shard,
        "cycle": e.cycle,
        "offset": receipt_offset(receipt),
    }
    if not hash_only:
        bundle["value"] = base64.b64encode(value or b"").decode("ascii")
    bundle |= {
        "delta_hash": H(value or b"").hex(),
        "receipt": receipt.hex(),
        "leaf_index": leaf_index,
        "tree_size": len(receipts),
        "audit_path": [p.hex() for p in merkle.inclusion_proof(receipts, leaf_index)],
        "root": merkle.root(receipts).hex(),
        "entry": e.to_fields(),
        "entry_hash": committed.entry_hash.hex(),
        "epoch": committed.epoch,
        "epochs": [ep.to_json() for ep in epochs if 0 < ep.number <= committed.epoch],
        "votes": [{"peer_id": p, "signature": s.hex()} for p, s in sorted(committed.votes)],
        "committed_by": committed.committed_by,
        "committed_at_ms": committed.committed_at_ms,
    }
    return bundle


# -- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    name: str
    ok: bool
    message: str


@dataclass
class BundleCheck:
    """The outcome of `verify_bundle`: every step run, and the first that failed."""

    ok: bool
    failed_step: str | None
    message: str
    steps: list[StepResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed_step": self.failed_step,
            "message": self.message,
            "steps": [{"name": s.name, "ok": s.ok, "message": s.message} for s in self.steps],
        }


class _Fail(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.message = message


@dataclass(frozen=True)
class _Parsed:
    chain_id: str
    shard: int
    cycle: int
    offset: int
    value: bytes | None  # None: hash-only bundle
    delta_hash: bytes
    receipt: bytes
    leaf_index: int
    tree_size: int
    path: list[bytes]
    root: bytes
    entry: Entry
    entry_hash: bytes
    votes: list[tuple[str, bytes]]
    committed_by: str
    epoch: int
    epochs: list[Epoch]


def _int(b: dict[str, Any], key: str, where: str = "", top: int = U64_MAX) -> int:
    v = b.get(key)
    if type(v) is not int or not 0 <= v <= top:
        raise _Fail("bundle", f"field {where}{key!r} must be an integer from 0 to {top}, got {v!r}")
    return v


def _str(b: dict[str, Any], key: str, where: str = "") -> str:
    v = b.get(key)
    if not isinstance(v, str):
        raise _Fail("bundle", f"field {where}{key!r} must be a string, got {v!r}")
    return v


def _hex(v: Any, what: str, size: int | None = 32) -> bytes:
    if not isinstance(v, str):
        raise _Fail("bundle", f"field {what} must be a hex string, got {v!r}")
    try:
        out = bytes.fromhex(v)
    except ValueError:
        raise _Fail("bundle", f"field {what} is not hex: {v[:80]!r}") from None
    if size is not None and len(out) != size:
        raise _Fail("bundle", f"field {what} must be {size} bytes ({2 * size} hex digits), got {len(out)} bytes")
    return out


def _parse(b: Any, settings: ChainSettings) -> _Parsed:
    if not isinstance(b, dict):
        raise _Fail("bundle", "a proof bundle is a JSON object")
    if b.get("protocol") != PROTOCOL:
        raise _Fail("bundle", f"protocol is {b.get('protocol')!r}; this verifier checks {PROTOCOL!r} bundles")
    if b.get("version") != BUNDLE_VERSION:
        raise _Fail(
            "bundle",
            f"bundle version {b.get('version')!r} is unknown; this verifier reads version 2 "
            "(protocol v2: make the bundle again with `knhk-stream prove`)",
        )
    chain_id = _str(b, "chain_id")
    if chain_id != settings.chain_id:
        raise _Fail(
            "bundle",
            f"the bundle is for chain {chain_id!r}, the settings are for chain {settings.chain_id!r}: "
            "use that chain's settings file",
        )
    value: bytes | None = None
    if "value" in b:
        raw = _str(b, "value")
        try:
            value = base64.b64decode(raw.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise _Fail("bundle", "field 'value' is not base64") from None
    path = b.get("audit_path")
    if not isinstance(path, list):
        raise _Fail("bundle", "field 'audit_path' must be a list of hex hashes")
    entry_obj = b.get("entry")
    if not isinstance(entry_obj, dict):
        raise _Fail("bundle", "field 'entry' must be an object with the entry's fields")
    missing = [k for k in ENTRY_FIELDS if k not in entry_obj]
    if missing:
        raise _Fail("bundle", f"field 'entry' lacks {', '.join(missing)}")
    _str(entry_obj, "chain_id", "entry.")
    for k in ENTRY_INT_FIELDS:
        _int(entry_obj, k, "entry.", U32_MAX if k == "shard" else U64_MAX)
    entry = Entry(
        entry_obj["chain_id"],
        entry_obj["shard"],
        entry_obj["cycle"],
        _hex(entry_obj["root"], "'entry.root'"),
        entry_obj["receipt_count"],
        entry_obj["first_offset"],
        entry_obj["last_offset"],
        _hex(entry_obj["prev_entry_hash"], "'entry.prev_entry_hash'"),
    )
    raw_votes = b.get("votes")
    if not isinstance(raw_votes, list):
        raise _Fail("bundle", "field 'votes' must be a list of {peer_id, signature}")
    votes: list[tuple[str, bytes]] = []
    for i, v in enumerate(raw_votes):
        if not isinstance(v, dict):
            raise _Fail("bundle", f"votes[{i}] must be an object with peer_id and signature")
        votes.append((_str(v, "peer_id", f"votes[{i}]."), _hex(v.get("signature"), f"'votes[{i}].signature'", None)))
    try:
        epochs = parse_epochs(b.get("epochs", []), settings.chain_id, settings.tick_ms)
    except EpochError as e:
        raise _Fail("bundle", f"{e.where}: {e}") from None
    return _Parsed(
        chain_id=chain_id,
        shard=_int(b, "shard", top=U32_MAX),
        cycle=_int(b, "cycle"),
        offset=_int(b, "offset"),
        value=value,
        delta_hash=_hex(b.get("delta_hash"), "'delta_hash'"),
        receipt=_hex(b.get("receipt"), "'receipt'", None),
        leaf_index=_int(b, "leaf_index"),
        tree_size=_int(b, "tree_size"),
        path=[_hex(p, f"'audit_path[{i}]'") for i, p in enumerate(path)],
        root=_hex(b.get("root"), "'root'"),
        entry=entry,
        entry_hash=_hex(b.get("entry_hash"), "'entry_hash'"),
        votes=votes,
        committed_by=_str(b, "committed_by"),
        epoch=_int(b, "epoch", top=U32_MAX),
        epochs=epochs,
    )


def _describe(r: Receipt) -> str:
    if r.status == APPLIED:
        return f"applied, {r.lanes} lane{'' if r.lanes == 1 else 's'}"
    code = rejections_by_code([r.to_bytes()])
    return f"rejected ({next(iter(code))})" if code else f"status {r.status}"


def _check_delta_hash(p: _Parsed) -> str:
    if p.value is None:
        return "hash-only bundle: the value is not included, its hash is taken as stated"
    got = H(p.value)
    if got != p.delta_hash:
        raise _Fail(
            "delta_hash",
            f"the record value ({len(p.value)} bytes) hashes to {got.hex()}, the bundle says {p.delta_hash.hex()}",
        )
    return f"the {len(p.value)}-byte record value hashes to {got.hex()}"


def _check_receipt(p: _Parsed, settings: ChainSettings) -> str:
    def fail(msg: str) -> _Fail:
        return _Fail("receipt", msg)

    if len(p.receipt) != RECEIPT_SIZE:
        raise fail(f"a receipt is {RECEIPT_SIZE} bytes, the bundle's is {len(p.receipt)}")
    try:
        r = Receipt.from_bytes(p.receipt)
    except ValueError as e:
        raise fail(str(e)) from None
    for name, mine, theirs in (
        ("shard", r.shard, p.shard),
        ("cycle", r.cycle, p.cycle),
        ("offset", r.offset, p.offset),
    ):
        if mine != theirs:
            raise fail(f"the receipt is for {name} {mine}, the bundle says {name} {theirs}")
    if r.tick >= TICKS_PER_BEAT:
        raise fail(f"tick {r.tick} is not 0..{TICKS_PER_BEAT - 1}")
    epoch = settings.epoch_for(r.cycle)
    hook = settings.load_hook(epoch)
    if r.hook_id != hook.hook_id:
        raise fail(
            f"the receipt's hook_id is {r.hook_id.hex()}, but the chain's hook {hook.name} has id {hook.hook_id.hex()}"
        )
    if r.delta_hash != p.delta_hash:
        raise fail(f"the receipt's delta_hash is {r.delta_hash.hex()}, the record's is {p.delta_hash.hex()}")
    if p.value is None:
        return f"{_describe(r)}; for shard {r.shard} cycle {r.cycle} tick {r.tick} offset {r.offset} (not recomputed)"
    again = settings.processor_for(epoch).receipt(r.shard, r.cycle, r.tick, r.offset, p.value)
    if again != p.receipt:
        raise fail(
            f"recomputing from the value with {hook.name} gives {_describe(Receipt.from_bytes(again))} "
            f"(a_hash {again[A_HASH_BYTES].hex()}), the receipt says {_describe(r)} (a_hash {r.a_hash.hex()})"
        )
    return f"recomputed with {hook.name}: {_describe(r)}, tick {r.tick}"


def _check_path(p: _Parsed) -> str:
    if not 0 <= p.leaf_index < p.tree_size:
        raise _Fail("audit_path", f"leaf index {p.leaf_index} is outside a tree of {p.tree_size} leaves")
    try:
        got = merkle.root_from_proof(p.receipt, p.leaf_index, p.tree_size, p.path)
    except ValueError as e:
        raise _Fail(
            "audit_path", f"{len(p.path)} hashes do not fit leaf {p.leaf_index} of {p.tree_size}: {e}"
        ) from None
    if got != p.root:
        raise _Fail("audit_path", f"the receipt and audit path lead to root {got.hex()}, not to {p.root.hex()}")
    return f"leaf {p.leaf_index} of {p.tree_size}, {len(p.path)} hashes, leads to root {got.hex()}"


def _check_root(p: _Parsed) -> str:
    e = p.entry
    if p.root != e.root:
        raise _Fail("root", f"the bundle's root {p.root.hex()} is not the entry's root {e.root.hex()}")
    if p.tree_size != e.receipt_count:
        raise _Fail("root", f"the audit path is for {p.tree_size} receipts, the entry commits to {e.receipt_count}")
    return f"the entry commits to this root over {e.receipt_count} receipts"


def _check_entry(p: _Parsed) -> str:
    e = p.entry
    got = e.entry_hash
    if got != p.entry_hash:
        raise _Fail("entry_hash", f"the entry's fields hash to {got.hex()}, the bundle says {p.entry_hash.hex()}")
    for name, mine, theirs in (("chain_id", e.chain_id, p.chain_id), ("shard", e.shard, p.shard),
                               ("cycle", e.cycle, p.cycle)):  # fmt: skip
        if mine != theirs:
            raise _Fail("entry_hash", f"the entry is for {name} {mine!r}, the delta for {name} {theirs!r}")
    if not e.first_offset <= p.offset <= e.last_offset:
        raise _Fail("entry_hash", f"offset {p.offset} is outside the entry's offsets {e.first_offset}..{e.last_offset}")
    return f"fields hash to {got.hex()}; offsets {e.first_offset}..{e.last_offset}"


def vote_problems(entry_hash: bytes, votes: Sequence[tuple[str, bytes]], epoch: Epoch) -> list[str]:
    """Why each vote is not a distinct, valid vote of a known peer; empty when all are.

    Stricter than a quorum proof (which ignores bad extra votes): a committer only
    stores votes it verified, so any bad vote in a bundle or export was altered.
    """
    return list(check_quorum(entry_hash, votes, epoch).rejected)


def _check_quorum(p: _Parsed, settings: ChainSettings) -> str:
    epoch = settings.epoch_for(p.entry.cycle)
    forked = settings.epoch_chain.problem_for_cycle(p.entry.cycle)
    if forked:
        raise _Fail("quorum", forked)
    backdated = backdated_problem(settings.epoch_chain, p.entry.cycle, p.entry_hash, p.votes)
    if backdated and not check_quorum(p.entry_hash, p.votes, epoch).valid:
        raise _Fail("quorum", backdated)
    if p.epoch != epoch.number:
        raise _Fail("quorum", f"the bundle says epoch {p.epoch}, but cycle {p.entry.cycle} is in epoch {epoch.number}")
    problems = vote_problems(p.entry_hash, p.votes, epoch)
    if problems:
        raise _Fail("quorum", problems[0])
    if len(p.votes) < epoch.threshold:
        raise _Fail("quorum", f"{len(p.votes)} valid votes, the threshold of epoch {epoch.number} is {epoch.threshold}")
    signers = ", ".join(sorted(v[0] for v in p.votes))
    return (
        f"{len(p.votes)} of {len(epoch.peers)} peers of epoch {epoch.number} signed "
        f"(threshold {epoch.threshold}): {signers}"
    )


def verify_bundle(bundle: dict[str, Any], settings: ChainSettings) -> BundleCheck:
    """Check a proof bundle offline against the chain settings; stops at the first failed step."""
    steps: list[StepResult] = []
    try:
        p = _parse(bundle, settings)
        settings = settings.with_epochs(p.epochs)  # each accepted only through epoch 0 of the settings file
        steps.append(
            StepResult(
                "bundle",
                True,
                f"{PROTOCOL} proof for chain {p.chain_id!r} shard {p.shard} cycle {p.cycle} offset {p.offset}",
            )
        )
        for name, check in (
            ("delta_hash", lambda: _check_delta_hash(p)),
            ("receipt", lambda: _check_receipt(p, settings)),
            ("audit_path", lambda: _check_path(p)),
            ("root", lambda: _check_root(p)),
            ("entry_hash", lambda: _check_entry(p)),
            ("quorum", lambda: _check_quorum(p, settings)),
        ):
            steps.append(StepResult(name, True, check()))
    except _Fail as f:
        steps.append(StepResult(f.step, False, f.message))
        return BundleCheck(False, f.step, f"step {f.step} failed: {f.message}", steps)
    return BundleCheck(
        True,
        None,
        f"offset {p.offset} of shard {p.shard} is leaf {p.leaf_index} of {p.tree_size} in the beat of "
        f"cycle {p.cycle}, committed by a quorum of chain {p.chain_id!r}",
        steps,
    )

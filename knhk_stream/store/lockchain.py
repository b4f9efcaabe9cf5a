"""The lockchain in Redis: atomic appends, reads, and verification of ranges.

The key layout (protocol "Redis") is in keys.py: K:root:{cycle:020} (hash),
K:cycles (sorted set) and K:head (hash) under one hash tag per chain shard, so
the Lua append is atomic on a cluster as on a single server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import redis
from redis.cluster import RedisCluster

from knhk_stream.errors import ForkError, LockchainError, NotNextError
from knhk_stream.protocol.committed import STORED_FIELDS, CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH, cycle_key
from knhk_stream.protocol.entry import ENTRY_FIELDS, ENTRY_HASH_FIELDS
from knhk_stream.protocol.quorum import QuorumCheck, backdated_problem, check_quorum
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.store.connect import Durability, ReplicasLagging, connect, wait_for_replicas
from knhk_stream.store.keys import (
    ShardKeys,
    chain_key,
    check_prefix,
    cycle_of_entry_key,
    head_pattern,
    root_key,
    shard_keys,
    shard_of_key,
)

__all__ = [
    "STORED_FIELDS",
    "Checkpoint",
    "ForkError",
    "Head",
    "LockchainError",
    "LockchainStore",
    "NotNextError",
    "Problem",
    "VerifyReport",
    "add_evidence",
    "as_text",
    "chain_key",
    "check_entry",
    "get_evidence",
    "get_published",
    "get_stall",
    "load_checkpoint",
    "peer_ids_with_checkpoints",
    "root_key",
    "save_checkpoint",
    "set_published",
    "set_stall",
    "verify_range",
]

# Fields whose change only shows as an entry hash that no longer matches.
HASHED_ONLY = ("root", "receipt_count", "first_offset", "last_offset")
# Entry fields that a check of their own can name (the others show only as HASHED_ONLY).
NAMED_BY_CHECKS = tuple(f for f in ENTRY_FIELDS if f not in HASHED_ONLY)


_APPEND = """
local existing = redis.call('HGET', KEYS[1], 'entry_hash')
if existing then
  if existing == ARGV[3] then return 'exists' end
  return redis.error_reply('FORK cycle ' .. ARGV[1] .. ' already holds entry ' .. existing)
end
local head = redis.call('HMGET', KEYS[3], 'cycle', 'entry_hash')
if head[2] then
  if head[2] ~= ARGV[4] then
    return redis.error_reply('NOTNEXT prev_entry_hash ' .. ARGV[4] .. ' is not the head entry '
      .. head[2] .. ' at cycle ' .. head[1])
  end
  local padded = string.rep('0', 20 - #head[1]) .. head[1]
  if ARGV[2] <= padded then
    return redis.error_reply('NOTNEXT cycle ' .. ARGV[1] .. ' is not after the head cycle ' .. head[1])
  end
elseif ARGV[4] ~= string.rep('0', 64) then
  return redis.error_reply('NOTNEXT the chain is empty, so prev_entry_hash must be 32 zero bytes, not '
    .. ARGV[4])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], 'cycle', ARGV[1], 'entry_hash', ARGV[3])
return 'appended'
"""


@dataclass(frozen=True)
class Head:
    cycle: int
    entry_hash: bytes


def as_text(v: Any) -> str:
    """A Redis reply item (bytes unless the client decodes) as text."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _texts(got: dict[Any, Any]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in got.items()}


class LockchainStore:
    """One chain's entries in Redis (any shard), under a key prefix."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        chain_id: str,
        prefix: str = "knhk",
        durability: Durability | None = None,
    ) -> None:
        check_prefix(prefix)
        self.client = client
        self.durability = durability or Durability()
        self.chain_id = chain_id
        self.prefix = prefix
        self._append = client.register_script(_APPEND)
        self._keys: dict[int, ShardKeys] = {}

    @classmethod
    def from_url(cls, url: str, chain_id: str, prefix: str = "knhk", **kwargs: Any) -> LockchainStore:
        """redis:// or rediss:// (with user:password@), or unix://, to a server or any node of a
        Redis Cluster (detected); `?wait_replicas=N&wait_timeout_ms=T` asks for durable appends.
        kwargs go to redis-py."""
        client, durability = connect(url, **kwargs)
        return cls(client, chain_id, prefix, durability)

    def key(self, shard: int) -> str:
        """K of a shard (protocol "Redis")."""
        return self.keys(shard).k

    def keys(self, shard: int) -> ShardKeys:
        """Every key of a shard."""
        got = self._keys.get(shard)
        if got is None:
            got = self._keys[shard] = shard_keys(self.prefix, self.chain_id, shard)
        return got

    # -- writing ------------------------------------------------------------------------

    def append(self, committed: CommittedEntry) -> bool:
        """Append atomically; True if written, False if this very entry was already there."""
        e = committed.entry
        if e.chain_id != self.chain_id:
            raise LockchainError(f"entry of chain {e.chain_id!r} given to the store of {self.chain_id!r}")
        k = self.keys(e.shard)
        fields = committed.to_redis()
        args: list[str] = [str(e.cycle), cycle_key(e.cycle), fields["entry_hash"], fields["prev_entry_hash"]]
        for name in STORED_FIELDS:
            args += [name, fields[name]]
        try:
            result = self._append(keys=[k.entry(e.cycle), k.cycles, k.head], args=args)
        except redis.ResponseError as err:
            msg = str(err)
            where = f"shard {e.shard} cycle {e.cycle}: "
            if msg.startswith("FORK"):
                raise ForkError(where + msg[5:] + "; refusing to overwrite it") from None
            if msg.startswith("NOTNEXT"):
                raise NotNextError(where + msg[8:]) from None
            raise
        if self.durability.replicas:
            acked = wait_for_replicas(self.client, k.head, self.durability)
            if acked < self.durability.replicas:
                raise ReplicasLagging(
                    f"shard {e.shard} cycle {e.cycle}: only {acked} of {self.durability.replicas} replica(s) "
                    f"acknowledged the append within {self.durability.timeout_ms} ms; it is not published until "
                    "they do (check the replicas' link and lag: INFO replication)"
                )
        return as_text(result) == "appended"

    # -- reading ------------------------------------------------------------------------

    def head(self, shard: int) -> Head | None:
        cycle, h = self.client.hmget(self.keys(shard).head, "cycle", "entry_hash")
        if h is None:
            return None
        return Head(int(cycle), bytes.fromhex(as_text(h)))

    def raw(self, shard: int, cycle: int) -> dict[str, str]:
        """The stored hash of one cycle as text (empty when absent)."""
        return _texts(self.client.hgetall(self.keys(shard).entry(cycle)))

    def get(self, shard: int, cycle: int) -> CommittedEntry | None:
        raw = self.raw(shard, cycle)
        return CommittedEntry.from_mapping(raw) if raw else None

    def cycles(self, shard: int, from_cycle: int | None = None, to_cycle: int | None = None) -> list[int]:
        """Listed cycles in the range, decided by the padded members, never by the float scores
        (protocol "Redis": scores lose precision above 2^53). Scores only narrow the read, with slack."""
        lo, hi = _score_range(from_cycle, to_cycle)
        got = (_member_cycle(m) for m in self.client.zrangebyscore(self.keys(shard).cycles, lo, hi))
        return sorted(
            c for c in got
            if c is not None and (from_cycle is None or c >= from_cycle) and (to_cycle is None or c <= to_cycle)
        )  # fmt: skip

    def count(self, shard: int, from_cycle: int | None = None, to_cycle: int | None = None) -> int:
        """How many cycles the cycles set lists (in the range, if given)."""
        if from_cycle is None and to_cycle is None:
            return int(self.client.zcard(self.keys(shard).cycles))
        return len(self.cycles(shard, from_cycle, to_cycle))

    def cycle_at(self, shard: int, rank: int) -> int | None:
        """The cycle at `rank` (0 = the oldest) of the cycles set, None past its end."""
        got = self.client.zrange(self.keys(shard).cycles, rank, rank)
        return int(as_text(got[0])) if got else None

    def entry_hashes(self, shard: int, cycles: Iterable[int], batch: int = 1000) -> dict[int, bytes]:
        """The stored entry_hash of each of `cycles` that has an entry, fetched in pipelined batches."""
        k = self.keys(shard)
        wanted = list(cycles)
        out: dict[int, bytes] = {}
        for i in range(0, len(wanted), batch):
            chunk = wanted[i : i + batch]
            pipe = self.client.pipeline(transaction=False)
            for c in chunk:
                pipe.hget(k.entry(c), "entry_hash")
            for c, h in zip(chunk, pipe.execute(), strict=True):
                if h is not None:
                    out[c] = bytes.fromhex(as_text(h))
        return out

    def raw_range(
        self, shard: int, from_cycle: int | None = None, to_cycle: int | None = None, batch: int = 500
    ) -> Iterator[tuple[int, dict[str, str]]]:
        """(cycle, stored hash) for each listed cycle in order, fetched in pipelined batches."""
        cycles = self.cycles(shard, from_cycle, to_cycle)
        k = self.keys(shard)
        for i in range(0, len(cycles), batch):
            chunk = cycles[i : i + batch]
            pipe = self.client.pipeline(transaction=False)
            for c in chunk:
                pipe.hgetall(k.entry(c))
            for c, got in zip(chunk, pipe.execute(), strict=True):
                yield c, _texts(got)

    def range(self, shard: int, from_cycle: int | None = None, to_cycle: int | None = None) -> list[CommittedEntry]:
        return [CommittedEntry.from_mapping(raw) for _, raw in self.raw_range(shard, from_cycle, to_cycle) if raw]

    def previous(self, shard: int, cycle: int) -> CommittedEntry | None:
        """The entry listed just before `cycle`, if any."""
        slack = _slack(cycle)
        got = self.client.zrevrangebyscore(self.keys(shard).cycles, cycle + slack, "-inf", start=0, num=4 * slack + 4)
        before = [c for c in map(_member_cycle, got) if c is not None and c < cycle]
        return self.get(shard, max(before)) if before else None

    def stored_cycles(self, shard: int) -> set[int]:
        """Cycles that have a root hash, found by SCAN (not trusting the sorted set)."""
        out: set[int] = set()
        for key in self.client.scan_iter(match=self.keys(shard).entry_prefix + "*", count=1000):
            cycle = cycle_of_entry_key(as_text(key))
            if cycle is not None:
                out.add(cycle)
        return out

    def shards(self) -> list[int]:
        """Shards of this chain that have a head."""
        pattern = head_pattern(self.prefix, self.chain_id)
        return sorted({shard_of_key(as_text(key)) for key in self.client.scan_iter(match=pattern, count=1000)})


def _slack(cycle: int) -> int:
    """How far a float score may be from its cycle (doubles keep 53 bits)."""
    return max(1, cycle >> 52)


def _score_range(from_cycle: int | None, to_cycle: int | None) -> tuple[int | str, int | str]:
    lo = "-inf" if from_cycle is None else max(0, from_cycle - _slack(from_cycle))
    hi = "+inf" if to_cycle is None else to_cycle + _slack(to_cycle)
    return lo, hi


def _member_cycle(member: bytes | str) -> int | None:
    """The cycle of a `{cycle:020}` member; None for anything else (a finding for verify_range)."""
    text = as_text(member)
    return int(text) if len(text) == 20 and text.isascii() and text.isdigit() else None


# -- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One failed check: the entry (cycle) and the stored field(s) it implicates."""

    cycle: int | None
    fields: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        where = f"cycle {self.cycle}" if self.cycle is not None else "chain"
        return f"{where} [{', '.join(self.fields)}]: {self.message}"


@dataclass
class VerifyReport:
    chain_id: str
    shard: int
    entries: int = 0
    first_cycle: int | None = None
    last_cycle: int | None = None
    head: Head | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out = {n: getattr(self, n) for n in ("chain_id", "shard", "ok", "entries", "first_cycle", "last_cycle")}
        out["head_cycle"] = self.head.cycle if self.head else None
        out["problems"] = [{"cycle": p.cycle, "fields": list(p.fields), "message": p.message} for p in self.problems]
        return out


def check_entry(
    raw: dict[str, str],
    cycle: int,
    shard: int,
    settings: ChainSettings,
    prev_hash: bytes | None,
    prev_last_offset: int | None,
    quorum: QuorumCheck | None = None,
) -> tuple[list[Problem], CommittedEntry | None]:
    """Every per-entry check; returns the problems and the entry if it parsed."""
    out: list[Problem] = []

    def bad(fields: str | tuple[str, ...], msg: str) -> None:
        out.append(Problem(cycle, (fields,) if isinstance(fields, str) else fields, msg))

    missing = [f for f in STORED_FIELDS if f not in raw]
    if missing:
        bad(tuple(missing), "stored entry lacks " + ", ".join(missing))
        return out, None
    try:
        ce = CommittedEntry.from_mapping(raw)
    except (ValueError, KeyError, TypeError) as e:
        for name in STORED_FIELDS:  # name the field that does not parse
            try:
                CommittedEntry.from_mapping({**raw, name: _placeholder(name)})
            except (ValueError, KeyError, TypeError):
                continue
            bad(name, f"cannot be read: {raw[name]!r}")
            return out, None
        bad(STORED_FIELDS, f"entry cannot be read: {e}")
        return out, None
    e = ce.entry
    if e.chain_id != settings.chain_id:
        bad("chain_id", f"is {e.chain_id!r}, the key says {settings.chain_id!r}")
    if e.shard != shard:
        bad("shard", f"is {e.shard}, the key says {shard}")
    if e.cycle != cycle:
        bad("cycle", f"is {e.cycle}, the key says {cycle}")
    if prev_hash is not None and e.prev_entry_hash != prev_hash:
        bad(
            "prev_entry_hash",
            f"is {e.prev_entry_hash.hex()}, the entry before it has hash "
            f"{prev_hash.hex()}: an entry is missing (a hole) or was changed",
        )
    if quorum is None:
        quorum = check_quorum(ce.entry_hash, ce.votes, settings.epoch_for(e.cycle))
    recomputed = e.entry_hash
    if recomputed != ce.entry_hash:
        if quorum.valid:
            named = [f for f in NAMED_BY_CHECKS if any(f in p.fields for p in out)]
            suspects = tuple(named) or HASHED_ONLY
            bad(
                suspects,
                f"the fields hash to {recomputed.hex()}, not to the quorum-signed entry_hash "
                f"{ce.entry_hash.hex()}: {' or '.join(suspects)} was changed",
            )
        else:
            bad("entry_hash", f"stored {ce.entry_hash.hex()} but the fields hash to {recomputed.hex()}")
    if not quorum.valid:
        backdated = backdated_problem(settings.epoch_chain, e.cycle, ce.entry_hash, ce.votes)
        bad("votes", backdated or "no valid quorum proof: " + "; ".join(quorum.problems))
    epoch = settings.epoch_for(e.cycle)
    if ce.epoch != epoch.number:
        bad("epoch", f"is {ce.epoch}, but cycle {e.cycle} is in epoch {epoch.number}")
    forked = settings.epoch_chain.problem_for_cycle(e.cycle)
    if forked:
        bad("epoch", forked)
    if ce.committed_at_ms < 0:
        bad("committed_at_ms", "is negative")
    if not 1 <= e.receipt_count <= e.last_offset - e.first_offset + 1:
        bad(
            ("receipt_count", "first_offset", "last_offset"),
            f"{e.receipt_count} receipts cannot fit offsets {e.first_offset}..{e.last_offset}",
        )
    if prev_last_offset is not None and e.first_offset <= prev_last_offset:
        bad(
            "first_offset",
            f"{e.first_offset} is not after the previous entry's last_offset {prev_last_offset}",
        )
    return out, ce


def _placeholder(name: str) -> str:
    if name in (*ENTRY_HASH_FIELDS, "entry_hash"):
        return "00" * 32
    if name == "votes":
        return "[]"
    if name in ("chain_id", "committed_by"):
        return "x"
    return "0"


@cache
def _pool() -> ThreadPoolExecutor:
    """The threads that check signatures, started on the first verification (not at import)."""
    return ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="knhk-verify")


def _with_quorum_checks(
    rows: Iterator[tuple[int, dict[str, str]]], settings: ChainSettings, batch: int = 256
) -> Iterator[tuple[int, dict[str, str], QuorumCheck | None]]:
    """Signature checks dominate verification and OpenSSL releases the GIL: run a batch in threads."""

    def check(raw: dict[str, str]) -> QuorumCheck | None:
        try:
            ce = CommittedEntry.from_mapping(raw)
        except (ValueError, KeyError, TypeError):
            return None  # check_entry reports what does not parse
        return check_quorum(ce.entry_hash, ce.votes, settings.epoch_for(ce.entry.cycle))

    def checked(chunk: list[tuple[int, dict[str, str]]]) -> Iterator[tuple[int, dict[str, str], QuorumCheck | None]]:
        for (cycle, raw), quorum in zip(chunk, _pool().map(check, (r for _, r in chunk)), strict=True):
            yield cycle, raw, quorum

    chunk: list[tuple[int, dict[str, str]]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch:
            yield from checked(chunk)
            chunk = []
    if chunk:
        yield from checked(chunk)


def verify_range(
    store: LockchainStore,
    settings: ChainSettings,
    shard: int,
    from_cycle: int | None = None,
    to_cycle: int | None = None,
) -> VerifyReport:
    """Every check of the protocol's "Verification" over one shard's stored range."""
    report = VerifyReport(settings.chain_id, shard, head=None)
    try:
        report.head = store.head(shard)
    except ValueError as e:
        report.problems.append(Problem(None, ("head",), f"head cannot be read: {e}"))
    prev_hash: bytes | None = ZERO_HASH
    prev_last: int | None = None
    if from_cycle is not None:
        before = store.previous(shard, from_cycle)
        prev_hash = before.entry_hash if before else ZERO_HASH
        prev_last = before.entry.last_offset if before else None
    listed: list[int] = []
    last: CommittedEntry | None = None
    for cycle, raw, quorum in _with_quorum_checks(store.raw_range(shard, from_cycle, to_cycle), settings):
        listed.append(cycle)
        if not raw:
            report.problems.append(Problem(cycle, ("cycles",), "listed in the cycles set, but its entry is missing"))
            prev_hash = None  # cannot link across a missing entry; the next link check is skipped
            continue
        problems, ce = check_entry(raw, cycle, shard, settings, prev_hash, prev_last, quorum)
        report.problems.extend(problems)
        report.entries += 1
        if ce is not None:
            prev_hash, prev_last, last = ce.entry_hash, ce.entry.last_offset, ce
        else:
            prev_hash = None
    if listed:
        report.first_cycle, report.last_cycle = listed[0], listed[-1]
    stored = {
        c
        for c in store.stored_cycles(shard)
        if (from_cycle is None or c >= from_cycle) and (to_cycle is None or c <= to_cycle)
    }
    for c in sorted(stored - set(listed)):
        report.problems.append(Problem(c, ("cycles",), "an entry is stored but not listed in the cycles set"))
    reaches_end = to_cycle is None or (report.head is not None and report.head.cycle <= to_cycle)
    if reaches_end:
        if last is None and report.head is not None and not listed:
            report.problems.append(Problem(report.head.cycle, ("head",), "head names an entry that is not stored"))
        elif last is not None and (
            report.head is None or report.head.cycle != last.entry.cycle or report.head.entry_hash != last.entry_hash
        ):
            found = f"cycle {report.head.cycle}" if report.head else "no head"
            report.problems.append(
                Problem(last.entry.cycle, ("head",), f"head is {found}, not the last entry {last.entry.cycle}")
            )
    return report


# -- peer progress and flags (what `status` reads) ------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A peer's progress on a shard, written after its vote is on the votes topic."""

    next_offset: int
    entry_hash: bytes
    cycle: int | None
    votes_offset: int
    updated_ms: int


def save_checkpoint(store: LockchainStore, peer_id: str, shard: int, cp: Checkpoint) -> None:
    """Only moves forward: a stale writer (e.g. a revoked worker) cannot move it back."""
    store.client.eval(
        """
        local cur = redis.call('HGET', KEYS[1], 'next_offset')
        if cur and tonumber(cur) > tonumber(ARGV[2]) then return 0 end
        redis.call('HSET', KEYS[1], unpack(ARGV, 1))
        return 1
        """,
        1,
        store.keys(shard).checkpoint(peer_id),
        "next_offset",
        str(cp.next_offset),
        "entry_hash",
        cp.entry_hash.hex(),
        "cycle",
        "" if cp.cycle is None else str(cp.cycle),
        "votes_offset",
        str(cp.votes_offset),
        "updated_ms",
        str(cp.updated_ms),
    )


def load_checkpoint(store: LockchainStore, peer_id: str, shard: int) -> Checkpoint | None:
    got = _texts(store.client.hgetall(store.keys(shard).checkpoint(peer_id)))
    if not got:
        return None
    return Checkpoint(
        int(got["next_offset"]),
        bytes.fromhex(got["entry_hash"]),
        int(got["cycle"]) if got["cycle"] else None,
        int(got.get("votes_offset", "0")),
        int(got.get("updated_ms", "0")),
    )


def set_stall(store: LockchainStore, shard: int, cycle: int | None, reason: str = "", at_ms: int = 0) -> None:
    key = store.keys(shard).stall
    if cycle is None:
        store.client.delete(key)
    else:
        store.client.hset(key, mapping={"cycle": str(cycle), "reason": reason, "at_ms": str(at_ms)})


def get_stall(store: LockchainStore, shard: int) -> dict[str, str] | None:
    return _texts(store.client.hgetall(store.keys(shard).stall)) or None


def add_evidence(store: LockchainStore, shard: int, evidence: dict[str, Any]) -> None:
    """Equivocation evidence (both signed votes), kept once per peer and cycle."""
    field_name = f"{evidence['peer_id']}/{evidence['cycle']}"
    store.client.hsetnx(store.keys(shard).evidence, field_name, json.dumps(evidence))


def get_evidence(store: LockchainStore, shard: int) -> list[dict[str, Any]]:
    return [json.loads(v) for v in store.client.hgetall(store.keys(shard).evidence).values()]


def peer_ids_with_checkpoints(store: LockchainStore, shard: int) -> list[str]:
    prefix = store.keys(shard).checkpoint_prefix
    return sorted(as_text(k)[len(prefix) :] for k in store.client.scan_iter(match=prefix + "*", count=1000))


def get_published(store: LockchainStore, shard: int) -> int | None:
    v = store.client.get(store.keys(shard).published)
    return int(v) if v is not None else None


def set_published(store: LockchainStore, shard: int, cycle: int) -> None:
    store.client.set(store.keys(shard).published, str(cycle))

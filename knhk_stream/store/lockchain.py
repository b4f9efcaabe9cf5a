"""The lockchain in Redis: atomic appends, reads, and verification of ranges.

The key layout (protocol "Redis") is in keys.py: K:root:{cycle:020} (hash),
K:cycles (sorted set) and K:head (hash) under one hash tag per chain shard, so
the Lua append is atomic on a cluster as on a single server.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from knhk_stream.errors import ForkError, KnhkError, LockchainError, NotNextError
from knhk_stream.protocol.committed import STORED_FIELDS, CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH, cycle_key, parse_hash, str16, u32, u64
from knhk_stream.protocol.entry import ENTRY_FIELDS, ENTRY_HASH_FIELDS, Entry
from knhk_stream.protocol.jsontext import loads_json
from knhk_stream.protocol.keys import verify_signature
from knhk_stream.protocol.quorum import (
    Equivocation,
    QuorumCheck,
    Vote,
    backdated_problem,
    check_quorum,
    verify_vote,
)
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
    "Pin",
    "PinFileError",
    "Problem",
    "StoredCopy",
    "VerifyReport",
    "acknowledge_published",
    "add_evidence",
    "as_text",
    "chain_key",
    "check_entry",
    "checkpoint_message",
    "checkpoint_verifies",
    "committed_problem",
    "evidence_key",
    "evidence_of",
    "evidence_problem",
    "get_evidence",
    "get_health",
    "get_published",
    "get_stall",
    "load_checkpoint",
    "load_pins",
    "peer_ids_with_checkpoints",
    "pin_problems",
    "read_head_entry",
    "read_verified",
    "root_key",
    "save_checkpoint",
    "save_pins",
    "set_health",
    "set_stall",
    "stored_checkpoint_signature",
    "verify_range",
]

# Fields whose change only shows as an entry hash that no longer matches.
HASHED_ONLY = ("root", "receipt_count", "first_offset", "last_offset")
# Entry fields that a check of their own can name (the others show only as HASHED_ONLY).
NAMED_BY_CHECKS = tuple(f for f in ENTRY_FIELDS if f not in HASHED_ONLY)


# The pairs of STORED_FIELDS before the votes must be stored exactly as given for an entry found at its
# cycle to be this copy of it; the votes may differ (another quorum, to be checked by the caller); the
# fields after them (committed_by, committed_at_ms) are informational.
_MATCHED_PAIRS = STORED_FIELDS.index("votes")

# An entry found at its cycle with the entry_hash being appended, its field/value pairs from ARGV[first]
# on: 'exists' when it is this very copy; 'votes:' and the stored votes when only they differ; 'fields'
# when another stored field differs (then the stored copy does not hash to its entry_hash).
_FOUND = """
local function found(key, first, matched)
  for j = first, first + 2 * (matched - 1), 2 do
    if redis.call('HGET', key, ARGV[j]) ~= ARGV[j + 1] then return 'fields' end
  end
  local at = first + 2 * matched
  local votes = redis.call('HGET', key, ARGV[at])
  if votes == ARGV[at + 1] then return 'exists' end
  return 'votes:' .. (votes or '')
end
"""

# KEYS: the entry, cycles, head; ARGV: cycle, padded cycle, entry_hash, prev_entry_hash, _MATCHED_PAIRS,
# then the field/value pairs.
_APPEND = (
    _FOUND
    + """
local existing = redis.call('HGET', KEYS[1], 'entry_hash')
if existing then
  if existing == ARGV[3] then return found(KEYS[1], 6, tonumber(ARGV[5])) end
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
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], 'cycle', ARGV[1], 'entry_hash', ARGV[3])
return 'appended'
"""
)


# A run of consecutive entries in one call: each is checked as `_APPEND` would check it against the
# head the entries before it leave, all before anything is written, so a fork or a hole anywhere in
# the run writes nothing. KEYS: cycles, head, then each entry's key; ARGV: n, args per entry,
# _MATCHED_PAIRS, then per entry cycle, padded cycle, entry_hash, prev_entry_hash and its field/value
# pairs. Returns per entry 1 (written), 0 (this very copy was there) or what `found` says of another.
_APPEND_RUN = (
    _FOUND
    + """
local n, per, matched = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local head = redis.call('HMGET', KEYS[2], 'cycle', 'entry_hash')
local hc, hh = head[1], head[2]
local out, last = {}, nil
for i = 1, n do
  local b = 3 + (i - 1) * per
  local cycle, padded, eh, prev = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local existing = redis.call('HGET', KEYS[2 + i], 'entry_hash')
  if existing then
    if existing ~= eh then
      return redis.error_reply('FORK ' .. i .. ' cycle ' .. cycle .. ' already holds entry ' .. existing)
    end
    local copy = found(KEYS[2 + i], b + 5, matched)
    out[i] = copy == 'exists' and 0 or copy
  else
    if hh then
      if hh ~= prev then
        return redis.error_reply('NOTNEXT ' .. i .. ' prev_entry_hash ' .. prev .. ' is not the head entry '
          .. hh .. ' at cycle ' .. hc)
      end
      if padded <= string.rep('0', 20 - #hc) .. hc then
        return redis.error_reply('NOTNEXT ' .. i .. ' cycle ' .. cycle .. ' is not after the head cycle ' .. hc)
      end
    elseif prev ~= string.rep('0', 64) then
      return redis.error_reply('NOTNEXT ' .. i .. ' the chain is empty, so prev_entry_hash must be 32 zero '
        .. 'bytes, not ' .. prev)
    end
    hc, hh, last = cycle, eh, i
    out[i] = 1
  end
end
for i = 1, n do
  if out[i] == 1 then
    local b = 3 + (i - 1) * per
    redis.call('HSET', KEYS[2 + i], unpack(ARGV, b + 5, b + per))
    redis.call('ZADD', KEYS[1], ARGV[b + 1], ARGV[b + 2])
  end
end
if last then
  redis.call('HSET', KEYS[2], 'cycle', hc, 'entry_hash', hh)
end
return out
"""
)


# KEYS: the entry; ARGV: its entry_hash, then the field/value pairs of a verified copy of it.
_REPAIR = """
if redis.call('HGET', KEYS[1], 'entry_hash') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


@dataclass(frozen=True)
class StoredCopy:
    """What an append found at its cycle: its entry hash, but another copy of the entry. `votes` is the
    stored votes field when only the votes differ (another quorum, or no quorum: the caller checks);
    None when a hashed field differs, so the stored copy does not hash to its entry_hash. Nothing was
    written, so it is falsy, as False is for this very copy found there."""

    votes: str | None

    def __bool__(self) -> bool:
        return False


def _found(reply: Any) -> bool | StoredCopy:
    """An append script's word for an entry it did not write."""
    text = as_text(reply)
    if text in ("exists", "0"):
        return False
    if text.startswith("votes:"):
        return StoredCopy(text[len("votes:") :])
    return StoredCopy(None)


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
        self._append_run = client.register_script(_APPEND_RUN)
        self._repair = client.register_script(_REPAIR)
        self._acknowledge_published = client.register_script(_ACKNOWLEDGE_PUBLISHED)  # once per acknowledged batch
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

    def append(self, committed: CommittedEntry) -> bool | StoredCopy:
        """Append atomically; True if written, False if this very copy of the entry was already there,
        a StoredCopy if the entry was there as another copy (see there)."""
        e = committed.entry
        if e.chain_id != self.chain_id:
            raise LockchainError(f"entry of chain {e.chain_id!r} given to the store of {self.chain_id!r}")
        k = self.keys(e.shard)
        fields = committed.to_redis()
        args: list[str] = [str(e.cycle), cycle_key(e.cycle), fields["entry_hash"], fields["prev_entry_hash"]]
        args.append(str(_MATCHED_PAIRS))
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
        return True if as_text(result) == "appended" else _found(result)

    def append_run(self, run: list[CommittedEntry]) -> list[bool | StoredCopy]:
        """Append consecutive entries of one shard in one atomic call (one round trip): per entry what
        `append` returns. Checked as `append` one by one would check them,
        but before anything is written: ForkError or NotNextError (naming the entry) writes nothing."""
        if len(run) == 1:
            return [self.append(run[0])]
        shard = run[0].entry.shard
        k = self.keys(shard)
        keys = [k.cycles, k.head]
        args: list[str] = [str(len(run)), str(4 + 2 * len(STORED_FIELDS)), str(_MATCHED_PAIRS)]
        for committed in run:
            e = committed.entry
            if e.chain_id != self.chain_id or e.shard != shard:
                raise LockchainError(f"a run holds entries of one chain's one shard, not {e.chain_id!r}/{e.shard}")
            fields = committed.to_redis()
            keys.append(k.entry(e.cycle))
            args += [str(e.cycle), cycle_key(e.cycle), fields["entry_hash"], fields["prev_entry_hash"]]
            for name in STORED_FIELDS:
                args += [name, fields[name]]
        try:
            result = self._append_run(keys=keys, args=args)
        except redis.ResponseError as err:
            kind, _, rest = str(err).partition(" ")
            index, _, msg = rest.partition(" ")
            if kind in ("FORK", "NOTNEXT") and index.isdigit():
                e = run[int(index) - 1].entry
                where = f"shard {e.shard} cycle {e.cycle}: "
                if kind == "FORK":
                    raise ForkError(where + msg + "; refusing to overwrite it") from None
                raise NotNextError(where + msg) from None
            raise
        if self.durability.replicas and any(x == 1 for x in result):
            acked = wait_for_replicas(self.client, k.head, self.durability)
            if acked < self.durability.replicas:
                raise ReplicasLagging(
                    f"shard {shard} cycles {run[0].entry.cycle}..{run[-1].entry.cycle}: only {acked} of "
                    f"{self.durability.replicas} replica(s) acknowledged the append within "
                    f"{self.durability.timeout_ms} ms; it is not published until they do (check the replicas' "
                    "link and lag: INFO replication)"
                )
        return [True if x == 1 else _found(x) for x in result]

    def repair(self, committed: CommittedEntry) -> bool:
        """Write a verified copy of an entry over the stored copy of the same entry (same entry_hash) that
        does not verify; False when its cycle holds another entry or none (then nothing is written)."""
        e = committed.entry
        fields = committed.to_redis()
        args = [fields["entry_hash"]]
        for name in STORED_FIELDS:
            args += [name, fields[name]]
        return int(self._repair(keys=[self.keys(e.shard).entry(e.cycle)], args=args)) == 1

    # -- reading ------------------------------------------------------------------------

    def head(self, shard: int) -> Head | None:
        """The head; ValueError when it is there but cannot be read."""
        cycle, h = self.client.hmget(self.keys(shard).head, "cycle", "entry_hash")
        if h is None:
            return None
        if cycle is None:
            raise ValueError(f"the head of shard {shard} names entry {as_text(h)!r} but no cycle")
        text = as_text(cycle)
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"the head's cycle {text!r} is not a number")
        entry_hash = bytes.fromhex(as_text(h))
        if len(entry_hash) != 32:
            raise ValueError(f"the head's entry_hash has {len(entry_hash)} bytes, not 32")
        return Head(int(text), entry_hash)

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
            bad(name, f"cannot be read ({e}): {_clipped(raw[name])}")
            return out, None
        bad(STORED_FIELDS, f"entry cannot be read: {e}")
        return out, None
    e = ce.entry
    out_of_range = _out_of_range(e)
    if out_of_range:
        bad(out_of_range[0], out_of_range[1])
        return out, None
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


def _out_of_range(e: Entry) -> tuple[str, str] | None:
    """(field, why) for an entry field outside its protocol range (u32 shard, u64 numbers, 1..64-byte chain id)."""
    for name in ("cycle", "receipt_count", "first_offset", "last_offset"):
        if not 0 <= getattr(e, name) < 2**64:
            return name, f"{getattr(e, name)} is out of range (u64)"
    if not 0 <= e.shard < 2**32:
        return "shard", f"{e.shard} is out of range (u32)"
    try:
        size = len(e.chain_id.encode("utf-8"))
    except UnicodeError:
        return "chain_id", f"{e.chain_id!r} is not valid UTF-8"
    if not 1 <= size <= 64:
        return "chain_id", f"has {size} bytes, not 1..64"
    return None


def _clipped(text: str, keep: int = 80) -> str:
    """A stored value as a finding quotes it: whole when short, else its start and its length."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}… ({len(text):,} characters)"


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
        try:
            before = store.previous(shard, from_cycle)
        except (ValueError, KeyError, TypeError) as e:
            report.problems.append(Problem(None, ("cycles",), f"the entry before cycle {from_cycle} cannot be read: "
                                           f"{e!r}; the first link of the range is not checked"))  # fmt: skip
            before, prev_hash = None, None
        else:
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

CHECKPOINT_DOMAIN = b"knhk-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """A peer's progress on a shard, written after its vote is on the votes topic, signed by the peer.

    A peer trusts its checkpoint only when `signature` verifies under its own key
    (protocol "Where a shard starts, commits and resumes"): anyone can write Redis.
    """

    next_offset: int
    entry_hash: bytes
    cycle: int | None
    votes_offset: int
    updated_ms: int
    signature: bytes = b""


def checkpoint_message(chain_id: str, peer_id: str, shard: int, cp: Checkpoint) -> bytes:
    """What a checkpoint's signature covers: a domain, then every field (fixed-width integers).

    `"knhk-checkpoint/1" || str chain_id || str peer_id || u32 shard || u64 next_offset
    || [32] entry_hash || u8 has_cycle || u64 cycle (0 without) || u64 votes_offset || u64 updated_ms`
    """
    for name in ("next_offset", "votes_offset", "updated_ms"):
        if not 0 <= getattr(cp, name) < 2**64:
            raise ValueError(f"checkpoint {name} {getattr(cp, name)} is out of range (u64)")
    if cp.cycle is not None and not 0 <= cp.cycle < 2**64:
        raise ValueError(f"checkpoint cycle {cp.cycle} is out of range (u64)")
    if len(cp.entry_hash) != 32:
        raise ValueError(f"checkpoint entry_hash has {len(cp.entry_hash)} bytes, not 32")
    return b"".join(
        (
            CHECKPOINT_DOMAIN,
            str16(chain_id),
            str16(peer_id),
            u32(shard),
            u64(cp.next_offset),
            cp.entry_hash,
            b"\x01" if cp.cycle is not None else b"\x00",
            u64(cp.cycle or 0),
            u64(cp.votes_offset),
            u64(cp.updated_ms),
        )
    )


def checkpoint_verifies(chain_id: str, peer_id: str, shard: int, cp: Checkpoint, public_keys: Iterable[bytes]) -> bool:
    """Whether the checkpoint's signature verifies under one of `public_keys` (never raises)."""
    try:
        message = checkpoint_message(chain_id, peer_id, shard, cp)
    except (ValueError, UnicodeError, struct.error):
        return False
    return any(verify_signature(pub, message, cp.signature) for pub in public_keys)


_SAVE_CHECKPOINT = """
local cur = redis.call('HMGET', KEYS[1], 'next_offset', 'signature')
local n = tonumber(cur[1])
if n and n > tonumber(ARGV[2]) and (cur[2] or '') ~= ARGV[#ARGV] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 1, #ARGV - 1))
return 1
"""


def save_checkpoint(
    store: LockchainStore, peer_id: str, shard: int, cp: Checkpoint, replace: str | None = None
) -> bool:
    """Write a checkpoint; True when written.

    It only moves forward, so a stale writer (a revoked worker of the same peer)
    cannot move it back: False means a checkpoint further on is stored. `replace`
    is the stored `signature` text of a checkpoint the caller found not to verify
    (forged or damaged): that one is overwritten wherever it points.
    """
    keep_unless = "\x00never" if replace is None else replace  # no stored signature is this text
    result = store.client.eval(
        _SAVE_CHECKPOINT,
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
        "signature",
        cp.signature.hex(),
        keep_unless,
    )
    return int(result) == 1


def stored_checkpoint_signature(store: LockchainStore, peer_id: str, shard: int) -> str | None:
    """The `signature` field of the stored checkpoint as text ("" when it has none), None without one."""
    key = store.keys(shard).checkpoint(peer_id)
    if not store.client.exists(key):
        return None
    v = store.client.hget(key, "signature")
    return "" if v is None else as_text(v)


def load_checkpoint(store: LockchainStore, peer_id: str, shard: int) -> Checkpoint | None:
    """The stored checkpoint, unverified (see `checkpoint_verifies`); ValueError when it cannot be read."""
    got = _texts(store.client.hgetall(store.keys(shard).checkpoint(peer_id)))
    if not got:
        return None
    try:
        cycle = got.get("cycle", "")
        return Checkpoint(
            int(got["next_offset"]),
            bytes.fromhex(got["entry_hash"]),
            int(cycle) if cycle else None,
            int(got.get("votes_offset", "0")),
            int(got.get("updated_ms", "0")),
            bytes.fromhex(got.get("signature", "")),
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"the checkpoint of peer {peer_id!r} for shard {shard} cannot be read: {e!r}") from None


def set_stall(store: LockchainStore, shard: int, cycle: int | None, reason: str = "", at_ms: int = 0) -> None:
    key = store.keys(shard).stall
    if cycle is None:
        store.client.delete(key)
    else:
        store.client.hset(key, mapping={"cycle": str(cycle), "reason": reason, "at_ms": str(at_ms)})


def get_stall(store: LockchainStore, shard: int) -> dict[str, str] | None:
    return _texts(store.client.hgetall(store.keys(shard).stall)) or None


def add_evidence(store: LockchainStore, shard: int, evidence: dict[str, Any]) -> None:
    """Equivocation evidence (both signed votes), kept once per peer and pair of votes.

    Redis is a convenience copy: whoever can write Redis can delete it. The
    append-only copy is the evidence topic (`evidence_out` in runtime/node.py).
    """
    field_name = evidence_key(evidence)
    store.client.hsetnx(store.keys(shard).evidence, field_name, json.dumps(evidence, separators=(",", ":")))


def get_evidence(store: LockchainStore, shard: int) -> list[dict[str, Any]]:
    """The evidence objects kept in Redis, unverified (see `evidence_problem`); unreadable ones are skipped."""
    out = []
    for v in store.client.hgetall(store.keys(shard).evidence).values():
        try:
            obj = loads_json(v)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def evidence_of(ev: Equivocation, reported_by: str, at_ms: int) -> dict[str, Any]:
    """An equivocation as a JSON object: both signed votes, so that anyone can check it."""

    def vote(v: Vote) -> dict[str, Any]:
        return {**v.entry.to_fields(), "entry_hash": v.entry_hash.hex(), "epoch": v.epoch,
                "signature": v.signature.hex()}  # fmt: skip

    return {
        "kind": "equivocation",
        "chain_id": ev.first.entry.chain_id,
        "peer_id": ev.peer_id,
        "shard": ev.shard,
        "cycle": ev.cycle,
        "epoch": ev.epoch,
        "prev_entry_hash": ev.prev_entry_hash.hex(),
        "first": vote(ev.first),
        "second": vote(ev.second),
        "reported_by": reported_by,
        "reported_at_ms": at_ms,
    }


def evidence_key(evidence: dict[str, Any]) -> str:
    """One name per peer and pair of votes (the same evidence from several reporters is one)."""
    pair = sorted(str(evidence.get(k, {}).get("entry_hash", "")) for k in ("first", "second") if isinstance(
        evidence.get(k), dict))  # fmt: skip
    return f"{evidence.get('peer_id')}/{evidence.get('cycle')}/{'/'.join(h[:16] for h in pair)}"


def evidence_problem(settings: ChainSettings, evidence: Any) -> str | None:
    """None when `evidence` proves that its peer signed two successors of one entry in one epoch.

    Both votes must verify under that peer's key of the epoch of their cycles, for
    the same shard, prev_entry_hash and epoch, and different entry hashes (protocol
    "Votes and quorum"). Anything else (forged, garbled, framing an honest peer)
    is not evidence. Never raises.
    """
    try:
        if not isinstance(evidence, dict):
            return "not a JSON object"
        peer_id = evidence["peer_id"]
        votes = []
        for name in ("first", "second"):
            v = evidence[name]
            entry = Entry.from_fields(v)
            if entry.chain_id != settings.chain_id:
                return f"{name} vote is for chain {entry.chain_id!r}, not {settings.chain_id!r}"
            if bytes.fromhex(v["entry_hash"]) != entry.entry_hash:
                return f"{name} vote's entry_hash does not match its fields"
            votes.append((entry, bytes.fromhex(v["signature"])))
        (e1, _), (e2, _) = votes
        if (e1.shard, e1.prev_entry_hash) != (e2.shard, e2.prev_entry_hash):
            return "the two votes are not for successors of one entry of one shard"
        if e1.entry_hash == e2.entry_hash:
            return "the two votes are for the same entry"
        epochs = [settings.epoch_for(e.cycle) for e in (e1, e2)]
        if epochs[0].number != epochs[1].number:
            return "the two votes are in different epochs (a vote in another epoch is not equivocation)"
        pub = epochs[0].public_keys.get(peer_id)
        if pub is None:
            return f"{peer_id!r} is not a peer of epoch {epochs[0].number}"
        for (e, s), name in zip(votes, ("first", "second"), strict=True):
            if not verify_vote(pub, epochs[0].epoch_hash, e.entry_hash, s):
                return f"the {name} vote's signature does not verify under {peer_id!r}'s key"
        if evidence.get("shard") != e1.shard:
            return f"shard {evidence.get('shard')!r} is not the votes' shard {e1.shard}"
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeError, struct.error) as e:
        return f"cannot be read: {type(e).__name__}: {str(e)[:200]}"
    return None


def peer_ids_with_checkpoints(store: LockchainStore, shard: int) -> list[str]:
    prefix = store.keys(shard).checkpoint_prefix
    return sorted(as_text(k)[len(prefix) :] for k in store.client.scan_iter(match=prefix + "*", count=1000))


def get_published(store: LockchainStore, shard: int) -> int | None:
    """The published mark; None without one, or when it is not a cycle (then every root is republished)."""
    v = store.client.get(store.keys(shard).published)
    if v is None:
        return None
    try:
        return int(as_text(v))
    except ValueError:
        return None


# KEYS: the published mark, the roots acknowledged beyond it. ARGV: pairs of (the cycle of the root
# before, 20 digits or "-" for none; the root's cycle, 20 digits). Cycles are compared as zero-padded
# strings, never as Lua numbers (doubles: not exact past 2^53).
_ACKNOWLEDGE_PUBLISHED = """
local mark = redis.call('GET', KEYS[1])
if mark and (#mark > 20 or not string.match(mark, '^%d+$')) then mark = nil end
local at = mark and (string.rep('0', 20 - #mark) .. mark) or '-'
for i = 1, #ARGV - 1, 2 do
  if at == '-' or ARGV[i + 1] > at then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
local moved = false
for _ = 1, tonumber(ARGV[#ARGV]) do
  local nxt = redis.call('HGET', KEYS[2], at)
  if not nxt then break end
  redis.call('HDEL', KEYS[2], at)
  if #nxt ~= 20 or not string.match(nxt, '^%d+$') or (at ~= '-' and nxt <= at) then break end
  at = nxt
  moved = true
end
if moved then redis.call('SET', KEYS[1], (string.gsub(at, '^0+(%d)', '%1'))) end
return moved and 1 or 0
"""
MAX_MARK_STEPS = 10_000  # roots the published mark moves over in one call (Redis runs a script alone)


def acknowledge_published(store: LockchainStore, shard: int, acked: Iterable[tuple[int | None, int]]) -> bool:
    """Record roots the broker acknowledged, each as (cycle of the root before it, its cycle), and move
    the published mark over the unbroken run of acknowledged roots from where it stands, whichever
    peers published them: atomic, so peers that append by turns move it together. True if it moved."""
    keys = store.keys(shard)
    args: list[str] = []
    for prior, cycle in acked:
        args += ["-" if prior is None else cycle_key(prior), cycle_key(cycle)]
    moved = store._acknowledge_published(keys=[keys.published, keys.published_ahead], args=[*args, str(MAX_MARK_STEPS)])
    return int(moved) == 1


# -- what a running peer reports about itself (status) ------------------------------------


def set_health(store: LockchainStore, shard: int, peer_id: str, health: dict[str, Any]) -> None:
    """A peer's report on a shard it holds: halts, alarms, counts (informational: anyone can write it)."""
    store.client.hset(store.keys(shard).health, peer_id, json.dumps(health, separators=(",", ":")))


def get_health(store: LockchainStore, shard: int) -> dict[str, dict[str, Any]]:
    """Each peer's report on the shard; unreadable ones are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in store.client.hgetall(store.keys(shard).health).items():
        try:
            obj = loads_json(v)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out[as_text(k)] = obj
    return out


# -- a committed entry read back from anywhere (Redis, the roots topic) ---------------------


def committed_problem(settings: ChainSettings, ce: CommittedEntry, shard: int | None = None) -> str | None:
    """None when a committed entry stands on its own: fields in range, hash, epoch, quorum. Never raises.

    This is what a peer checks before it trusts an entry read back from Redis or the
    roots topic (protocol: "A peer trusts nothing it reads back from shared storage
    unless it can check it"). The link to the entry before it is the caller's check.
    """
    try:
        e = ce.entry
        out_of_range = _out_of_range(e)
        if out_of_range:
            return f"{out_of_range[0]} {out_of_range[1]}"
        if e.chain_id != settings.chain_id:
            return f"chain_id is {e.chain_id!r}, not {settings.chain_id!r}"
        if shard is not None and e.shard != shard:
            return f"shard is {e.shard}, not {shard}"
        if len(e.root) != 32 or len(e.prev_entry_hash) != 32 or len(ce.entry_hash) != 32:
            return "root, prev_entry_hash and entry_hash must be 32 bytes each"
        if e.entry_hash != ce.entry_hash:
            return f"the fields hash to {e.entry_hash.hex()}, not to the stated entry_hash {ce.entry_hash.hex()}"
        epoch = settings.epoch_for(e.cycle)
        if ce.epoch != epoch.number:
            return f"epoch is {ce.epoch}, but cycle {e.cycle} is in epoch {epoch.number}"
        q = check_quorum(ce.entry_hash, ce.votes, epoch)
        if not q.valid:
            return "no valid quorum proof: " + "; ".join(q.problems)
    except (ValueError, TypeError, AttributeError, UnicodeError, struct.error) as err:
        return f"cannot be checked: {type(err).__name__}: {str(err)[:200]}"
    return None


def read_head_entry(
    store: LockchainStore, settings: ChainSettings, shard: int
) -> tuple[CommittedEntry | None, str | None]:
    """The committed head of a shard, verified: (entry, None), (None, None) without a head, or (None, why not).

    Redis errors (outages) propagate; hostile content never raises.
    """
    try:
        head = store.head(shard)
    except ValueError as e:
        return None, f"the head of shard {shard} cannot be read: {e}"
    if head is None:
        return None, None
    try:
        ce = store.get(shard, head.cycle)
    except (ValueError, KeyError, TypeError) as e:
        return None, f"the head's entry (cycle {head.cycle}) cannot be read: {e!r}"
    if ce is None:
        return None, f"the head names cycle {head.cycle}, which has no stored entry"
    if ce.entry_hash != head.entry_hash or ce.entry.cycle != head.cycle:
        return None, (
            f"the head names entry {head.entry_hash.hex()} at cycle {head.cycle}, but the entry stored there differs"
        )
    problem = committed_problem(settings, ce, shard)
    if problem is not None:
        return None, f"the head's entry (cycle {head.cycle}) does not verify: {problem}"
    return ce, None


def read_verified(
    store: LockchainStore, settings: ChainSettings, shard: int, cycle: int
) -> tuple[CommittedEntry | None, str | None]:
    """The stored entry of one cycle, verified (as `read_head_entry`)."""
    try:
        ce = store.get(shard, cycle)
    except (ValueError, KeyError, TypeError) as e:
        return None, f"the entry of cycle {cycle} cannot be read: {e!r}"
    if ce is None:
        return None, None
    if ce.entry.cycle != cycle:
        return None, f"the entry stored at cycle {cycle} says cycle {ce.entry.cycle}"
    problem = committed_problem(settings, ce, shard)
    return (None, f"the entry of cycle {cycle} does not verify: {problem}") if problem else (ce, None)


# -- pinned heads (a monitor's memory of what it verified) --------------------------------

PIN_FORMAT = "knhk-pins/1"


class PinFileError(KnhkError, ValueError):
    """A pin file that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Pin:
    """The newest head verified on a shard: a later chain must still contain it."""

    cycle: int
    entry_hash: bytes


def load_pins(path: Path, chain_id: str, prefix: str) -> dict[int, Pin]:
    """The pins in `path` ({} when it does not exist yet); PinFileError when it cannot be used."""
    if not path.exists():
        return {}
    advice = (
        f"fix or move away {path} (the next `chain verify --pin` then pins what it verifies); a pin file is "
        "written by `chain verify --pin` only"
    )
    try:
        data = loads_json(path.read_text("utf-8"))
        if not isinstance(data, dict) or data.get("format") != PIN_FORMAT:
            raise ValueError(f"not a {PIN_FORMAT} file")
        if data.get("chain_id") != chain_id or data.get("prefix") != prefix:
            raise PinFileError(
                f"the pin file {path} is for chain {data.get('chain_id')!r} under prefix {data.get('prefix')!r}, "
                f"not chain {chain_id!r} under prefix {prefix!r}: use one pin file per chain and prefix"
            )
        pins: dict[int, Pin] = {}
        for shard, pin in data["shards"].items():
            cycle, entry_hash = pin["cycle"], parse_hash(pin["entry_hash"], f"shard {shard} entry_hash")
            if type(cycle) is not int or cycle < 0 or not shard.isdigit():
                raise ValueError(f"shard {shard!r}: cycle {cycle!r} is not a cycle")
            pins[int(shard)] = Pin(cycle, entry_hash)
        return pins
    except PinFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PinFileError(f"the pin file {path} cannot be read ({type(e).__name__}: {e}): {advice}") from None


def save_pins(path: Path, chain_id: str, prefix: str, pins: dict[int, Pin]) -> None:
    """Write the pins atomically (a new file beside it, then renamed over it)."""
    data = {
        "format": PIN_FORMAT,
        "chain_id": chain_id,
        "prefix": prefix,
        "shards": {str(s): {"cycle": p.cycle, "entry_hash": p.entry_hash.hex()} for s, p in sorted(pins.items())},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    os.replace(tmp, path)


def pin_problems(store: LockchainStore, shard: int, pin: Pin) -> list[Problem]:
    """Findings when the chain no longer contains the pinned head (it was cut short, or replaced)."""
    try:
        stored = store.entry_hashes(shard, [pin.cycle]).get(pin.cycle)
    except ValueError:
        stored = None
    if stored == pin.entry_hash:
        return []
    try:
        head = store.head(shard)
    except ValueError:
        head = None
    where = "it has no chain" if head is None else f"its head is cycle {head.cycle}"
    if stored is None:
        what = (
            f"the chain no longer contains the pinned head of shard {shard}, cycle {pin.cycle} (entry "
            f"{pin.entry_hash.hex()}), verified before; {where}: entries were deleted (truncation)"
        )
    else:
        what = (
            f"shard {shard} cycle {pin.cycle} now holds entry {stored.hex()}, not the pinned {pin.entry_hash.hex()} "
            f"verified before ({where}): the chain was replaced"
        )
    return [Problem(pin.cycle, ("head",), what)]

"""The Redis lockchain store against a real Redis: append, read, verify, tamper."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import redis

from knhk_stream.protocol.committed import CommittedEntry, votes_from_json
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.quorum import Vote, sign
from knhk_stream.store.lockchain import (
    ForkError,
    LockchainStore,
    NotNextError,
    StoredCopy,
    root_key,
    verify_range,
)


def make_chain(settings, peer_keys, n: int, shard: int = 0, start_cycle: int = 100) -> list[CommittedEntry]:
    """n committed entries signed by peers a, b, c; cycles with gaps, offsets increasing."""
    out: list[CommittedEntry] = []
    prev = ZERO_HASH
    offset = 0
    for i in range(n):
        cycle = start_cycle + i * 2
        entry = Entry(settings.chain_id, shard, cycle, H(b"root %d" % i), 3, offset, offset + 4, prev)
        votes = [
            Vote(entry, pid, sign(peer_keys[pid], settings.genesis.epoch_hash, entry.entry_hash))
            for pid in ("peer-a", "peer-b", "peer-c")
        ]
        out.append(CommittedEntry.from_quorum(entry, votes, "peer-b", 1_700_000_000_000 + i))
        prev = entry.entry_hash
        offset += 5
    return out


@pytest.fixture()
def store(redis_url, redis_prefix, settings) -> LockchainStore:
    return LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)


@pytest.fixture()
def chain1000(store, settings, peer_keys) -> list[CommittedEntry]:
    chain = make_chain(settings, peer_keys, 1000)
    for ce in chain:
        assert store.append(ce) is True
    return chain


def test_thousand_entries_round_trip_and_verify(store, settings, chain1000):
    assert store.range(0) == chain1000
    assert store.head(0).cycle == chain1000[-1].entry.cycle
    assert store.head(0).entry_hash == chain1000[-1].entry_hash
    mid = store.range(0, chain1000[10].entry.cycle, chain1000[19].entry.cycle)
    assert mid == chain1000[10:20]
    assert store.get(0, chain1000[5].entry.cycle) == chain1000[5]
    report = verify_range(store, settings, 0)
    assert report.ok, report.problems
    assert report.entries == 1000
    sub = verify_range(store, settings, 0, chain1000[500].entry.cycle, chain1000[600].entry.cycle)
    assert sub.ok and sub.entries == 101


def test_key_layout_matches_protocol(store, redis_url, redis_prefix, settings, chain1000):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    k = f"{redis_prefix}:lockchain:{{knhk/0}}"
    first = chain1000[0]
    stored = client.hgetall(f"{k}:root:{first.entry.cycle:020d}")
    assert stored["entry_hash"] == first.entry_hash.hex()
    assert stored["cycle"] == str(first.entry.cycle)
    assert stored["votes"].startswith('[{"peer_id":"peer-a","signature":"')
    assert client.zscore(f"{k}:cycles", f"{first.entry.cycle:020d}") == first.entry.cycle
    assert client.hgetall(f"{k}:head") == {
        "cycle": str(chain1000[-1].entry.cycle),
        "entry_hash": chain1000[-1].entry_hash.hex(),
    }
    assert root_key(redis_prefix, "knhk", 0, 42) == f"{k}:root:00000000000000000042"


TAMPER = {
    "chain_id": "other",
    "shard": "1",
    "cycle": "7",
    "root": "11" * 32,
    "receipt_count": "4",
    "first_offset": "101",
    "last_offset": "103",
    "prev_entry_hash": "22" * 32,
    "entry_hash": "33" * 32,
    "votes": "[]",
    "epoch": "1",
    "committed_at_ms": "yesterday",
}


@pytest.mark.parametrize("field", sorted(TAMPER))
def test_each_tampered_field_fails_verification_naming_entry_and_field(
    field, store, redis_url, redis_prefix, settings, chain1000
):
    victim = chain1000[20]
    client = redis.Redis.from_url(redis_url)
    client.hset(root_key(redis_prefix, "knhk", 0, victim.entry.cycle), field, TAMPER[field])
    report = verify_range(store, settings, 0)
    assert not report.ok
    named = [p for p in report.problems if p.cycle == victim.entry.cycle and field in p.fields]
    assert named, report.problems


def test_committed_by_is_informational_and_not_checked(store, redis_url, redis_prefix, settings, chain1000):
    """Protocol v2: no signature covers committed_by, so no check may rely on it."""
    victim = chain1000[20]
    client = redis.Redis.from_url(redis_url)
    client.hset(root_key(redis_prefix, "knhk", 0, victim.entry.cycle), "committed_by", "mallory")
    assert verify_range(store, settings, 0).ok


def test_deleted_entry_is_reported_as_hole(store, redis_url, redis_prefix, settings, chain1000):
    client = redis.Redis.from_url(redis_url)
    victim = chain1000[300]
    client.delete(root_key(redis_prefix, "knhk", 0, victim.entry.cycle))
    report = verify_range(store, settings, 0)
    assert [p.cycle for p in report.problems] == [victim.entry.cycle]
    assert "missing" in report.problems[0].message
    # Remove it from the cycles set too: the next entry's link shows the hole.
    client.zrem(f"{store.key(0)}:cycles", f"{victim.entry.cycle:020d}")
    report = verify_range(store, settings, 0)
    assert any(p.cycle == chain1000[301].entry.cycle and "prev_entry_hash" in p.fields for p in report.problems)


def test_unlisted_entry_and_wrong_head_are_reported(store, redis_url, settings, chain1000):
    client = redis.Redis.from_url(redis_url)
    client.zrem(f"{store.key(0)}:cycles", f"{chain1000[-1].entry.cycle:020d}")
    report = verify_range(store, settings, 0)
    fields = {f for p in report.problems for f in p.fields}
    assert {"cycles", "head"} <= fields


def test_concurrent_appends_of_the_same_next_entry_leave_one(store, redis_url, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 2)
    store.append(chain[0])
    results: list[bool] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            mine = LockchainStore.from_url(redis_url, store.chain_id, store.prefix)
            results.append(mine.append(chain[1]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [False] * 7 + [True]
    assert store.cycles(0) == [chain[0].entry.cycle, chain[1].entry.cycle]
    assert verify_range(store, settings, 0).ok


def test_append_refuses_missing_predecessor_and_fork(store, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 3)
    with pytest.raises(NotNextError, match="32 zero bytes"):
        store.append(chain[1])  # empty chain: only a genesis entry may come first
    store.append(chain[0])
    with pytest.raises(NotNextError, match="is not the head"):
        store.append(chain[2])  # its predecessor chain[1] is missing
    store.append(chain[1])
    forked = dataclasses.replace(chain[1].entry, root=H(b"another root"))
    votes = [
        Vote(forked, p, sign(peer_keys[p], settings.genesis.epoch_hash, forked.entry_hash))
        for p in ("peer-a", "peer-b", "peer-c")
    ]
    with pytest.raises(ForkError, match="already holds"):
        store.append(CommittedEntry.from_quorum(forked, votes, "peer-a", 1))
    assert store.append(chain[1]) is False  # the same entry again is a no-op
    assert store.cycles(0) == [chain[0].entry.cycle, chain[1].entry.cycle]
    assert verify_range(store, settings, 0).ok


def test_an_entry_found_as_another_copy_is_reported_and_repair_writes_over_it_only(store, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 3)
    first, second = chain[0], chain[1]
    other_quorum = dataclasses.replace(first, votes=(*first.votes[1:], ("peer-d", bytes(64))), committed_by="x")
    assert store.append(first) is True
    assert store.append(dataclasses.replace(first, committed_by="x", committed_at_ms=5)) is False  # informational
    found = store.append(other_quorum)
    assert isinstance(found, StoredCopy) and not found
    assert votes_from_json(found.votes) == first.votes  # the stored votes, for the caller to check
    k = store.keys(0)
    store.client.hset(k.entry(first.entry.cycle), "root", "ab" * 32)  # a hashed field: no longer its hash
    assert store.append_run([first, second]) == [StoredCopy(None), True]
    assert not verify_range(store, settings, 0).ok
    assert store.repair(first) is True
    assert verify_range(store, settings, 0).ok and store.get(0, first.entry.cycle) == first
    assert store.repair(dataclasses.replace(chain[2], entry_hash=second.entry_hash)) is False  # not its entry
    assert store.repair(chain[2]) is False  # nothing at its cycle: nothing written
    assert store.cycles(0) == [first.entry.cycle, second.entry.cycle]


def test_shards_listed_and_kept_apart(store, settings, peer_keys):
    for shard in (0, 3):
        for ce in make_chain(settings, peer_keys, 3, shard=shard):
            store.append(ce)
    assert store.shards() == [0, 3]
    assert verify_range(store, settings, 3).ok
    assert verify_range(store, settings, 1).entries == 0

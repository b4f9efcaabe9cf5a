"""The chaos checker is not vacuous: fed records, votes, roots and handouts by hand (no broker), with a
chain in a real Redis, it finds each kind of violation it claims to find, and none in a clean run."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from bench.chaos.checker import Checker
from bench.chaos.load import Acked, value_hash
from bench.load import committed, four_peer_keys
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.decode import Delta, Triple, encode_json
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry, record_key
from knhk_stream.protocol.quorum import Vote, sign
from knhk_stream.protocol.wire import encode_root, encode_vote
from knhk_stream.store.lockchain import LockchainStore

pytestmark = pytest.mark.integration  # a real Redis


class Msg:
    def __init__(self, partition: int, offset: int, value: bytes | None, ts: int = 0, key: bytes | None = None):
        self._p, self._o, self._v, self._ts, self._k = partition, offset, value, ts, key

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes | None:
        return self._v

    def key(self) -> bytes | None:
        return self._k

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)


class Tail:
    def __init__(self) -> None:
        self.queue: list[Msg] = []
        self.next = dict.fromkeys(range(4), 0)
        self.at_eof = dict.fromkeys(range(4), True)

    def poll(self, n: int = 5000, timeout: float = 0.0) -> list[Msg]:
        out, self.queue = self.queue, []
        for m in out:
            self.next[m.partition()] = m.offset() + 1
        return out

    def close(self) -> None:
        pass


@pytest.fixture()
def world(redis_url, redis_prefix, tmp_path):
    keys, settings = four_peer_keys()
    tails = (Tail(), Tail(), Tail())
    acked = Acked()
    faulty: list[tuple[str, int, int]] = []
    checker = Checker(
        settings,
        "127.0.0.1:1",
        load_topics(),
        redis_url,
        redis_prefix,
        acked,
        lambda p, t: any(p == q and a <= t <= b for q, a, b in faulty),
        tails=tails,
    )
    # Shard 0: beats of cycles 10, 11 and 12 (two deltas each), and one record of cycle 13 that closes 12.
    values = []
    for i, ts in enumerate((10_000, 10_500, 11_000, 11_500, 12_000, 12_500, 13_000)):
        v = encode_json(Delta((Triple(f"urn:{i}", "urn:p", "o"),), (), f"d{i}"))
        values.append(v)
        tails[0].queue.append(Msg(0, i, v, ts))
        acked.by_shard[0][i] = value_hash(v)
    checker.round()
    replay = checker.replay[0]
    assert [e.cycle for e in replay] == [10, 11, 12]
    store = LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)
    chain = [committed(e, keys, settings, int(time.time() * 1000)) for e in replay]
    yield {
        "checker": checker,
        "tails": tails,
        "keys": keys,
        "settings": settings,
        "store": store,
        "chain": chain,
        "replay": replay,
        "acked": acked,
        "faulty": faulty,
        "tmp": tmp_path,
    }
    checker.stop()


def kinds(checker: Checker) -> list[str]:
    return [v.invariant for v in checker.violations]


def test_a_clean_chain_has_no_violation(world):
    c, store = world["checker"], world["store"]
    for ce in world["chain"]:
        store.append(ce)
    for ce in world["chain"]:
        world["tails"][2].queue.append(
            Msg(0, ce.entry.cycle, encode_root(ce), key=record_key("knhk", 0, ce.entry.cycle).encode())
        )
    c.round()
    c._read_redis(full=True)
    c._check_roots(final=True)
    assert c.violations == []
    assert c.counts["entries_compared"] == 3 and c.counts["roots_on_topic"] == 3


def test_a_changed_entry_and_a_truncated_chain_are_found(world):
    c, store, chain = world["checker"], world["store"], world["chain"]
    for ce in chain:
        store.append(ce)
    c.round()
    assert c.violations == []
    store.client.hset(store.keys(0).entry(11), "root", H(b"other").hex())
    c._read_redis(full=True)
    assert "no_fork_no_hole" in kinds(c)
    k = store.keys(0)
    store.client.delete(k.entry(12))
    store.client.zrem(k.cycles, f"{12:020d}")
    store.client.hset(k.head, mapping={"cycle": 11, "entry_hash": chain[1].entry_hash.hex()})
    c.round()
    assert any("moved back" in v.detail or "no longer in the chain" in v.detail for v in c.violations)


def test_an_entry_that_is_not_the_replay_is_found(world):
    c, store = world["checker"], world["store"]
    e = world["replay"][0]
    wrong = Entry(
        e.chain_id, 0, e.cycle, H(b"not the replay"), e.receipt_count, e.first_offset, e.last_offset, ZERO_HASH
    )
    store.append(committed(wrong, world["keys"], world["settings"], int(time.time() * 1000)))
    c.round()
    assert kinds(c) == ["chain_equals_replay"]


def test_equivocation_and_votes_off_the_replay_are_found_but_not_the_faulty_replicas(world):
    c, keys, settings, replay = world["checker"], world["keys"], world["settings"], world["replay"]
    eh = settings.genesis.epoch_hash

    def vote(peer: str, e: Entry, signer: str | None = None, at: int = 1000) -> Msg:
        return Msg(0, 0, encode_vote(Vote(e, peer, sign(keys[signer or peer], eh, e.entry_hash), at)))

    e10, e11 = replay[0], replay[1]
    twin = Entry(
        e11.chain_id, 0, e11.cycle, e11.root, e11.receipt_count, e11.first_offset, e11.last_offset, e10.prev_entry_hash
    )  # cycle 11's beat chained from genesis too: a second successor
    off = Entry(e10.chain_id, 0, 10, H(b"buggy hook"), 2, 0, 1, ZERO_HASH)
    world["faulty"].append(("peer-d", 500, 1500))
    world["tails"][1].queue += [
        vote("peer-a", e10),
        vote("peer-a", e11),
        vote("peer-b", e10),
        vote("peer-b", twin),
        vote("peer-c", off),
        vote("peer-d", off),
        vote("peer-c", e10, signer="peer-b"),
    ]
    c.round()
    assert sorted(kinds(c)) == ["honest_votes_match_replay", "no_equivocation"]
    assert all("peer-d" not in v.detail for v in c.violations)
    assert "peer-b" in next(v.detail for v in c.violations if v.invariant == "no_equivocation")
    assert c.counts["votes_dissent_faulty"] == 1 and c.counts["votes_bad_signature"] == 1


_clock = itertools.count(1)


def _handouts(path: Path, member: str, lines: list[tuple[str, int, str]]) -> None:
    with path.open("a") as f:
        for k, cycle, h in lines:
            f.write(json.dumps({"t": next(_clock), "m": member, "k": k, "s": 0, "c": cycle, "h": h}) + "\n")


def test_a_root_handed_out_twice_is_found_unless_its_member_crashed_before_committing(world):
    c, store, chain, tmp = world["checker"], world["store"], world["chain"], world["tmp"]
    for ce in chain:
        store.append(ce)
    h = [ce.entry_hash.hex() for ce in chain]
    r1, r2, r3 = tmp / "r1.jsonl", tmp / "r2.jsonl", tmp / "r3.jsonl"
    for name, p in (("r1", r1), ("r2", r2), ("r3", r3)):
        c.add_member(name, p)
    _handouts(r1, "r1", [("root", 10, h[0]), ("ack", 10, ""), ("root", 11, h[1])])  # 11 never acknowledged
    c.killed_readers.add("r1")
    _handouts(r2, "r2", [("root", 11, h[1]), ("ack", 11, ""), ("root", 12, h[2]), ("ack", 12, "")])
    c.round()
    assert c.violations == [] and c.redeliveries == 1 and c.reader_idx[0] == 3
    _handouts(r3, "r3", [("root", 12, h[2])])  # r2 did not crash and had committed 12
    c.round()
    assert kinds(c) == ["reader_exactly_once_in_order"]


def test_unpublished_roots_and_lost_receipts_are_found_at_the_end(world):
    c, store, chain = world["checker"], world["store"], world["chain"]
    for ce in chain[:2]:  # cycle 12 is never committed: its deltas get no receipt in a committed entry
        store.append(ce)
    world["acked"].by_shard[1][0] = 42  # acknowledged, but never on the topic
    out = c.final(audit=False)
    found = kinds(c)
    assert "roots_published" in found and "receipts_exactly_once" in found and "reader_exactly_once_in_order" in found
    assert out["produced"] == 8 and out["committed"] == 4

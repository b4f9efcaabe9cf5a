"""Cutting a peer's per-beat work (issue 14) against a real Redis: a run of entries in one Lua call is
as strict as appends one by one and writes nothing when refused; a peer neither decodes nor verifies
its own votes read back; votes after a quorum are not verified; the chain committed is the same."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import H, cycle_key
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.wire import encode_vote
from knhk_stream.runtime.node import TURNS_BELOW_BEAT_MS, PeerNode, Record
from knhk_stream.store.lockchain import (
    ForkError,
    LockchainError,
    LockchainStore,
    NotNextError,
    acknowledge_published,
    get_published,
    verify_range,
)
from tests.integration.test_store import make_chain
from tests.support.cluster import SHARDS, Cluster


@pytest.fixture()
def store(redis_url, redis_prefix, settings) -> LockchainStore:
    return LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)


def _stored(store: LockchainStore) -> list[CommittedEntry]:
    return store.range(0)


def test_a_run_appends_like_one_by_one_and_verifies(store, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 10)
    assert store.append_run(chain[:3]) == [True, True, True]
    assert store.append_run(chain[1:7]) == [False, False, True, True, True, True]  # the first ones were there
    assert store.append_run(chain[7:]) == [True, True, True]
    assert _stored(store) == chain
    assert store.head(0).entry_hash == chain[-1].entry_hash
    assert verify_range(store, settings, 0).ok


def test_a_run_with_a_fork_writes_nothing(store, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 6)
    assert store.append_run(chain[:3]) == [True] * 3
    other = dataclasses.replace(chain[2].entry, root=H(b"another beat"))
    fork = CommittedEntry.from_quorum(other, [], "peer-d", 1)
    with pytest.raises(ForkError, match=f"cycle {chain[2].entry.cycle}"):
        store.append_run([chain[1], fork, chain[3]])
    assert _stored(store) == chain[:3]
    assert store.head(0).entry_hash == chain[2].entry_hash


def test_a_run_with_a_hole_writes_nothing(store, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 6)
    assert store.append_run(chain[:2]) == [True, True]
    with pytest.raises(NotNextError, match=f"cycle {chain[4].entry.cycle}"):
        store.append_run([chain[2], chain[4], chain[5]])  # chain[3] is missing: chain[4] does not follow
    assert _stored(store) == chain[:2]
    with pytest.raises(NotNextError):
        store.append_run(chain[3:5])  # does not follow the head either
    with pytest.raises(NotNextError, match="not after the head cycle"):
        e = chain[2].entry
        stale = Entry(e.chain_id, 0, chain[1].entry.cycle - 1, e.root, 3, 0, 1, chain[1].entry_hash)
        store.append_run([CommittedEntry.from_quorum(stale, [], "peer-d", 1), chain[2]])
    assert _stored(store) == chain[:2]
    assert store.append_run(chain[2:]) == [True] * 4
    assert verify_range(store, settings, 0).ok


def test_a_run_refuses_entries_of_another_shard(store, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 2) + make_chain(settings, peer_keys, 1, shard=1)
    with pytest.raises(LockchainError, match="one shard"):
        store.append_run(chain)
    assert _stored(store) == []


def _nodes(settings, peer_keys, store) -> dict[str, PeerNode]:
    nodes = {p: PeerNode(settings, p, k, store) for p, k in peer_keys.items()}
    for n in nodes.values():
        n.assign(0)
    return nodes


def _beats(nodes: dict[str, PeerNode], beats: int) -> list:
    """Feed every node the same records, a beat each: the votes of all, in the order they were made."""
    beat = 8 * next(iter(nodes.values())).settings.tick_ms
    votes = []
    for b in range(beats + 1):
        rec = Record(0, b, (1000 + b) * beat, None, b'{"additions":[["s","p","%d"]]}' % b)
        for n in nodes.values():
            votes += [(n, v) for v in n.process([rec])]
    return votes


def _commit_all(*nodes: PeerNode) -> None:
    """commit_ready until nothing is left: the last cycles may be other peers' turns, waited for."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for n in nodes:
            n.commit_ready()
        if all(n.consensus.ready_run(0, 1) == [] for n in nodes):
            return
        time.sleep(0.01)
    raise AssertionError("entries with a quorum were left uncommitted")


def test_own_votes_are_not_decoded_or_verified_and_the_chain_is_the_same(store, settings, peer_keys):
    nodes = _nodes(settings, peer_keys, store)
    a = nodes["peer-a"]
    made = _beats(nodes, 30)
    records = [Record(0, i, 0, None, n.vote_record(v).value) for i, (n, v) in enumerate(made)]
    a.on_vote_records(records)
    assert not a._own_votes  # each of its own records was recognized as made, so taken as verified
    _commit_all(a)
    stored = _stored(store)
    assert [ce.entry.cycle for ce in stored] == list(range(1000, 1030))
    # peer-d's vote of each beat came after the quorum: neither verified nor counted, nor in the entry
    assert all([p for p, _ in ce.votes] == ["peer-a", "peer-b", "peer-c"] for ce in stored)
    assert verify_range(store, settings, 0).ok
    assert a.stats["appended"] == 30 and a.stats["bad_records"] == 0


def test_a_forged_copy_of_an_own_vote_is_verified(store, settings, peer_keys):
    """Only the exact bytes this node made skip the checks: a record with another signature is checked."""
    nodes = _nodes(settings, peer_keys, store)
    a = nodes["peer-a"]
    made = _beats(nodes, 1)
    own = next(v for n, v in made if n is a)
    a.vote_record(own)
    forged = dataclasses.replace(own, signature=bytes(64))
    a.on_vote_records([Record(0, 0, 0, None, encode_vote(forged))])
    assert a.stats["bad_records"] == 1
    assert a.consensus.collector.held_votes(0) == 0


@pytest.fixture()
def short_beats(settings):
    """tick_ms 1 (8 ms beats): where the first appenders take turns (beats under TURNS_BELOW_BEAT_MS)."""
    return dataclasses.replace(settings, tick_ms=1)


def test_first_appenders_take_turns_and_each_writes_only_its_own_turns(store, short_beats, peer_keys):
    """Each cycle has one first appender (peer ids in order, by turns): a peer appends as soon as a run of
    ready entries holds one of its turns, up to its last turn in it (the entries before ride along, found
    there or written), never past it."""
    nodes = _nodes(short_beats, peer_keys, store)
    made = _beats(nodes, 24)
    records = [Record(0, i, 0, None, n.vote_record(v).value) for i, (n, v) in enumerate(made)]
    turns = sorted(nodes)
    for n in nodes.values():
        n.on_vote_records(records)
    for n in nodes.values():  # each appends its turns (and what comes before them) at once
        n.commit_ready()
    wrote = {p: sorted(ce.entry.cycle for ce in store.range(0) if ce.committed_by == p) for p in nodes}
    assert [ce.entry.cycle for ce in store.range(0)] == list(range(1000, 1024))
    # peer-a looked first: everything up to its last turn (1020); each of the others then its own turn
    assert wrote == {"peer-a": list(range(1000, 1021)), "peer-b": [1021], "peer-c": [1022], "peer-d": [1023]}
    assert [turns[c % 4] for c in (1020, 1021, 1022, 1023)] == ["peer-a", "peer-b", "peer-c", "peer-d"]
    _commit_all(*nodes.values())  # the others confirm later (found there: nothing written twice)
    assert sum(n.stats["appended"] for n in nodes.values()) == 24
    assert verify_range(store, short_beats, 0).ok


def test_at_long_beats_the_first_peer_holding_a_quorum_appends_every_turn(store, settings, peer_keys):
    """At tick_ms 125 (1 s beats) nobody waits for a turn: the first peer holding the quorums appends
    them all at once, and the others find them there (nothing written twice)."""
    assert 8 * settings.tick_ms >= TURNS_BELOW_BEAT_MS
    nodes = _nodes(settings, peer_keys, store)
    made = _beats(nodes, 12)
    records = [Record(0, i, 0, None, n.vote_record(v).value) for i, (n, v) in enumerate(made)]
    for n in nodes.values():
        n.on_vote_records(records)
    first, *others = nodes.values()
    first.commit_ready()
    assert [ce.entry.cycle for ce in store.range(0)] == list(range(1000, 1012))
    assert {ce.committed_by for ce in store.range(0)} == {first.peer_id}
    for n in others:
        n.commit_ready()
    assert sum(n.stats["appended"] for n in nodes.values()) == 12
    assert verify_range(store, settings, 0).ok


def test_a_dead_first_appender_delays_nothing_but_its_own_last_turn(store, short_beats, peer_keys):
    """peer-d never runs (threshold 3 of 4): its turns are appended by the next peer whose turn comes,
    in the same run, and the last one after the wait. Every cycle is committed."""
    nodes = _nodes(short_beats, {p: k for p, k in peer_keys.items() if p != "peer-d"}, store)
    made = _beats(nodes, 16)  # cycles 1000..1015: peer-d's turns are 1003, 1007, 1011 and 1015
    records = [Record(0, i, 0, None, n.vote_record(v).value) for i, (n, v) in enumerate(made)]
    for n in nodes.values():
        n.on_vote_records(records)
    for n in nodes.values():
        n.commit_ready()
    assert [ce.entry.cycle for ce in store.range(0)] == list(range(1000, 1015))  # 1015 waits for peer-d
    time.sleep(0.03)  # FIRST_APPENDER_WAIT_S at most
    for n in nodes.values():
        n.commit_ready()
    stored = store.range(0)
    assert [ce.entry.cycle for ce in stored] == list(range(1000, 1016))
    assert {ce.committed_by for ce in stored if ce.entry.cycle % 4 == 3} <= {"peer-a", "peer-b", "peer-c"}
    assert verify_range(store, short_beats, 0).ok


@pytest.fixture()
def cluster(tmp_path, broker, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    yield c
    c.close()


@pytest.mark.integration
def test_real_workers_commit_every_beat_with_a_first_appender_dead(cluster):
    """Three of four workers (threshold 3): peer-d, the first appender of every fourth cycle, never runs.
    Its turns are appended by the others; every delta is committed, each cycle once, and the chain verifies."""
    for p in ("peer-a", "peer-b", "peer-c"):
        cluster.start(p)
    cluster.wait_joined("peer-a", "peer-b", "peer-c")
    cluster.produce(3000, rate=3000)
    cluster.wait_all_committed()
    assert cluster.committed_receipts() == cluster.delta_records()
    for shard in range(SHARDS):
        stored = cluster.store.range(shard)
        assert all(ce.committed_by != "peer-d" for ce in stored)
        assert verify_range(cluster.store, cluster.settings, shard).ok
    cluster.assert_chains_match_replay()


def test_process_iter_hands_each_vote_out_when_its_beat_closes(store, settings, peer_keys):
    """A backlog batch: the vote of the beat closed by its second record comes out before the rest of
    the batch is read, and the votes are those `process` returns for the same records."""
    beat = 8 * settings.tick_ms
    value = b'{"additions":[["s","p","o"]]}'
    # offset 0 in cycle 1000, offsets 1..1999 in cycle 1001 (offset 1 closes 1000), offset 2000 in 1002
    batch = [Record(0, i, (1000 + (i > 0)) * beat + i % beat, None, value) for i in range(2000)]
    batch.append(Record(0, 2000, 1002 * beat, None, value))
    pulled = []

    def feed():
        for r in batch:
            pulled.append(r.offset)
            yield r

    node = PeerNode(settings, "peer-a", peer_keys["peer-a"], store)
    node.assign(0)
    seen = []
    for vote in node.process_iter(feed()):
        seen.append((vote, len(pulled)))
    assert [(v.entry.cycle, n) for v, n in seen] == [(1000, 2), (1001, 2001)]
    other = PeerNode(settings, "peer-a", peer_keys["peer-a"], store)  # nothing was written: it starts the same
    other.assign(0)
    again = other.process(batch)
    assert [(v.entry, v.signature) for v in again] == [(v.entry, v.signature) for v, _ in seen]  # voted_at aside
    assert node.stats["deltas"] == 2001 and node.stats["votes"] == 2


def test_roots_acknowledged_out_of_turn_order_move_the_published_mark_to_the_head(store, short_beats, peer_keys):
    """By turns, consecutive roots are published by different peers and their acknowledgements come in
    any order: the mark moves over all of them as the last one comes, not a peer's own run at a time
    (which left it seconds behind at tick_ms 1, and every peer republishing what was on the topic)."""
    nodes = _nodes(short_beats, peer_keys, store)
    made = _beats(nodes, 24)
    records = [Record(0, i, 0, None, n.vote_record(v).value) for i, (n, v) in enumerate(made)]
    for n in nodes.values():
        n.on_vote_records(records)
    published = {p: n.commit_ready() for p, n in nodes.items()}
    assert {p: len(v) for p, v in published.items()} == {"peer-a": 21, "peer-b": 1, "peer-c": 1, "peer-d": 1}
    for p in ("peer-d", "peer-c", "peer-b"):  # the later turns acknowledged first
        nodes[p].roots_delivered(published[p])
        assert get_published(store, 0) is None
    nodes["peer-a"].roots_delivered(published["peer-a"])
    assert get_published(store, 0) == 1023 == store.head(0).cycle
    assert store.client.hlen(store.keys(0).published_ahead) == 0  # nothing left beyond the mark


def test_the_published_mark_moves_over_unbroken_runs_only_and_survives_hostile_fields(store):
    """Acknowledgements beyond a gap wait for it; a root acknowledged twice or behind the mark changes
    nothing; a field that would move the mark back, or is not a cycle, stops the walk and is dropped."""
    assert acknowledge_published(store, 0, [(1000, 1001), (1001, 1002)]) is False  # 1000 is not acknowledged
    assert get_published(store, 0) is None
    assert acknowledge_published(store, 0, [(None, 1000)]) is True
    assert get_published(store, 0) == 1002
    assert acknowledge_published(store, 0, [(1001, 1002), (None, 1000)]) is False  # behind the mark: ignored
    assert store.client.hlen(store.keys(0).published_ahead) == 0
    assert acknowledge_published(store, 0, [(1003, 1004)]) is False  # 1003 missing: waits
    assert acknowledge_published(store, 0, [(1002, 1003)]) is True
    assert get_published(store, 0) == 1004
    ahead = store.keys(0).published_ahead
    store.client.hset(ahead, mapping={cycle_key(1004): cycle_key(7), cycle_key(7): cycle_key(9)})  # backwards
    assert acknowledge_published(store, 0, []) is False
    assert get_published(store, 0) == 1004
    store.client.hset(ahead, cycle_key(1004), "not a cycle")
    assert acknowledge_published(store, 0, []) is False
    assert get_published(store, 0) == 1004
    big = 2**64 - 2  # compared as 20-digit strings: exact where Lua's numbers are not
    store.client.set(store.keys(0).published, str(big - 1))
    assert acknowledge_published(store, 0, [(big - 1, big)]) is True
    assert get_published(store, 0) == big


@pytest.mark.integration
def test_real_workers_at_tick_ms_1_publish_each_root_once_and_the_marks_keep_up(tmp_path, broker, redis_url):
    """Four workers appending by turns at 8 ms beats for 8 s: the published marks follow the heads, so
    no peer republishes roots the topic already has (before, the marks fell seconds behind and every
    peer republished each 5 s what had been published: twice as many records on the roots topic)."""
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    c.use_tick_ms(1)
    try:
        c.start_all()
        c.wait_joined(*c.procs)
        c.produce(4000, rate=500, burst=4)  # a delta per shard every 8 ms: about a thousand beats each
        c.wait_all_committed()

        def marks() -> dict[int, tuple[int | None, int | None]]:
            return {s: (get_published(c.store, s), c.store.head(s).cycle) for s in range(SHARDS)}

        c.wait_until(lambda: all(m == h for m, h in marks().values()), 30, "the published marks at the heads", marks)
        roots = [m.key() for ms in c.read_topic(c.topics.roots.name).values() for m in ms]
        entries = sum(len(c.store.range(s)) for s in range(SHARDS))
        assert len(set(roots)) == entries
        assert len(roots) - entries <= entries // 100, f"{len(roots) - entries} roots republished of {entries}"
        assert not any("were still not on the roots topic" in c.log(p) for p in c.procs)
    finally:
        c.close()

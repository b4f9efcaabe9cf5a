"""Tick markers wait for the shard's delivery lag: a beat whose closing record is merely late gets no
marker, an idle shard's beat still does, and records stamped far back cannot hold markers back.

Before, a marker was due a tick after the beat's end by wall clock. At tick_ms 1, with records read
some 170 ms late on the embedded broker, every peer wrote a marker for nearly every beat: 8,911
markers for 20,000 deltas in 10 s (each read by every peer), and the deltas after a marker merged
into fewer beats.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from knhk_stream.protocol.beats import beat_end_ms
from knhk_stream.runtime.node import MAX_MARKER_DELAY_MS, PeerNode, Record
from knhk_stream.store.lockchain import LockchainStore
from tests.support.cluster import SHARDS, Cluster


@pytest.fixture()
def node(redis_url, redis_prefix, settings, peer_keys) -> PeerNode:
    """A peer at tick_ms 1: a beat's records are stamped within 8 ms of each other."""
    short = dataclasses.replace(settings, tick_ms=1)
    store = LockchainStore.from_url(redis_url, short.chain_id, redis_prefix)
    n = PeerNode(short, "peer-a", peer_keys["peer-a"], store)
    n.assign(0)
    return n


def _record(offset: int, ts: int) -> Record:
    return Record(0, offset, ts, None, b'{"additions":[["s","p","%d"]]}' % offset)


def _open_beat_at(node: PeerNode, lag_ms: int, records: int = 40) -> int:
    """Feed records read `lag_ms` after their timestamps, all in the current beat; its cycle."""
    tick = node.settings.tick_ms
    now = int(time.time() * 1000)
    cycle = (now - lag_ms) // (8 * tick)
    for i in range(records):
        node.process([_record(i, cycle * 8 * tick + 1)])
    return cycle


def test_no_marker_before_the_beat_end_plus_the_delivery_lag(node: PeerNode):
    lag = 300
    cycle = _open_beat_at(node, lag)
    end = beat_end_ms(cycle, node.settings.tick_ms)
    wait = node._lag[0].wait_ms
    assert lag <= wait <= lag + 50  # the lag those records were read with
    assert node.markers_due(end + node.settings.tick_ms + 1) == []  # before: a marker here
    assert node.markers_due(end + node.settings.tick_ms + wait + 1) == [0]


def test_an_idle_shard_still_gets_its_marker_soon_after_the_beat_end(node: PeerNode):
    cycle = _open_beat_at(node, 0)
    end = beat_end_ms(cycle, node.settings.tick_ms)
    wait = node._lag[0].wait_ms
    assert wait < 50
    assert node.markers_due(end + node.settings.tick_ms + wait + 1) == [0]


def test_records_stamped_far_back_cannot_hold_markers_back(node: PeerNode):
    """A producer's records stamped a day ago: T does not move back, so the lag stays what it was."""
    cycle = _open_beat_at(node, 0, records=5)
    for i in range(5, 200):
        node.process([_record(i, int(time.time() * 1000) - 86_400_000)])
    assert node.engine.open_beat(0)[0] == cycle
    wait = node._lag[0].wait_ms
    assert wait < 50  # a day's lag, were the records' own timestamps taken
    end = beat_end_ms(cycle, node.settings.tick_ms)
    assert node.markers_due(end + node.settings.tick_ms + wait + 1) == [0]


def test_the_wait_is_bounded(node: PeerNode):
    _open_beat_at(node, 60_000)  # a reader a minute behind (a backlog), or a clock a minute ahead
    assert node._lag[0].wait_ms == MAX_MARKER_DELAY_MS


@pytest.mark.integration
def test_real_workers_at_tick_ms_1_write_few_markers_while_deltas_flow(tmp_path: Path, broker, redis_url):
    """Four workers at 8 ms beats, 2,000 deltas/s for 8 s: markers stay a small part of the topic, and
    once the deltas stop the last beats still close (every delta committed). Measured: ~5% of the deltas."""
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    c.use_tick_ms(1)
    try:
        c.start_all()
        c.wait_joined(*c.procs)
        c.produce(16_000, rate=2000, burst=4, malformed_every=0)
        c.wait_all_committed()
        records = [m for ms in c.read_topic(c.topics.deltas.name).values() for m in ms]
        markers = sum(1 for m in records if not m.value())
        assert len(records) - markers == 16_000
        assert markers < 16_000 // 8, f"{markers} markers for 16,000 deltas (6,672 before the wait)"
        assert c.committed_receipts() == 16_000
        assert sum(len(c.store.range(s)) for s in range(SHARDS)) > 0
    finally:
        c.close()


def test_a_backlog_just_read_does_not_hold_the_next_idle_beat_back(node: PeerNode):
    """A peer catching up reads records seconds late; once it has caught up, the shard's next idle beat
    gets its marker right after its end, not up to a second later."""
    now = int(time.time() * 1000)
    for k in range(20):  # a backlog read in 20 batches, from 5 s late to caught up
        node.process([_record(k, now - 5000 + k * 250)])
    node.process([_record(20, int(time.time() * 1000))])
    assert node._lag[0].wait_ms < 50
    cycle = node.engine.open_beat(0)[0]
    end = beat_end_ms(cycle, node.settings.tick_ms)
    assert node.markers_due(end + node.settings.tick_ms + node._lag[0].wait_ms + 1) == [0]

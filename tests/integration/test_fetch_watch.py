"""The worker's fetch watch: a shard whose fetching stops is noticed and fetched again.

The embedded broker stalls fetches after a few million records (docs/tansu.md),
which no test can wait for; here the fetcher of one shard is stopped from
outside (librdkafka's pause, which the worker does not know of), the way a
stalled fetch looks to the worker: its position stays put while the tick
markers it writes are acknowledged after it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
from confluent_kafka import TopicPartition

from knhk_stream.protocol.quorum import load_private_key
from knhk_stream.runtime.worker import Worker, WorkerOptions
from tests.support.cluster import Cluster

pytestmark = pytest.mark.integration


def test_a_shard_whose_fetching_stops_is_logged_and_fetched_again(tmp_path, broker, redis_url, caplog):
    c = Cluster(tmp_path, broker.bootstrap, redis_url, peers=("peer-a",))
    c.settings = dataclasses.replace(c.settings, threshold=1)  # one peer commits alone
    opts = WorkerOptions(
        bootstrap=broker.bootstrap, redis_url=redis_url, prefix=c.prefix, topics=c.topics,
        group_id=f"knhk.{c.topic_prefix}.peer-a", session_timeout_ms=6000, allow_producer_timestamps=True,
    )  # fmt: skip
    w = Worker(c.settings, "peer-a", load_private_key(tmp_path / "peer-a.pem"), opts)
    done = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"until": done.is_set}, daemon=True)
    caplog.set_level(logging.WARNING, logger="knhk_stream.runtime.worker")
    try:
        t.start()
        c.wait_until(lambda: len(w.node.shards) == 4, 60, "the worker to take its shards")
        c.produce(40, rate=0)
        c.wait_until(lambda: c.committed_receipts() == 40, 30, "the first deltas committed")
        # Stop shard 0's fetcher mid-stream (the worker is not told), so its open beat holds deltas and the
        # worker keeps writing markers to close it: they are acknowledged after a position that stays put.
        feeding = threading.Event()

        def feed_steadily() -> None:  # one delta per shard every 40 ms, until told to stop: never a burst then silence
            while not feeding.is_set():
                c.produce(4, rate=0)
                time.sleep(0.04)

        feed = threading.Thread(target=feed_steadily, daemon=True)
        feed.start()
        tp = TopicPartition(c.topics.deltas.name, 0)
        for _ in range(10):  # paused at a moment its open beat holds deltas (not just after a marker closed it)
            c.wait_until(lambda: w.node.engine.open_beat(0)[2] > 0, 30, "shard 0's open beat to hold deltas")
            w.deltas.pause([tp])
            time.sleep(0.5)  # a step in flight may still hand over what it fetched
            if w.node.engine.open_beat(0)[2] > 0:
                break
            w.deltas.resume([tp])
        time.sleep(1)
        feeding.set()
        feed.join(30)
        c.wait_until(lambda: w.stats.get("fetch_restarts", 0) > 0, 40, "the fetch watch to notice shard 0",
                     lambda: (w._marker_acked, w._fetch_seen, w.node.engine.open_beat(0), w.stats))  # fmt: skip
        said = [r.getMessage() for r in caplog.records if "nothing read past offset" in r.getMessage()]
        assert said and all(m.startswith("shard 0: ") for m in said), said
        assert "fetching again from" in said[0]
        time.sleep(12)  # another round of the watch at the same position: fetched again, not logged again
        assert len([r for r in caplog.records if "nothing read past offset" in r.getMessage()]) == len(said)
        w.deltas.resume([tp])
        c.produce(40, rate=0)
        c.wait_until(lambda: c.committed_receipts() == c.produced, 30, "shard 0 to go on",
                     lambda: (c.committed_receipts(), c.produced))  # fmt: skip
    finally:
        done.set()
        t.join(30)
        c.close()
    assert not t.is_alive()

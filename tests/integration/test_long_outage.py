"""A Redis outage longer than the vote bounds: the peers catch up once Redis answers again.

At tick_ms 1 a beat lasts 8 ms, so a 6 s outage leaves hundreds of beats voted
but not committed: more than the 64-cycle window and the per-peer share of held
votes (protocol "Quorum"). Votes dropped by those bounds must be read again once
the head moves, or no quorum ever forms for those beats and every shard stalls.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.cluster import Cluster
from tests.support.redis_servers import Server, free_port, need_binaries


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    need_binaries()
    s = Server(free_port(), tmp_path / "redis").start()
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.send_signal(signal.SIGCONT)
    s.kill()


def _committed(c: Cluster) -> int | None:
    try:
        return c.committed_receipts()
    except redis.RedisError:
        return None


def test_peers_catch_up_after_a_redis_outage_of_hundreds_of_beats(tmp_path: Path, broker, server):
    (tmp_path / "peers").mkdir()
    c = Cluster(tmp_path / "peers", broker.bootstrap, server.url)
    c.use_tick_ms(1)
    try:
        c.start_all()
        c.produce(400, rate=400)
        c.wait_until(lambda: _committed(c) == c.produced, 60, "the first deltas committed", lambda: _committed(c))
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # Redis hangs: every append and checkpoint times out
        try:
            c.produce(3000, rate=500)  # 6 s: about 750 beats of 8 ms, with markers between
        finally:
            server.proc.send_signal(signal.SIGCONT)
        c.wait_until(lambda: _committed(c) == c.produced, 120, f"all {c.produced} receipts committed after the outage",
                     lambda: (_committed(c), {s: c.store.head(s) for s in range(4)}))  # fmt: skip
        c.stop_all()
        c.assert_chains_match_replay()
        c.assert_no_equivocation()
    finally:
        c.close()


def test_peers_catch_up_after_two_of_four_pause_for_hundreds_of_beats(tmp_path: Path, broker, redis_url):
    """Two peers of four stop for 4 s (under the 6 s session timeout: no rebalance): the other two go on
    voting some 500 beats that no quorum can commit, past their share of held votes, so they drop votes
    (their own too). Once the two resume, those votes must be read again, or every shard stalls."""
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    c.use_tick_ms(1)
    try:
        c.start_all()
        c.produce(400, rate=400)
        c.wait_until(lambda: c.committed_receipts() == c.produced, 60, "the first deltas committed")
        for name in ("peer-c", "peer-d"):
            c.procs[name].send_signal(signal.SIGSTOP)
        try:
            c.produce(2000, rate=500, burst=4)  # 4 s, a delta per shard every 8 ms: about 500 beats each
        finally:
            for name in ("peer-c", "peer-d"):
                c.procs[name].send_signal(signal.SIGCONT)
        c.wait_until(lambda: c.committed_receipts() == c.produced, 120, f"all {c.produced} receipts committed",
                     lambda: (c.committed_receipts(), {s: c.store.head(s) for s in range(4)}))  # fmt: skip
        c.stop_all()
        c.assert_chains_match_replay()
        c.assert_no_equivocation()
        dropped = sum(c.log(n).count("read the votes partition again") for n in ("peer-a", "peer-b"))
        assert dropped > 0, "the two running peers never dropped a vote: the pause did not pass the bounds"
    finally:
        c.close()

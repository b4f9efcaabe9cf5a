"""Redis restarted empty mid-run (no persistence): peers restore the chain from the roots topic and go on.

Two losses on one private redis-server (`--save "" --appendonly no`, so a restart
is empty): one under running peers (they re-append what they saw committed), and
one while every worker is down, so each peer takes its shards against an empty
Redis and must restore them from the roots topic before it resumes, rather than
start a new genesis.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from knhk_stream.store.lockchain import Head, get_health
from tests.support.cluster import SHARDS, Cluster
from tests.support.redis_servers import Server, free_port, need_binaries

RESUMED = re.compile(r"shard (\d+): resume at offset (\d+) after cycle (\w+)")


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    need_binaries()
    s = Server(free_port(), tmp_path / "redis").start()
    yield s
    s.kill()


def _restart_empty(server: Server) -> None:
    """Kill the server and start it again on the same port: without persistence it comes back empty.

    Running peers may write again at once, so what shows it is that the new process loaded nothing."""
    before = server.client().info("server")["run_id"]
    server.kill()
    server.start()
    info = server.client().info()
    assert info["run_id"] != before and info["aof_enabled"] == 0 and info["rdb_last_load_keys_loaded"] == 0


def _committed(c: Cluster) -> int | None:
    """Committed receipts, or None while this test's own client reconnects."""
    try:
        return c.committed_receipts()
    except redis.RedisError:
        return None


def _heads(c: Cluster) -> dict[int, Head | None]:
    return {s: c.store.head(s) for s in range(SHARDS)}


def test_redis_restarted_empty_peers_restore_from_the_roots_topic_and_go_on(tmp_path: Path, broker, server):
    (tmp_path / "peers").mkdir()
    c = Cluster(tmp_path / "peers", broker.bootstrap, server.url)
    peers = [p.id for p in c.settings.peers]
    try:
        c.start_all()
        c.produce(600, rate=600)
        c.wait_all_committed()

        # 1. Redis restarts empty under running peers: they put back what they saw committed (or commit it
        # again from the votes topic, if they had not seen it yet), and go on.
        _restart_empty(server)
        c.produce(400, rate=600)
        c.wait_until(lambda: _committed(c) == c.produced, 120, f"{c.produced} receipts committed after the loss",
                     lambda: _committed(c))  # fmt: skip
        c.stop_all()

        # 2. Redis restarts empty while every worker is down: each one takes its shards against an empty
        # Redis, with no checkpoint and no head, while the roots topic proves every chain went further.
        before = _heads(c)
        assert all(h is not None for h in before.values())
        _restart_empty(server)
        again = [f"{p}-again" for p in peers]
        for p, name in zip(peers, again, strict=True):
            c.start(p, name=name)
        c.wait_joined(*again, timeout=120)
        c.produce(400, rate=600)
        c.wait_until(lambda: _committed(c) == c.produced, 120, f"{c.produced} receipts committed after the restart",
                     lambda: _committed(c))  # fmt: skip
        c.stop_all()

        logs = {name: c.log(name) for name in again}
        for name, text in logs.items():  # no new genesis, no older head: every shard resumed after its head
            resumed = {int(s): cycle for s, _off, cycle in RESUMED.findall(text)}
            assert sorted(resumed) == list(range(SHARDS)), f"{name}: {resumed}"
            for shard, cycle in resumed.items():
                head = before[shard]
                assert head is not None and cycle != "None" and int(cycle) >= head.cycle, (
                    f"{name} resumed shard {shard} after cycle {cycle}, but the roots topic proves cycle "
                    f"{head.cycle if head else None}"
                )
        everything = "".join(logs.values())
        for shard in range(SHARDS):
            head = before[shard]
            assert head is not None
            said = f"shard {shard}: Redis held no chain but the roots topic proves cycle {head.cycle}: restored "
            assert said in everything, f"no peer said it restored shard {shard}"
            alarms = [a for report in get_health(c.store, shard).values() for a in report.get("alarms", [])]
            assert any(a["kind"] == "restored_from_roots" for a in alarms), alarms

        for shard, chain in c.chains().items():  # no fork, no repeated cycle, from genesis on
            cycles = [ce.entry.cycle for ce in chain]
            assert cycles == sorted(set(cycles)), f"shard {shard}: repeated or unordered cycles"
        c.assert_chains_match_replay()  # every chain verifies and equals a replay of its shard
        c.assert_no_equivocation()
        assert c.committed_receipts() == c.delta_records() == c.produced == 1400
    finally:
        c.close()

"""Regressions found by the chaos campaign (issue 15, `make chaos`), each fault reproduced on its own.

These tests stay in, not skipped, also while they fail: each one names the fault, the invariant it
broke and what the campaign saw.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from bench.chaos.services import RedisServer
from knhk_stream.kafka.admin import apply_topics
from knhk_stream.kafka.topics import load_topics
from knhk_stream.runtime.demo import start_worker, write_chain

pytestmark = pytest.mark.integration


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def test_worker_started_during_a_redis_outage_waits_for_redis(tmp_path, broker):
    """Fault: a worker restarted (after SIGKILL or SIGTERM) while redis-server is down (redis_kill overlapping).

    Invariant: no worker exits except the ones killed; docs/deployment.md: "Redis outages. Votes go on;
    commits and checkpoints wait and resume. Taking a shard (at start or after a rebalance) waits for
    Redis." Seen in the campaign: the new worker printed `Error: cannot reach Redis: Error 111 connecting
    to 127.0.0.1:<port>. Connection refused.` and exited with status 1 within a second (the start-up
    `ping()` in Worker.__init__), so the peer stayed down after Redis came back, and with a second peer
    down too the shards stopped committing.
    """
    redis_server = RedisServer(tmp_path)  # its port is chosen, nothing listens on it yet
    run = uuid.uuid4().hex[:8]
    topic_prefix = f"reg{run}"
    apply_topics(broker.bootstrap, load_topics().renamed(topic_prefix).with_partitions(4))
    write_chain(tmp_path)
    worker = start_worker(tmp_path, "peer-a", broker.bootstrap, redis_server.url, f"knhkreg-{run}", topic_prefix,
                          ("--allow-producer-timestamps", "--group-id", f"knhk.{topic_prefix}.peer-a"))  # fmt: skip
    log = tmp_path / "peer-a.log"
    try:
        time.sleep(4)  # Redis down for 4 s after the worker started
        early_exit = worker.poll()
        redis_server.start()
        assert early_exit is None, (
            f"the worker exited with status {early_exit} while Redis was down instead of waiting for it:\n"
            f"{log.read_text(errors='replace')[-1500:]}"
        )
        assert _wait(lambda: "resume at offset" in log.read_text(errors="replace"), 60), (
            f"the worker did not take its shards after Redis came back:\n{log.read_text(errors='replace')[-1500:]}"
        )
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        redis_server.kill()


def test_a_restarted_peer_does_not_rechain_its_votes_from_commits_before_its_resume_point():
    """Fault: a worker SIGKILLed and restarted while the committed head lags its own votes.

    In the 10-minute campaign (seed 1), commits on shards 2 and 3 were held up at cycle 783
    (a faulty replica, a zombie, Redis and broker outages). peer-b had voted 784..787, was SIGKILLed,
    and resumed "after cycle 1796196787" from its checkpoint. When the held-up commits of
    784, 785, 786, 787 arrived, its log said for each one "cycle ... was committed as ..., not as this
    peer voted: re-signing 23 later vote(s) on the committed entry", although it had voted exactly
    those entries. So it signed its vote for 788 chained from the committed 784, then from 785, then
    786: a second successor of entries it had already signed a successor for (784 -> 785 and
    784 -> 788, ...), which is equivocation by an honest peer (invariant no_equivocation; the
    protocol's rule is one successor per (shard, prev_entry_hash)). An entry 788 after 784 also
    skips beats 785..787: signed by a quorum, the Lua append (prev = head, cycle > head's) would
    commit it, and those beats' receipts would never be in the chain.

    It needs no crash: in a 2.5-minute campaign (seed 2) a rebalance of peer-a's group moved shards
    between its two workers while the head lagged 5 beats (peer-b faulty, peer-d killed); both workers
    resumed "after cycle ...755" with the head at 750, re-signed on each of the commits 751..755, and
    peer-a's own detector logged "EQUIVOCATION: peer peer-a signed two successors of entry ...".

    Cause: PeerEngine.on_committed (knhk_stream/protocol/engine.py) re-chains every later vote
    whenever it has no own entry of the committed cycle in memory, which is always the case for
    cycles at or before the resume point of a worker that (re)took the shard.
    """
    from bench.load import four_peer_keys
    from knhk_stream.protocol.decode import Delta, Triple, encode_json
    from knhk_stream.protocol.engine import PeerEngine, ResumePoint

    keys, settings = four_peer_keys()
    records = []  # (offset, timestamp ms, value): two deltas in each of the beats of cycles 10..16, one of 17
    for c in range(10, 18):
        for k, at in enumerate((100, 600) if c < 17 else (100,)):
            v = encode_json(Delta((Triple(f"urn:{c}:{k}", "urn:p", "o"),), (), f"d{c}-{k}"))
            records.append((len(records), c * 1000 + at, v))

    def run(engine: PeerEngine, start: int) -> dict[int, object]:
        votes = {}
        for off, ts, v in records:
            if off >= start and (vote := engine.feed(0, off, ts, False, v)) is not None:
                votes[vote.entry.cycle] = vote
        return votes

    before = PeerEngine(settings, "peer-b", keys["peer-b"])
    before.assign(0, ResumePoint(0))
    voted = run(before, 0)  # peer-b's votes for 10..16, chained 10 -> 11 -> ...
    assert sorted(voted) == list(range(10, 17))
    # peer-b voted 10..13 and was killed; its checkpoint: after cycle 13, chained from its own vote for 13
    v13 = voted[13].entry
    restarted = PeerEngine(settings, "peer-b", keys["peer-b"])
    restarted.assign(0, ResumePoint(v13.last_offset + 1, v13.entry_hash, 13))
    after = run(restarted, v13.last_offset + 1)
    assert [(c, v.entry) for c, v in after.items()] == [(c, voted[c].entry) for c in range(14, 17)]
    # The held-up commits arrive: each is the entry peer-b voted, so nothing is to be re-signed.
    for c in range(10, 14):
        revotes = restarted.on_committed(0, c, voted[c].entry_hash)
        second = [(v.entry.cycle, v.entry.prev_entry_hash.hex()[:16]) for v in revotes]
        assert revotes == [], (
            f"after the commit of cycle {c} (the entry peer-b voted) the restarted peer re-signed {second}: "
            f"cycle(s) chained from the entry of cycle {c}, which already has peer-b's successor for cycle {c + 1}"
        )

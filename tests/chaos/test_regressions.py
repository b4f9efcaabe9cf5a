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

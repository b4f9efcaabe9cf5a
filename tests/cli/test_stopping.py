"""Issue 16, "Stopping and failing": each mistake run as a user makes it, on the real broker and Redis.

Each test asserts the message, the exit code and that the command ends within a
few seconds (the stop tests send the signal to a real `knhk-stream` process).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from knhk_stream.kafka.embedded import EmbeddedBroker, port_in_use
from tests.cli.conftest import KAFKA_TIMEOUT, KNHK, clean_env, free_port, knhk, spawn, stop, wait_for, worker_args
from tests.support.cluster import Cluster

pytestmark = pytest.mark.integration

NOWHERE = "127.0.0.1:9"  # nothing listens on the discard port


# -- 1. a worker that cannot reach Redis ------------------------------------------------------


def test_worker_without_redis_takes_no_shards_stops_at_once_and_gives_up_in_one_line(cluster: Cluster, tmp_path):
    cluster.start("peer-a")
    cluster.wait_joined("peer-a")
    bad = [*worker_args(cluster, "peer-a"), "--redis", "redis://127.0.0.1:1/0"]  # same peer, same group
    log = tmp_path / "bad.log"
    waiting = spawn(*bad, log=log)  # a restart during an outage waits for Redis (--start-timeout, 30 s) ...
    try:
        wait_for(lambda: "cannot reach Redis at redis://127.0.0.1:1/0" in log.read_text(), 5, "the waiting line")
        assert "waiting up to 30 s" in log.read_text() and "Ctrl-C stops" in log.read_text()
        time.sleep(1)
        assert stop(waiting, signal.SIGTERM, within=2) == 0  # ... honours SIGTERM at once ...
    finally:
        if waiting.poll() is None:
            waiting.kill()
    ran = knhk(*bad, "--start-timeout", "1", timeout=30)  # ... and gives up in one line after --start-timeout
    assert ran.rc == 1, ran.err
    assert ran.seconds < 5, ran.seconds
    assert ran.err_lines[-1].startswith("Error: cannot reach Redis: ") and "127.0.0.1:1" in ran.err_lines[-1]
    assert "--redis" in ran.err_lines[-1] and "--start-timeout" in ran.err_lines[-1] and "Traceback" not in ran.err
    assert [line for line in ran.err_lines if line.startswith("Error")] == [ran.err_lines[-1]]
    assert "revoked" not in cluster.log("peer-a"), "the worker that cannot reach Redis took shards from peer-a"
    assert stop(cluster.procs["peer-a"], signal.SIGTERM, within=5) == 0
    assert "worker of peer peer-a stopped" in cluster.log("peer-a")


def test_worker_stops_on_sigint_while_redis_is_down(cluster: Cluster, own_redis, tmp_path: Path):
    url, redis_proc = own_redis
    log = tmp_path / "peer-b.log"
    proc = spawn(*worker_args(cluster, "peer-b"), "--redis", url, log=log)
    try:
        wait_for(lambda: "worker of peer peer-b started" in log.read_text(), 20, "the worker to start")
        redis_proc.kill()  # before or while it takes its shards: it waits for Redis ...
        redis_proc.wait()
        wait_for(lambda: "Redis unavailable" in log.read_text(), 30, "the worker to notice")
        rc = stop(proc, signal.SIGINT, within=5)  # ... and that wait honours Ctrl-C
        assert rc == 0, log.read_text()
        assert "worker of peer peer-b stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_checks_topics_before_joining(cluster: Cluster):
    ran = knhk(*worker_args(cluster, "peer-a"), "--topic-prefix", "no-such-prefix", timeout=30)  # no wait: a typo
    assert ran.rc == 1 and ran.seconds < 5, (ran.rc, ran.seconds)
    assert ran.err_lines[-1].startswith("Error: topic(s) 'no-such-prefix.deltas'") and "topics apply" in ran.err


# -- 2. and 3. an unreachable broker ------------------------------------------------------------


def test_status_without_kafka_gives_one_line_suggesting_no_kafka(cluster: Cluster):
    base = ["status", "--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
            "--prefix", cluster.prefix, "--bootstrap", NOWHERE]  # fmt: skip
    for extra in ((), ("--json",)):
        ran = knhk(*base, *extra)
        assert ran.rc == 1
        assert ran.seconds < float(KAFKA_TIMEOUT) + 3, ran.seconds
        assert ran.out == ""
        assert len(ran.err_lines) == 1, ran.err
        assert ran.err_lines[0].startswith(f"Error: cannot reach Kafka at {NOWHERE} after {KAFKA_TIMEOUT} s")
        assert "Connection refused" in ran.err and "--no-kafka" in ran.err
    offline = knhk(*base, "--no-kafka", "--json")
    assert offline.rc == 0 and offline.out.count("\n") == 4  # one JSON line per shard, from Redis alone


def test_one_shot_commands_without_kafka_fail_in_one_line(cluster: Cluster, tmp_path: Path):
    settings = ["--settings", str(cluster.workdir / "chain.toml")]
    store = [*settings, "--redis", cluster.redis_url, "--prefix", cluster.prefix]
    (tmp_path / "d.jsonl").write_text('{"additions":[{"s":"urn:a","p":"urn:b","o":"c"}]}\n')
    commands = {
        "audit": ["audit", *store, "--shard", "0"],
        "prove": ["prove", *store, "--id", "o-42"],
        "produce": ["produce", str(tmp_path / "d.jsonl")],
        "topics apply": ["topics", "apply"],
        "roots tail": ["roots", "tail", *settings],
    }
    started = time.monotonic()
    procs = {name: subprocess.Popen([*KNHK, *args, "--bootstrap", NOWHERE], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=clean_env())
             for name, args in commands.items()}  # fmt: skip
    for name, p in procs.items():
        out, _ = p.communicate(timeout=30)
        lines = [line for line in out.splitlines() if line.strip()]
        assert p.returncode == 1, (name, out)
        assert len(lines) == 1, (name, out)  # no librdkafka lines, no traceback
        assert lines[0].startswith(f"Error: cannot reach Kafka at {NOWHERE} after {KAFKA_TIMEOUT} s"), (name, out)
    assert time.monotonic() - started < float(KAFKA_TIMEOUT) + 8  # in parallel: each gave up after the timeout


def test_worker_says_once_that_kafka_is_gone_and_still_stops(tmp_path: Path, redis_url: str):
    with EmbeddedBroker() as own:
        c = Cluster(tmp_path, own.bootstrap, redis_url)
        try:
            c.start("peer-c")
            c.wait_joined("peer-c")
            own.stop()  # the broker goes away under a running worker
            wait_for(lambda: "cannot reach Kafka at" in c.log("peer-c"), 20, "the worker to say so")
            time.sleep(3)
            text = c.log("peer-c")
            assert text.count("cannot reach Kafka at") == 1, text[-2000:]  # once per interval (30 s)
            assert "retrying" in text and "%3|" not in text and "|FAIL|" not in text  # librdkafka's lines: at debug
            rc = stop(c.procs["peer-c"], signal.SIGTERM, within=8)
            assert rc == 0, c.log("peer-c")[-2000:]
        finally:
            c.close()


# -- 4. dev ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dev_stops_everything_on_sigterm_and_sigint(tmp_path: Path, sig: signal.Signals):
    port = free_port()
    log = tmp_path / "dev.log"
    proc = spawn("dev", "--port", str(port), log=log)
    try:
        wait_for(lambda: "stops everything" in log.read_text(), 30, "dev to be ready")
        text = log.read_text()
        assert f"export KNHK_BOOTSTRAP=127.0.0.1:{port} " in text
        assert port_in_use(port)
        rc = stop(proc, sig, within=5)
        assert rc == 0, log.read_text()
        assert "stopped: the broker and its topics are gone" in log.read_text()
        assert not port_in_use(port), f"dev left its broker running on port {port} after {sig.name}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dev_uses_9092_when_free_and_its_broker_dies_with_it(tmp_path: Path):
    busy = port_in_use(9092)
    log = tmp_path / "dev.log"
    proc = spawn("dev", log=log)
    try:
        wait_for(lambda: "stops everything" in log.read_text(), 30, "dev to be ready")
        text = log.read_text()
        if busy:
            assert "port 9092 is in use, so the broker listens on" in text
        else:
            assert "Kafka (Tansu, memory only): 127.0.0.1:9092\n" in text
        bootstrap = text.split("export KNHK_BOOTSTRAP=", 1)[1].split()[0]
        port = int(bootstrap.rsplit(":", 1)[1])
        proc.kill()  # even SIGKILL, which dev cannot handle, takes the broker with it (Linux)
        proc.wait()
        wait_for(lambda: not port_in_use(port), 5, f"the broker on {port} to stop with dev")
    finally:
        if proc.poll() is None:
            proc.kill()

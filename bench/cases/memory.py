"""6. Memory: a worker's RSS, sampled every second over a steady-rate run (--memory-seconds at
--memory-rate), beside the idle worker's RSS after its join; flat or growing over the second half."""

from __future__ import annotations

import argparse
import statistics
import time

from bench.cluster import SHARDS, Committed, Env, Workers, chain_settings
from bench.harness import Report, Result, log, rss_mb
from bench.load import SteadyProducer
from knhk_stream.store.lockchain import LockchainStore

NEEDS = "kafka"


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
    secs = args.memory_seconds
    log(f"6. memory: one worker at {args.memory_rate:,} deltas/s for {secs:.0f}s, RSS every second")
    with env.measurement("mem") as (prefix, topic_prefix, topics, wd):
        settings = chain_settings(wd, ("peer-a",), 1)
        store = LockchainStore.from_url(env.redis_url, "knhk", prefix)
        with Workers(env, wd, prefix, topic_prefix, settings) as w:
            w.start("peer-a")
            w.wait_assigned(SHARDS)
            pid = w.procs["peer-a"].pid
            idle = rss_mb(pid)
            prod = SteadyProducer(env.bootstrap, topics.deltas.name, args.memory_rate, secs, seed=3, linger_ms=20)
            prod.start()
            samples: list[tuple[float, float]] = []
            t0 = time.monotonic()
            committed = Committed(store)
            while prod.running():
                w.check()
                v = rss_mb(pid)
                if v is not None:
                    samples.append((time.monotonic() - t0, v))
                if len(samples) % 10 == 0:
                    committed.poll()
                time.sleep(1)
            prod.join()
            try:
                committed.wait(prod.produced, 60, w)
                kept_up = True
            except RuntimeError as e:
                kept_up = False
                rep.errors.append(f"6. Memory: the worker did not keep up, so its RSS says little: {e}")
            v = rss_mb(pid)
            if v is not None:
                samples.append((time.monotonic() - t0, v))
    rss = [v for _, v in samples]
    half = [(t, v) for t, v in samples if t >= samples[-1][0] / 2]
    slope = 0.0
    if len(half) >= 2:
        mt = statistics.fmean(t for t, _ in half)
        mv = statistics.fmean(v for _, v in half)
        den = sum((t - mt) ** 2 for t, _ in half)
        slope = sum((t - mt) * (v - mv) for t, v in half) / den * 60 if den else 0.0  # MB per minute
    growth = half[-1][1] - half[0][1] if half else 0.0
    flat = abs(growth) <= max(2.0, 0.02 * half[0][1]) if half else False
    rep.add(
        Result(
            "6. Memory",
            f"worker RSS over {secs:.0f}s at {args.memory_rate:,} deltas/s: end",
            "MB",
            [rss[-1]],
            "idle worker after its join (start)",
            [idle or rss[0]],
            higher_is_better=False,
            extra={
                "start_mb": rss[0],
                "peak_mb": max(rss),
                "end_mb": rss[-1],
                "second_half_growth_mb": growth,
                "second_half_slope_mb_per_min": slope,
                "flat": flat,
                "samples": [(round(t, 1), round(v, 2)) for t, v in samples],
            },
            note=f"start {rss[0]:.1f}, peak {max(rss):.1f}, end {rss[-1]:.1f} MB; second half "
            f"{growth:+.1f} MB ({slope:+.2f} MB/min): {'flat' if flat else 'GROWING'}",
        )
    )
    rep.targets.append({"target": "flat memory", "met": flat and kept_up, "second_half_growth_mb": growth})

"""6. Memory: a soak of one worker, its RSS sampled every --memory-sample-s over --memory-seconds at
--memory-rate (default 30 minutes at 5,000 deltas/s), beside the idle worker's RSS after its join: flat
when the second half's least-squares slope is under FLAT_MB_PER_MIN. Then a peer with a stalled shard
(in-process, real Redis): what it holds after a stall must stay bounded however long the stall lasts."""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from bench.cluster import SHARDS, Committed, Env, Workers, chain_settings
from bench.harness import Report, Result, log, rss_mb
from bench.load import SteadyProducer
from knhk_stream.store.lockchain import LockchainStore

NEEDS = "kafka"
FLAT_MB_PER_MIN = 0.1  # issue 14: "flat in the second half" means a slope under this


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
    secs = args.memory_seconds
    every = args.memory_sample_s
    log(f"6. memory: one worker at {args.memory_rate:,} deltas/s for {secs:.0f}s, RSS every {every:g}s")
    with env.measurement("mem") as (prefix, topic_prefix, topics, wd):
        settings = chain_settings(wd, ("peer-a",), 1)
        store = LockchainStore.from_url(env.redis_url, "knhk", prefix)
        with Workers(env, wd, prefix, topic_prefix, settings) as w:
            w.start("peer-a")
            w.wait_assigned(SHARDS)
            pid = w.procs["peer-a"].pid
            idle = rss_mb(pid)
            prod = SteadyProducer(
                env.bootstrap, topics.deltas.name, args.memory_rate, secs, seed=3, linger_ms=20, keep_acks=False
            )
            prod.start()
            samples: list[tuple[float, float]] = []
            progress: list[tuple[float, int, int]] = []  # (s, produced, committed receipts): the worker keeps up
            t0 = time.monotonic()
            committed = Committed(store)
            next_sample = 0.0
            while prod.running():
                w.check()
                now = time.monotonic() - t0
                if now >= next_sample:
                    next_sample += every
                    v = rss_mb(pid)
                    if v is not None:
                        samples.append((now, v))
                        if len(samples) % 30 == 0:
                            _t, produced, done = progress[-1] if progress else (0, 0, 0)
                            log(f"    {now:6.0f}s  RSS {v:.1f} MB; produced {produced:,}, committed {done:,}")
                    progress.append((round(now, 1), prod.produced, committed.poll()))  # reads only new entries
                time.sleep(min(1.0, every))
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
    flat = bool(half) and slope < FLAT_MB_PER_MIN
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
                "progress": progress,
                "produced": prod.produced,
                "delivered": prod.delivered,
                "rate_achieved": round(prod.produced / max(1e-9, (prod.ended_ms - prod.started_ms) / 1000)),
                "producer_behind_s": round(prod.behind_s, 3),
            },
            note=f"start {rss[0]:.1f}, peak {max(rss):.1f}, end {rss[-1]:.1f} MB; second half "
            f"{growth:+.1f} MB ({slope:+.3f} MB/min, flat below {FLAT_MB_PER_MIN}): {'flat' if flat else 'GROWING'}",
        )
    )
    rep.targets.append(
        {
            "target": f"flat memory (second-half slope < {FLAT_MB_PER_MIN} MB/min)",
            "met": flat and kept_up,
            "second_half_growth_mb": growth,
            "second_half_slope_mb_per_min": slope,
        }
    )
    rep.summary["memory"] = (
        f"memory: seconds={secs:.0f} rate={args.memory_rate} slope_mb_per_min={slope:.3f} "
        f"flat={'true' if flat and kept_up else 'false'}"
    )
    stalled_shard(env, rep, args)


def stalled_shard(env: Env, rep: Report, args: argparse.Namespace) -> None:
    """Peer-a's node (real Redis, no Kafka) on a shard stalled 2 against 2 (threshold 3) for
    --stall-beats beats of all four peers' votes: what it holds must level off, not grow with the stall."""
    import tracemalloc

    from knhk_stream.protocol.quorum import generate_key, public_key_bytes
    from knhk_stream.protocol.settings import ChainSettings, Peer
    from knhk_stream.protocol.wire import encode_vote
    from knhk_stream.runtime.node import PeerNode, Record

    beats = args.stall_beats
    log(f"6. memory: a peer with a stalled shard (2 against 2, threshold 3), {beats:,} beats of votes")
    keys = {p: generate_key() for p in ("peer-a", "peer-b", "peer-c", "peer-d")}
    settings = ChainSettings(peers=tuple(Peer(p, public_key_bytes(k)) for p, k in keys.items()), threshold=3)
    prefix = f"knhkbench-{env.run_id}-stall"  # no topics: the node never talks to Kafka
    env.prefixes.append(prefix)
    try:
        store = LockchainStore.from_url(env.redis_url, settings.chain_id, prefix)
        nodes = {p: PeerNode(settings, p, k, store) for p, k in keys.items()}
        for n in nodes.values():
            n.assign(0)
        beat = 8 * settings.tick_ms
        t0 = (now_ms := int(time.time() * 1000)) - now_ms % beat
        samples: list[tuple[int, float, int]] = []  # (beat, traced MB, votes held)
        votes_offset = 0
        tracemalloc.start()
        logging.getLogger("knhk_stream").setLevel(logging.CRITICAL)  # the split is logged as a stall
        try:
            for b in range(beats + 1):
                out = []
                for p, n in nodes.items():
                    side = b"x" if p in ("peer-a", "peer-b") else b"y"  # two different beats: no quorum
                    rec = Record(0, b, t0 + b * beat, None, b'{"additions":[["s","p","' + side + b'"]]}')
                    out += n.process([rec])
                recs = []
                for v in out:
                    recs.append(Record(0, votes_offset, 0, None, encode_vote(v)))
                    votes_offset += 1
                nodes["peer-a"].on_vote_records(recs)
                nodes["peer-a"].commit_ready()
                if b % max(1, beats // 20) == 0:
                    cur, _peak = tracemalloc.get_traced_memory()
                    held = nodes["peer-a"].consensus.collector.held_votes(0)
                    samples.append((b, cur / 2**20, held))
        finally:
            tracemalloc.stop()
            logging.getLogger("knhk_stream").setLevel(logging.NOTSET)
        committed = store.head(0)
    finally:
        env.clean_redis()
    half = samples[len(samples) // 2 :]
    growth = half[-1][1] - half[0][1]
    bounded = committed is None and growth < 0.5 and half[-1][2] == half[0][2]
    rep.add(
        Result(
            "6. Memory",
            f"peer with a stalled shard: traced memory after {beats:,} beats of the stall",
            "MB",
            [samples[-1][1]],
            f"after {half[0][0]:,} beats",
            [half[0][1]],
            higher_is_better=False,
            extra={"samples": samples, "votes_held": samples[-1][2], "bounded": bounded},
            note=f"votes held {half[0][2]} -> {samples[-1][2]} (the collector's per-peer share); second half "
            f"{growth:+.2f} MB: {'bounded' if bounded else 'GROWING'}",
        )
    )
    rep.targets.append({"target": "a stalled shard's vote rounds stay bounded", "met": bounded})

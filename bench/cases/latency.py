"""Latency breakdown (part of case 4): four peers at a steady rate; commit latency after beat close and
after beat end, and where it goes (closing record acked -> the quorum's 3rd vote signed -> entry in
Redis, from the votes' voted_at_ms), beside the producer's own produce -> ack time."""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.cluster import PEERS, QUORUM, SHARDS, Committed, Env, Workers, chain_settings
from bench.harness import CpuMeter, Report, Result, log, percentile
from bench.load import SteadyProducer
from bench.profiling import PySpy, summarize_collapsed
from knhk_stream.store.lockchain import LockchainStore


def latency_case(
    env: Env, rep: Report, args: argparse.Namespace, tick_ms: int, runs: int, search: bool = False
) -> bool:
    """Four peers at a steady rate; commit latency after beat close. Returns whether it kept up."""
    beat_ms = 8 * tick_ms
    log(f"  latency, tick_ms {tick_ms} (beat {beat_ms} ms), {args.rate:,} deltas/s for {args.latency_seconds:.0f}s")
    rows = []
    for i in range(runs):
        with env.measurement(f"lat{tick_ms}") as (prefix, topic_prefix, topics, wd):
            settings = chain_settings(wd, PEERS, 3, tick_ms)
            store = LockchainStore.from_url(env.redis_url, "knhk", prefix)
            with Workers(env, wd, prefix, topic_prefix, settings) as w:
                for p in PEERS:
                    w.start(p)
                w.wait_assigned(SHARDS * len(PEERS))
                profile = args.profile and i == 0 and not search
                prod, committed = steady_run(env, w, topics.deltas.name, store, args, tick_ms, args.latency_seconds,
                                             f"peer_tick{tick_ms}" if profile else None)  # fmt: skip
            votes = read_votes(env.bootstrap, topics.votes.name)
            rows.append(latency_stats(committed.entries, prod, tick_ms, votes))
            log(f"    run {i + 1}: {json.dumps(rows[-1])}")
    kept_up = sum(r["sustained"] for r in rows) * 2 > len(rows)  # most runs
    label = f"tick_ms {tick_ms} ({1000 / tick_ms:,.0f} ticks/s)"
    verdict = f"{'sustained' if kept_up else 'NOT sustained'} at {args.rate:,} deltas/s" + (
        " (tick search, 1 run)" if search else ""
    )
    for what in ("p50", "p99"):
        rep.add(
            Result(
                "4. Four peers",
                f"{label}: commit latency {what} after beat close (closing record acked)",
                "ms",
                [r[f"{what}_close"] for r in rows if r[f"{what}_close"] is not None],
                f"{what} produce -> ack of a delta (the Kafka floor)",
                [r[f"ack_{what}"] for r in rows if r[f"ack_{what}"] is not None],
                higher_is_better=False,
                chart="latency",
                label=f"tick {tick_ms} ms: {what} after close",
                note=verdict if what == "p99" else "",
                extra={"rows": rows} if what == "p99" else {},
            )
        )
    for what in ("p50", "p99"):
        rep.add(
            Result(
                "4. Four peers",
                f"{label}: commit latency {what} after beat end ((cycle+1)*8*tick_ms)",
                "ms",
                [r[f"{what}_end"] for r in rows if r[f"{what}_end"] is not None],
                higher_is_better=False,
                chart="latency",
                label=f"tick {tick_ms} ms: {what} after beat end",
            )
        )
    for key, what in (
        ("close_to_quorum_vote_p50", "where it goes: p50 closing record acked -> the quorum's 3rd vote signed"),
        ("quorum_vote_to_commit_p50", "where it goes: p50 3rd vote signed -> entry in Redis"),
    ):
        got = [r[key] for r in rows if r.get(key) is not None]
        if got:
            rep.add(
                Result(
                    "4. Four peers",
                    f"{label}: {what}",
                    "ms",
                    got,
                    "p50 produce -> ack of a delta (the Kafka floor)",
                    [r["ack_p50"] for r in rows if r["ack_p50"] is not None],
                    higher_is_better=False,
                    note="fetch of the closing record, beat close, Merkle, signing"
                    if "quorum_vote_p50" in key
                    else "vote produced and acknowledged, fetched by the committing peer, verified, Lua append",
                )
            )
    if tick_ms == 125 and not search:
        p99 = [r["p99_close"] for r in rows if r["p99_close"] is not None]
        value = statistics.median(p99) if p99 else None
        rep.targets.append(
            {
                "target": "four peers p99 commit latency < 50 ms after beat close (tick_ms 125)",
                "value_ms": value,
                "met": value is not None and value < 50,
            }
        )
    return kept_up


def read_votes(bootstrap: str, topic: str) -> dict[tuple[int, int], list[int]]:
    """voted_at_ms of every vote on the votes topic, by (shard, cycle), read to the end of each partition."""
    from confluent_kafka import KafkaError

    from knhk_stream.protocol.wire import WireError, decode_vote

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"votes-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    out: dict[tuple[int, int], list[int]] = {}
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(SHARDS)])
        done: set[int] = set()
        deadline = time.monotonic() + 60
        while len(done) < SHARDS and time.monotonic() < deadline:
            for m in c.consume(5000, timeout=0.5):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        done.add(m.partition())
                    continue
                try:
                    v = decode_vote(m.value())
                except WireError:
                    continue
                out.setdefault((v.entry.shard, v.entry.cycle), []).append(v.voted_at_ms)
    finally:
        c.close()
    return out


def latency_stats(
    entries: list[Any], prod: SteadyProducer, tick_ms: int, votes: dict[tuple[int, int], list[int]] | None = None
) -> dict[str, Any]:
    """Latencies of one run, and whether the chain kept up.

    Kept up: every delta committed within 2 s + 2 beats after the producer stopped, and the
    median latency of the last third of the beats is not above the first third's by more
    than max(100 ms, 2 beats) (a growing backlog).
    """
    beat_ms = 8 * tick_ms
    end_lat, close_lat, by_time = [], [], []
    to_vote: list[float] = []
    to_quorum: list[float] = []
    quorum_to_commit: list[float] = []
    receipts = 0
    for ce in entries:
        e = ce.entry
        receipts += e.receipt_count
        end = (e.cycle + 1) * beat_ms
        end_lat.append(ce.committed_at_ms - end)
        by_time.append((end, ce.committed_at_ms - end))
        ack = prod.acked.get((e.shard, e.last_offset + 1))
        if ack is not None:
            close_lat.append(ce.committed_at_ms - ack)
        times = sorted((votes or {}).get((e.shard, e.cycle), []))
        if len(times) >= QUORUM and ack is not None:
            to_vote.append(times[0] - ack)  # fastest peer: fetch the closing record, close the beat, sign
            to_quorum.append(times[QUORUM - 1] - ack)  # the vote that makes the quorum
            quorum_to_commit.append(ce.committed_at_ms - times[QUORUM - 1])  # vote on the topic, read, verify, append
    by_time.sort()
    third = len(by_time) // 3
    first_p50 = percentile([x for _, x in by_time[:third]], 50)
    last_p50 = percentile([x for _, x in by_time[-third:]], 50) if third else None
    growing = first_p50 is not None and last_p50 is not None and last_p50 > first_p50 + max(100, 2 * beat_ms)
    last_commit = max((ce.committed_at_ms for ce in entries), default=0)
    drain_s = (last_commit - prod.ended_ms) / 1000
    complete = receipts >= prod.produced
    return {
        "tick_ms": tick_ms,
        "entries": len(entries),
        "produced": prod.produced,
        "committed_receipts": receipts,
        "rate_achieved": round(prod.produced / max(1e-9, (prod.ended_ms - prod.started_ms) / 1000)),
        "producer_behind_s": round(prod.behind_s, 3),
        "drain_s": round(drain_s, 3),
        "p50_end": percentile(end_lat, 50),
        "p99_end": percentile(end_lat, 99),
        "p50_close": percentile(close_lat, 50),
        "p99_close": percentile(close_lat, 99),
        "beats_with_acked_closing_record": len(close_lat),
        "close_to_first_vote_p50": percentile(to_vote, 50),
        "close_to_quorum_vote_p50": percentile(to_quorum, 50),
        "close_to_quorum_vote_p99": percentile(to_quorum, 99),
        "quorum_vote_to_commit_p50": percentile(quorum_to_commit, 50),
        "quorum_vote_to_commit_p99": percentile(quorum_to_commit, 99),
        "ack_p50": percentile(prod.ack_latency, 50),
        "ack_p99": percentile(prod.ack_latency, 99),
        "first_third_p50_end": first_p50,
        "last_third_p50_end": last_p50,
        "sustained": bool(complete and drain_s <= 2 + 2 * beat_ms / 1000 and not growing),
    }


def steady_run(
    env: Env,
    w: Workers,
    topic: str,
    store: LockchainStore,
    args: argparse.Namespace,
    tick_ms: int,
    seconds: float,
    profile: str | None = None,
    meter: CpuMeter | None = None,
) -> tuple[SteadyProducer, Committed]:
    """Steady load at args.rate for `seconds` (peer-a profiled into profile_{profile}_summary.txt when asked),
    then the commits drained: no Redis reads during the load, they would slow the producer. `meter`, if
    given, measures the load alone (`meter.cores` afterwards)."""
    prof = env.workdir / f"profile_{profile}.txt"
    spy = PySpy(w.procs["peer-a"].pid, prof) if profile else None
    if meter is not None:
        meter.start()
    prod = SteadyProducer(env.bootstrap, topic, args.rate, seconds).start()
    committed = Committed(store)
    while prod.running():
        w.check()
        time.sleep(0.5)
    prod.join()
    if meter is not None:
        meter.stop()
    if spy:
        spy.stop()
        (args.out / f"profile_{profile}_summary.txt").write_text(
            f"py-spy, peer-a of four (threshold 3) at {args.rate:,} deltas/s, tick_ms {tick_ms}, "
            f"during the {seconds:.0f}s of steady load (idle samples excluded)\n\n" + summarize_collapsed(prof) + "\n"
        )
    try:
        committed.wait(prod.produced, args.drain_timeout, w)
    except RuntimeError:
        committed.poll()
    return prod, committed

"""1. Bare consume: a plain confluent-kafka loop (assign + consume(batch)) over the same deltas; the
limit a Python consumer reaches here, and the baseline of the other Kafka cases."""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.cluster import SHARDS, Env
from bench.harness import Report, Result, log
from bench.load import json_values, produce_all

NEEDS = "kafka"


def bare_consume(bootstrap: str, topic: str, n: int, batch: int = 5000) -> float:
    """Deltas/s of a plain consume loop (assign all shards at offset 0, consume(batch)) until n records."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bare-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    try:
        t0 = time.perf_counter()
        c.assign([TopicPartition(topic, p, 0) for p in range(SHARDS)])
        got = 0
        deadline = time.monotonic() + 120
        while got < n and time.monotonic() < deadline:
            for m in c.consume(batch, timeout=0.05):
                if m.error() is None:
                    got += 1
        elapsed = time.perf_counter() - t0
        if got < n:
            raise RuntimeError(f"bare consume read {got} of {n} records")
        return n / elapsed
    finally:
        c.close()


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
    log(f"1. bare consume: {args.deltas:,} deltas of ~100 B, 4 partitions, consume({args.batch})")
    values = json_values(args.deltas)
    runs: list[float] = []
    produce_rates: list[float] = []
    for i in range(args.runs):
        _, _, topics, _ = env.fresh("bare")
        secs = produce_all(env.bootstrap, topics.deltas.name, values)
        produce_rates.append(len(values) / secs)
        runs.append(bare_consume(env.bootstrap, topics.deltas.name, len(values), args.batch))
        env.drop_topics(topics)
        log(f"  run {i + 1}: {runs[-1]:,.0f} deltas/s")
    rep.add(
        Result(
            "1. Bare consume",
            "plain confluent-kafka consume loop, 100 B deltas",
            "deltas/s",
            runs,
            chart="throughput",
            label="bare consume",
            note="the limit a Python consumer reaches here; it is the baseline of the other Kafka cases",
        )
    )
    rep.add(
        Result(
            "1. Bare consume",
            "producing the same deltas (acks=all, idempotent, linger 5 ms; for reference)",
            "deltas/s",
            produce_rates,
            "bare consume",
            runs,
            chart="throughput",
            label="produce (reference)",
        )
    )


def versus_bare(case: str, name: str, res: list[dict[str, float]], key: str, **kw: Any) -> Result:
    """A throughput row of `res[...][key]` beside the bare consume of the same topics in the same runs."""
    bare = [r["bare"] for r in res]
    return Result(
        case, name, "deltas/s", [r[key] for r in res], "bare consume, same topic", bare, chart="throughput", **kw
    )


def bare_median(rep: Report) -> float | None:
    r = rep.find("1. Bare consume", "plain")
    return r.median if r else None

"""1 kHz ticks (issue 14): four peers (threshold 3), 4 shards, --rate deltas/s for --kilohertz-seconds at
tick_ms 1 (a beat every 8 ms), and whose latency it is, at tick_ms 125 and 1: per commit the broker's
share (the closing record's fetch, the quorum vote's produce -> ack and fetch) and ours (closing record
arrived -> vote produced; quorum vote arrived -> append returned), from the workers' latency traces
(`knhk_stream.runtime.latency_trace`). Each tick runs this tree and, in the same run, the tree at
--kilohertz-before (before the per-beat work was cut). Every committed entry is verified afterwards.

Ends with `kilohertz: tick_ms=<n> sustained=<true|false> commit_p99_ms=<x> own_p99_ms=<y>` for the
shortest tick_ms of --kilohertz-ticks (default 125,1; when 1 is not sustained, --tick-search looks for
the shortest tick that is)."""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from bench.baseline import extract_ref
from bench.cases.latency import latency_stats, steady_run
from bench.cluster import PEERS, QUORUM, SHARDS, Env, Workers, chain_settings
from bench.harness import CpuMeter, Report, Result, log, percentile
from bench.load import SteadyProducer
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.runtime.latency_trace import TRACE_ENV
from knhk_stream.store.lockchain import LockchainStore, verify_range

NEEDS = "kafka"
# The tree before the per-beat work was cut (issue 14): it has the latency trace, so its own share is
# measured the same way. '' (--kilohertz-before '') skips the before runs.
KILOHERTZ_BEFORE_REF = "95d1955"
CASE = "9. 1 kHz"
SHARES = ("own", "broker", "own_vote", "own_commit", "close_fetch", "vote_ack", "vote_fetch", "own_gc")
# Our share split by the loop threads' scheduler counters (traces that have them: not the before tree's):
# on a CPU, runnable but waiting for one (the machine's), and the share less that wait.
SCHED_SHARES = ("own_on_cpu", "own_waiting_for_cpu", "own_less_waiting", "own_commit_on_cpu",
                "own_commit_waiting_for_cpu")  # fmt: skip


def read_vote_index(bootstrap: str, topic: str) -> dict[tuple[int, int], tuple[int, str, bytes]]:
    """(shard, votes-topic offset) -> (cycle, peer, entry hash) of every vote, read to the end."""
    from knhk_stream.protocol.wire import WireError, decode_vote

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"votes-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    out: dict[tuple[int, int], tuple[int, str, bytes]] = {}
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(SHARDS)])
        done: set[int] = set()
        deadline = time.monotonic() + 120
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
                out[(m.partition(), m.offset())] = (v.entry.cycle, v.peer_id, v.entry_hash)
    finally:
        c.close()
    return out


class Traces:
    """The latency-trace lines of every worker of a run, by peer."""

    def __init__(self, files: dict[str, list[Path]]) -> None:
        self.vote: dict[tuple[str, int, int], tuple[float, float]] = {}  # (peer, shard, cycle) -> arrived, produced
        self.acked: dict[tuple[int, int], float] = {}  # (shard, votes offset) -> produce -> ack ms
        self.read: dict[tuple[str, int, int], float] = {}  # (peer, shard, votes offset) -> arrived
        self.appended: dict[tuple[int, int], float] = {}  # (shard, cycle) -> append returned
        self.gc: dict[str, list[tuple[float, float]]] = {}  # peer -> its collections (started, ms), in order
        # the loop thread's scheduler counters (ms on a CPU, ms waiting for one) at those moments
        self.vote_sched: dict[tuple[str, int, int], tuple[float, float, float, float]] = {}  # at arrived, produced
        self.read_sched: dict[tuple[str, int, int], tuple[float, float]] = {}
        self.appended_sched: dict[tuple[int, int], tuple[float, float]] = {}
        for peer, paths in files.items():
            for path in paths:
                for line in path.read_text().splitlines():
                    f = line.split()
                    if len(f) < 4:
                        continue
                    if f[0] == "G":
                        self.gc.setdefault(peer, []).append((float(f[2]), float(f[3])))
                        continue
                    a, b = int(f[1]), int(f[2])
                    if f[0] == "V":
                        self.vote.setdefault((peer, a, b), (float(f[3]), float(f[4])))
                        if len(f) >= 9:
                            self.vote_sched.setdefault((peer, a, b), (float(f[5]), float(f[6]), float(f[7]),
                                                                      float(f[8])))  # fmt: skip
                    elif f[0] == "K":
                        self.acked[(a, b)] = float(f[3])
                    elif f[0] == "R":
                        self.read.setdefault((peer, a, b), float(f[3]))
                        if len(f) >= 6:
                            self.read_sched.setdefault((peer, a, b), (float(f[4]), float(f[5])))
                    elif f[0] == "A":
                        self.appended[(a, b)] = float(f[3])
                        if len(f) >= 6:
                            self.appended_sched[(a, b)] = (float(f[4]), float(f[5]))
        for pauses in self.gc.values():
            pauses.sort()

    def gc_within(self, peer: str, start: float, end: float) -> float:
        """Milliseconds the peer spent collecting garbage between `start` and `end`."""
        pauses = self.gc.get(peer, [])
        i = bisect.bisect_left(pauses, (start - 1000.0, 0.0))  # no collection takes a second
        total = 0.0
        for t, ms in pauses[i:]:
            if t >= end:
                break
            total += max(0.0, min(end, t + ms) - max(start, t))
        return total


def shares(
    entries: list[Any], prod: SteadyProducer, traces: Traces, index: dict[tuple[int, int], tuple[int, str, bytes]]
) -> dict[str, Any]:
    """Per commit: where its latency after beat close went, split into the broker's share and ours.

    For an entry appended by peer P whose quorum was completed (at P) by the vote of peer Q:
    close_fetch = the closing record's ack -> it reached Q; own_vote = reached Q -> Q produced its vote;
    vote_ack = Q's produce -> ack; vote_fetch = acked -> it reached P; own_commit = reached P -> P's
    append returned. The broker's share is close_fetch + vote_ack + vote_fetch; own_gc is the part of
    ours that Q and P spent collecting garbage. Where the traces have the scheduler counters, ours is
    also split into the time Q's and P's loop threads were on a CPU and were runnable but waiting for
    one (the rest: blocked, e.g. on Redis's reply).
    """
    by_cycle: dict[tuple[int, int], list[tuple[int, str, bytes]]] = {}
    for (shard, offset), (cycle, peer, h) in index.items():
        by_cycle.setdefault((shard, cycle), []).append((offset, peer, h))
    got: dict[str, list[float]] = {k: [] for k in (*SHARES, *SCHED_SHARES)}
    for ce in entries:
        e = ce.entry
        ack = prod.acked.get((e.shard, e.last_offset + 1))
        done = traces.appended.get((e.shard, e.cycle))
        if ack is None or done is None:
            continue
        p = ce.committed_by
        arrivals = sorted(
            (t, off, q)
            for off, q, h in by_cycle.get((e.shard, e.cycle), [])
            if h == ce.entry_hash and (t := traces.read.get((p, e.shard, off))) is not None
        )
        if len(arrivals) < QUORUM:
            continue
        t_vote_in, off, q = arrivals[QUORUM - 1]
        v = traces.vote.get((q, e.shard, e.cycle))
        lat = traces.acked.get((e.shard, off))
        if v is None or lat is None:
            continue
        arrived, produced = v
        parts = {
            "own_vote": produced - arrived,
            "own_commit": done - t_vote_in,
            "close_fetch": arrived - ack,
            "vote_ack": lat,
            "vote_fetch": t_vote_in - (produced + lat),
            "own_gc": traces.gc_within(q, arrived, produced) + traces.gc_within(p, t_vote_in, done),
        }
        parts["own"] = parts["own_vote"] + parts["own_commit"]
        parts["broker"] = parts["close_fetch"] + parts["vote_ack"] + parts["vote_fetch"]
        for k in SHARES:
            got[k].append(parts[k])
        vs, rs, cs = traces.vote_sched.get((q, e.shard, e.cycle)), traces.read_sched.get((p, e.shard, off)), (
            traces.appended_sched.get((e.shard, e.cycle)))  # fmt: skip
        if vs is not None and rs is not None and cs is not None:
            on_cpu = (vs[2] - vs[0]) + (cs[0] - rs[0])
            waiting = (vs[3] - vs[1]) + (cs[1] - rs[1])
            got["own_on_cpu"].append(on_cpu)
            got["own_waiting_for_cpu"].append(waiting)
            got["own_less_waiting"].append(parts["own"] - waiting)
            got["own_commit_on_cpu"].append(cs[0] - rs[0])
            got["own_commit_waiting_for_cpu"].append(cs[1] - rs[1])
    out: dict[str, Any] = {"commits_split": len(got["own"]), "commits_split_sched": len(got["own_on_cpu"])}
    for k in (*SHARES, *SCHED_SHARES):
        out[f"{k}_p50"] = percentile(got[k], 50)
        out[f"{k}_p99"] = percentile(got[k], 99)
    return out


@contextmanager
def before_tree(ref: str) -> Iterator[Path | None]:
    """The knhk_stream tree at `ref` (git archive), to put on a worker's PYTHONPATH; None when ''."""
    if not ref:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="knhk-bench-khz-"))
    try:
        pkg = extract_ref(ref, tmp)
        yield pkg.parent if pkg is not None else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def traced_run(
    env: Env, args: argparse.Namespace, tick_ms: int, seconds: float, pythonpath: Path | None, profile: bool = False
) -> dict[str, Any]:
    """Four traced peers at --rate for `seconds`: latency_stats, the shares, and whether every entry verifies."""
    tag = f"khz{tick_ms}{'b' if pythonpath else 'a'}"
    with env.measurement(tag) as (prefix, topic_prefix, topics, wd):
        settings_path = chain_settings(wd, PEERS, QUORUM, tick_ms)
        store = LockchainStore.from_url(env.redis_url, "knhk", prefix)
        with Workers(env, wd, prefix, topic_prefix, settings_path) as w:
            for p in PEERS:
                extra = {TRACE_ENV: str(wd / f"trace-{p}")}
                if pythonpath is not None:
                    extra["PYTHONPATH"] = str(pythonpath)
                w.start(p, env_extra=extra)
            w.wait_assigned(SHARDS * len(PEERS))
            roles = {"peers": [w.procs[p].pid for p in PEERS], "load": [os.getpid()]}  # load: producer, this process
            if env.broker_pid is not None:
                roles["broker"] = [env.broker_pid]
            meter = CpuMeter(roles, store.client)
            prod, committed = steady_run(env, w, topics.deltas.name, store, args, tick_ms, seconds,
                                         f"kilohertz_tick{tick_ms}" if profile else None, meter)  # fmt: skip
        files = {p: sorted(wd.glob(f"trace-{p}.*")) for p in PEERS}
        row = latency_stats(committed.entries, prod, tick_ms)
        row.update({f"cores_{role}": cores for role, cores in meter.cores.items()})
        traces = Traces(files)
        row.update(shares(committed.entries, prod, traces, read_vote_index(env.bootstrap, topics.votes.name)))
        pauses = [ms for per_peer in traces.gc.values() for _, ms in per_peer]
        row.update(gc_p99=percentile(pauses, 99), gc_max=max(pauses, default=None), gc_count=len(pauses))
        settings = ChainSettings.from_toml(settings_path)
        problems = 0
        for s in range(SHARDS):
            problems += len(verify_range(store, settings, s).problems)
        row["entries_verified"] = len(committed.entries)
        row["verify_problems"] = problems
        row["sustained"] = bool(row["sustained"] and problems == 0)
    return row


def broker_alone(env: Env, args: argparse.Namespace, seconds: float) -> dict[str, float]:
    """The broker with no peer at all: --rate deltas/s produced as in the runs, read whole by as many
    consumers as four peers run (a deltas and a votes consumer each: 8 readers of every record). Its
    CPU, and the producer's acknowledgement latency in the first and the last third of the run."""
    with env.measurement("khzbroker") as (_prefix, _topic_prefix, topics, _wd):
        readers = []
        for i in range(2 * len(PEERS)):
            c = Consumer({"bootstrap.servers": env.bootstrap, "group.id": f"alone-{uuid.uuid4().hex[:8]}-{i}",
                          "enable.auto.commit": False, "fetch.wait.max.ms": 10})  # fmt: skip
            c.assign([TopicPartition(topics.deltas.name, p, 0) for p in range(SHARDS)])
            readers.append(c)
        roles = {"broker": [env.broker_pid]} if env.broker_pid is not None else {}
        meter = CpuMeter({**roles, "load": [os.getpid()]})
        meter.start()
        prod = SteadyProducer(env.bootstrap, topics.deltas.name, args.rate, seconds).start()
        read = 0
        while prod.running():
            for c in readers:
                read += len(c.consume(2000, timeout=0.005))
        prod.join()
        cores = meter.stop()
        for c in readers:
            c.close()
    third = len(prod.ack_latency) // 3
    return {
        "records_read_per_s": round(read / seconds),
        **{f"cores_{k}": v for k, v in cores.items()},
        "ack_p50_first_third": percentile(prod.ack_latency[:third], 50),
        "ack_p50_last_third": percentile(prod.ack_latency[-third:], 50) if third else None,
    }


def _add_rows(rep: Report, tick_ms: int, after: dict[str, Any], before: dict[str, Any] | None, ref: str) -> None:
    label = f"tick_ms {tick_ms}"
    for key, what in (
        ("p50_close", "commit latency p50 after beat close"),
        ("p99_close", "commit latency p99 after beat close"),
        ("own_p50", "our own share p50 (record in -> vote produced, + quorum vote in -> append returned)"),
        ("own_p99", "our own share p99"),
        ("broker_p50", "the broker's share p50 (closing record fetch, vote produce -> ack, vote fetch)"),
        ("broker_p99", "the broker's share p99"),
        ("own_vote_p99", "own: closing record in -> vote produced, p99"),
        ("own_commit_p99", "own: quorum vote in -> append returned, p99"),
        ("own_gc_p99", "own: of which garbage collection, p99"),
        ("own_on_cpu_p50", "own: of which the loop threads were on a CPU, p50"),
        ("own_on_cpu_p99", "own: of which the loop threads were on a CPU, p99"),
        ("own_waiting_for_cpu_p50", "own: of which runnable but waiting for a CPU (the machine's), p50"),
        ("own_waiting_for_cpu_p99", "own: of which runnable but waiting for a CPU (the machine's), p99"),
        ("own_less_waiting_p99", "own share less the waits for a CPU, p99"),
        ("own_commit_on_cpu_p50", "own: quorum vote in -> append returned, on a CPU, p50"),
        ("own_commit_waiting_for_cpu_p50", "own: quorum vote in -> append returned, waiting for a CPU, p50"),
        ("gc_p99", "garbage collection pauses of the workers, p99"),
        ("gc_max", "garbage collection pauses of the workers, longest"),
        ("close_fetch_p50", "broker: closing record acked -> reached the voter, p50"),
        ("vote_ack_p50", "broker: vote produce -> ack, p50 (linger included)"),
        ("vote_fetch_p50", "broker: vote acked -> reached the appender, p50"),
        ("cores_peers", "CPU during the load: the four peers, in cores"),
        ("cores_broker", "CPU during the load: the embedded broker, in cores"),
        ("cores_load", "CPU during the load: the load generator (the bench's producer), in cores"),
        ("cores_redis", "CPU during the load: Redis, in cores"),
    ):
        if after.get(key) is None:
            continue
        rep.add(
            Result(
                CASE,
                f"{label}: {what}",
                "cores" if key.startswith("cores_") else "ms",
                [after[key]],
                f"the same at {ref} (before)" if before else None,
                [before[key]] if before and before.get(key) is not None else [],
                higher_is_better=False,
                chart="latency" if key in ("own_p99", "p99_close") else None,
                label=f"tick {tick_ms}: {key}",
                note=(f"sustained: {after['sustained']}" + (f", before: {before['sustained']}" if before else ""))
                if key == "p99_close"
                else "",
                extra={"after": after, "before": before} if key == "p99_close" else {},
            )
        )


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
    ref = args.kilohertz_before
    secs = args.kilohertz_seconds
    ticks = sorted(args.kilohertz_ticks, reverse=True)  # the long tick first: the broker is freshest
    latency_ticks = {tick for tick in ticks if tick >= 125}  # latency runs: --latency-seconds, --runs times
    lengths = {tick: args.latency_seconds if tick in latency_ticks else secs for tick in ticks}
    runs = ", ".join(f"tick_ms {t} ({lengths[t]:.0f}s)" for t in ticks)
    log(f"9. 1 kHz: four peers, threshold 3, {args.rate:,} deltas/s; {runs}, this tree and {ref or 'no before'}")
    results: dict[int, dict[str, Any]] = {}
    with before_tree(ref) as old:
        for tick in ticks:
            pairs = []
            for i in range(args.runs if tick in latency_ticks else 1):
                b = traced_run(env, args, tick, lengths[tick], old) if old is not None else None
                a = traced_run(env, args, tick, lengths[tick], None, profile=args.profile and i == 0)
                log(f"  tick_ms {tick} after: {a}")
                if b is not None:
                    log(f"  tick_ms {tick} before: {b}")
                pairs.append((a, b))
            a, b = pairs[len(pairs) // 2]
            results[tick] = a
            _add_rows(rep, tick, a, b, ref)
    alone = broker_alone(env, args, secs)
    log(f"  the broker alone: {alone}")
    what = f"the broker alone, {args.rate:,} deltas/s read by {2 * len(PEERS)} consumers for {secs:.0f}s"
    if alone.get("cores_broker") is not None:
        rep.add(Result(CASE, f"{what} ({alone['records_read_per_s']:,} records/s out), in cores", "cores",
                       [alone["cores_broker"]], higher_is_better=False, extra=alone))  # fmt: skip
    for key, third in (("ack_p50_first_third", "first"), ("ack_p50_last_third", "last")):
        if alone.get(key) is not None:
            rep.add(Result(CASE, f"{what}: produce -> ack p50 in the {third} third", "ms", [alone[key]],
                           higher_is_better=False))  # fmt: skip
    shortest = ticks[-1]
    r1 = results[shortest]
    if shortest == 1:
        best = 1 if r1["sustained"] else None
        for tick in args.tick_search if best is None else []:
            row = traced_run(env, args, tick, secs, None)
            log(f"  tick search, tick_ms {tick}: sustained {row['sustained']}")
            if row["sustained"]:
                best = tick
                break
        rep.notes.append(
            f"9. 1 kHz: tick_ms 1 {'sustained' if r1['sustained'] else 'NOT sustained'} with four peers at "
            f"{args.rate:,} deltas/s for {secs:.0f}s ({r1['entries_verified']:,} entries, {r1['verify_problems']} "
            f"verify problems); shortest sustained tick: {best}."
        )
        rep.targets.append({"target": "1 kHz ticks sustained (four peers, 60 s)", "met": bool(r1["sustained"])})
    for tick in ticks:
        r = results[tick]
        own = r.get("own_p99")
        rep.notes.append(f"9. 1 kHz: own share p99 {own} ms at tick_ms {tick} (goal < 5 ms); garbage collection "
                         f"pauses p99 {r.get('gc_p99')} ms, longest {r.get('gc_max')} ms.")  # fmt: skip
        rep.targets.append(
            {"target": f"own share p99 < 5 ms (tick_ms {tick})", "value_ms": own, "met": own is not None and own < 5}
        )

    def num(v: float | None) -> str:
        return "nan" if v is None else f"{v:.1f}"

    rep.summary["kilohertz"] = (
        f"kilohertz: tick_ms={shortest} sustained={'true' if r1['sustained'] else 'false'} "
        f"commit_p99_ms={num(r1['p99_close'])} own_p99_ms={num(r1.get('own_p99'))}"
    )

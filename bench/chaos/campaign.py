"""One chaos campaign: set up, run the load and the faults for `minutes`, drain, check, report."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.chaos.checker import Checker
from bench.chaos.faults import KINDS, Injector
from bench.chaos.load import SHARDS, Acked, SteadyProducer
from bench.chaos.services import Fleet, RedisServer, cpu_seconds, now_ms
from knhk_stream.kafka.admin import apply_topics
from knhk_stream.kafka.embedded import EmbeddedBroker
from knhk_stream.kafka.topics import load_topics
from knhk_stream.runtime.demo import write_chain

PEERS = ("peer-a", "peer-b", "peer-c", "peer-d")
WORKERS = (
    ("peer-a-1", "peer-a"),
    ("peer-a-2", "peer-a"),
    ("peer-b", "peer-b"),
    ("peer-c", "peer-c"),
    ("peer-d", "peer-d"),
)
THRESHOLD = 3
NOTABLE = (
    "EQUIVOCATION",
    "STALLED",
    "CRITICAL",
    "Traceback",
    "fork refused",
    "predecessor is missing",
    "re-signing",
    "INVALID",
    "offset commit failed",
    "Redis unavailable",
)


@dataclass
class Config:
    minutes: float = 10
    seed: int = 1
    faults: tuple[str, ...] = KINDS
    rate: int = 400  # deltas per second
    fault_interval: float = 8.0  # mean seconds between two fault starts
    out: Path = field(default_factory=lambda: Path(os.environ.get("KNHK_CHAOS_ROOT", ROOT)) / "bench" / "results")
    name: str = "chaos-latest"
    keep: bool = False
    audit: bool = True
    chart: bool = True
    drain_timeout: float = 180


@dataclass
class Outcome:
    config: Config
    figures: dict[str, Any]
    violations: list[dict[str, Any]]
    workdir: Path | None
    files: list[Path]

    @property
    def summary_line(self) -> str:
        m = self.config.minutes
        minutes = int(m) if float(m).is_integer() else m
        f = self.figures
        return (
            f"chaos: minutes={minutes} faults={f['faults_total']} violations={len(self.violations)} "
            f"deltas={f['deltas']['produced']}/{f['deltas']['committed']}"
        )


class Campaign:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.peers = PEERS
        self.closing = threading.Event()
        self.restart_at: dict[str, float] = {}
        self.cpu_other: dict[str, dict[int, float]] = {}
        self.t0 = time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    # -- setting up -------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.workdir = Path(tempfile.mkdtemp(prefix="knhk-chaos-"))
        self.redis = RedisServer(self.workdir).start()
        self.broker = EmbeddedBroker(log_path=self.workdir / "tansu.log").start()
        self.bootstrap = self.broker.bootstrap
        run = uuid.uuid4().hex[:6]
        self.prefix, self.topic_prefix = f"chaos-{run}", f"chaos{run}"
        self.topics = load_topics().renamed(self.topic_prefix).with_partitions(SHARDS)
        apply_topics(self.bootstrap, self.topics)
        self.settings = write_chain(self.workdir, PEERS, THRESHOLD)
        self.settings_path = self.workdir / "chain.toml"
        self.faulty_path = self.workdir / "faulty.toml"
        faulty = dataclasses.replace(self.settings, hook_entrypoint="bench.chaos.hooks:upper")
        self.faulty_path.write_text(faulty.to_toml())
        self.log(
            f"Tansu {self.bootstrap}, redis-server {self.redis.url} (AOF, appendfsync always), work dir "
            f"{self.workdir}; {len(PEERS)} peers, threshold {THRESHOLD}, {SHARDS} shards; seed {cfg.seed}, "
            f"{cfg.minutes} min, {cfg.rate} deltas/s, a fault every ~{cfg.fault_interval:g} s from "
            f"{', '.join(cfg.faults)}"
        )
        self.fleet = Fleet(
            self.workdir,
            self.bootstrap,
            self.redis.url,
            self.prefix,
            self.topic_prefix,
            self.topics.roots.name,
            self.settings_path,
        )
        self.acked = Acked()
        self.injector = Injector(self)
        self.checker = Checker(
            self.settings, self.bootstrap, self.topics, self.redis.url, self.prefix, self.acked, self.injector.faulty_at
        )
        for name, peer in WORKERS:
            self.fleet.add_worker(name, peer)
            self.fleet.start(name)
        for _ in range(2):
            r = self.fleet.new_reader()
            self.checker.add_member(r.name, self.fleet.reader_out(r.name))
        self._wait(lambda: all("resume at offset" in self.fleet.log(n) for n, _ in WORKERS), 90, "workers to join")
        self._wait(
            lambda: all("from offset" in self.fleet.log(r.name) for r in self.fleet.readers()), 60, "readers to join"
        )
        time.sleep(2)  # the last rebalances of peer-a's group settle
        self.log("every worker and reader holds shards")

    def _wait(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.monitor()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout}s waiting for {what}; logs in {self.workdir}")
            time.sleep(0.25)

    # -- watching ---------------------------------------------------------------------------

    def monitor(self) -> None:
        """Report every exit the campaign did not ask for, and restart the process a second later.

        The restart is what a supervisor (systemd, Kubernetes) would do; it keeps the campaign
        meaningful after a crash, which still counts as a violation.
        """
        for p, rc in self.fleet.exited():
            if not p.expected_exit:
                self.checker.violation(
                    "no_unexpected_exit",
                    f"{p.name} (incarnation {p.incarnation}) exited with status {rc}; log: "
                    f"{self.fleet.log_tail(p.name, 800)!r}",
                    f"exit:{p.name}:{p.incarnation}",
                )
                self.log(f"{p.name} exited with status {rc}: restarting it in 1 s")
                self.restart_at[p.name] = time.monotonic() + 1
        if not self.closing.is_set():
            for name, at in list(self.restart_at.items()):
                if time.monotonic() < at or name in self.injector.busy:
                    continue
                del self.restart_at[name]
                with self.fleet.lock:
                    if not self.fleet.procs[name].alive:
                        self.fleet.start(name)
        self.fleet.sample_rss()
        for name, pid in (
            ("tansu", self.broker.pid),
            ("redis-server", self.redis.proc.pid if self.redis.proc else None),
        ):
            cpu = cpu_seconds(pid) if pid else None
            if cpu is not None:
                self.cpu_other.setdefault(name, {})[pid] = cpu

    def cpu_figures(self) -> dict[str, Any]:
        """CPU seconds by kind of process over the run, and the average number of cores they kept busy."""
        import resource

        own = resource.getrusage(resource.RUSAGE_SELF)
        seconds = {
            "workers": sum(sum(p.cpu_s.values()) for p in self.fleet.workers()),
            "reader members": sum(sum(p.cpu_s.values()) for p in self.fleet.readers()),
            **{k: sum(v.values()) for k, v in self.cpu_other.items()},
            "campaign (producer, checker, faults)": own.ru_utime + own.ru_stime,
        }
        wall = time.monotonic() - self.t0
        return {
            "wall_s": round(wall, 1),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "cores": round(sum(seconds.values()) / wall, 2),
        }

    # -- the run ----------------------------------------------------------------------------

    def run_faults(self) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        self.producer = SteadyProducer(self.bootstrap, self.topics.deltas.name, cfg.rate, self.acked, cfg.seed)
        self.checker.start()
        self.producer.start()
        self.faults_from_ms = now_ms()
        end = time.monotonic() + cfg.minutes * 60
        next_at = time.monotonic() + min(5.0, cfg.fault_interval)
        deck: list[str] = []
        n = 0
        last_status = 0.0
        while time.monotonic() < end:
            self.monitor()
            if time.monotonic() >= next_at:
                if not deck:
                    deck = list(cfg.faults)
                    rng.shuffle(deck)
                for i, kind in enumerate(deck):
                    planned = self.injector.plan(kind, rng)
                    if planned is not None:
                        del deck[i]
                        n += 1
                        self.injector.launch(n, kind, planned[0], planned[1], random.Random(cfg.seed * 100_003 + n))
                        next_at = time.monotonic() + rng.uniform(0.5, 1.5) * cfg.fault_interval
                        break
                else:
                    next_at = time.monotonic() + 1
            if time.monotonic() - last_status > 15:
                last_status = time.monotonic()
                heads = self.checker.heads()
                self.log(
                    f"produced {self.acked.count}, committed heads {heads}, faults {n}, "
                    f"violations {len(self.checker.violations)}"
                )
            time.sleep(0.2)
        self.faults_to_ms = now_ms()
        self.log(f"{n} faults injected; lifting the ones still on")
        for f in self.injector.faults:
            if not f.lifted.wait(90):
                self.checker.violation(
                    "checker_error", f"fault #{f.n} {f.kind} was not lifted within 90 s", f"lift{f.n}"
                )
        # The load goes on until every fault has recovered (or given up), so each recovery is measured.
        t = time.monotonic()
        while time.monotonic() - t < 90 and not all(f.resolved.is_set() for f in self.injector.faults):
            self.monitor()
            time.sleep(0.25)
        self.cooldown_s = round(time.monotonic() - t, 1)
        self.producer.stop()
        errors = self.acked.errors[:3] or "no errors"
        self.log(
            f"load stopped after a {self.cooldown_s} s cool-down: {self.acked.count} deltas acknowledged ({errors})"
        )

    def drain(self) -> None:
        """Until every acknowledged delta is committed, the reader group has every root, and the roots topic too."""
        want = {s: max(d, default=-1) for s, d in self.acked.by_shard.items()}
        ch = self.checker

        def committed() -> bool:
            return all(ch.committed_last_offset(s) >= want[s] for s in range(SHARDS))

        def handed_out() -> bool:
            return all(ch.reader_idx[s] == len(ch.committed[s]) for s in range(SHARDS))

        def published() -> bool:
            return all(ce.entry_hash in ch.on_topic[s] for s in range(SHARDS) for ce in ch.committed[s])

        t0 = time.monotonic()
        for cond, what, timeout in (
            (committed, "every delta committed", self.cfg.drain_timeout),
            (published, "every root on the roots topic", 60),
            (handed_out, "every root handed out by the reader group", 60),
        ):
            deadline = time.monotonic() + timeout
            while not cond() and time.monotonic() < deadline:
                self.monitor()
                time.sleep(0.25)
            self.log(f"drain: {what}: {'yes' if cond() else 'NO'} after {time.monotonic() - t0:.1f} s")
        self.drain_s = time.monotonic() - t0

    def stop_all(self) -> None:
        self.closing.set()
        self.monitor()
        for r in self.fleet.readers():
            if r.alive:
                rc, _ = self.fleet.terminate(r.name)
                if rc != 0:
                    self.checker.violation(
                        "no_unexpected_exit", f"{r.name} exited with {rc} on SIGTERM", f"term:{r.name}"
                    )
        for name, _ in WORKERS:
            if self.fleet.procs[name].alive:
                rc, secs = self.fleet.terminate(name)
                if rc != 0:
                    self.checker.violation(
                        "no_unexpected_exit",
                        f"{name} exited with {rc} on the final SIGTERM "
                        f"after {secs:.1f} s; log: {self.fleet.log_tail(name, 600)!r}",
                        f"final:{name}",
                    )
        self.monitor()

    def notable(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for p in self.fleet.procs.values():
            text = self.fleet.log(p.name)
            found = {k: text.count(k) for k in NOTABLE if k in text}
            if found:
                out[p.name] = found
        return out

    def close(self) -> None:
        self.closing.set()
        for closer in (self.checker.close, self.fleet.close, self.broker.stop, self.redis.kill):
            try:
                closer()
            except Exception as e:
                self.log(f"clean-up: {type(e).__name__}: {e}")


def run(cfg: Config) -> Outcome:
    from bench.chaos.report import figures, write

    unknown = set(cfg.faults) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    c = Campaign(cfg)
    try:
        c.setup()
        c.run_faults()
        c.drain()
        c.stop_all()
        c.log("final checks (topics read to their end, full verification, audit replay of every shard)")
        final = c.checker.final(audit=cfg.audit)
        figs = figures(c, final)
        violations = [v.to_json() for v in c.checker.violations]
        files = write(cfg, figs, violations, c)
    finally:
        c.close()
    keep = cfg.keep or bool(violations)
    if not keep:
        shutil.rmtree(c.workdir, ignore_errors=True)
    else:
        c.log(f"logs kept in {c.workdir}")
    return Outcome(cfg, figs, violations, c.workdir if keep else None, files)

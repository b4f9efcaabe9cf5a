"""The fault kinds, how each is injected and lifted, and when the system counts as recovered from it.

Each fault runs in a thread of its own, so faults overlap. A fault holds the resources it hurts
(a worker, "redis", "broker", "faulty", a reader) until it is lifted, so two faults never fight
over one process; the schedule (campaign.py) picks a kind, then a free target for it.

Recovery ("head moving again") is measured from the moment a fault is lifted:
- worker faults and faulty_hook: until the peer's votes agree with the committed entry on every
  shard for a beat after the head each shard had when the fault was lifted (the peer is back in step);
- redis_kill, broker_pause, vote_garbage: until every shard has committed past its head at lift;
- bad_deltas: until every record of the burst is inside a committed entry;
- reader_kill: until the RootsReader group has handed out every shard's head at lift.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.chaos.services import SESSION_TIMEOUT_MS, now_ms

if TYPE_CHECKING:
    from bench.chaos.campaign import Campaign

KINDS = (
    "worker_kill",
    "worker_zombie",
    "worker_term",
    "redis_kill",
    "broker_pause",
    "bad_deltas",
    "vote_garbage",
    "faulty_hook",
    "reader_kill",
)
DESCRIPTIONS = {
    "worker_kill": "SIGKILL of a random worker, restarted after 1-5 s",
    "worker_zombie": f"SIGSTOP of one of peer-a's two workers for {SESSION_TIMEOUT_MS / 1000 + 2:.0f}-"
    f"{SESSION_TIMEOUT_MS / 1000 + 6:.0f} s (longer than its {SESSION_TIMEOUT_MS / 1000:.0f} s session timeout), "
    "then SIGCONT",
    "worker_term": "SIGTERM of a random worker in the middle of a beat, restarted after 1-5 s",
    "redis_kill": "SIGKILL of redis-server, restarted on its AOF after 1-5 s",
    "broker_pause": "SIGSTOP of the broker for 2-5 s, then SIGCONT",
    "bad_deltas": "a burst of 20-80 malformed, rejected and oversized deltas (up to 500 KB)",
    "vote_garbage": "a burst of 20-80 garbage, truncated, forged and foreign records on the votes topic",
    "faulty_hook": "one peer (of those with one worker) restarted with a buggy hook under the chain's hook name "
    "for 10-25 s, then with the right one",
    "reader_kill": "SIGKILL of a RootsReader group member, replaced after 1-3 s",
}
RECOVERY_TIMEOUT_S = 120


@dataclass
class Fault:
    n: int
    kind: str
    target: str
    start_ms: int = 0
    lifted_ms: int | None = None
    recovered_ms: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    lifted: threading.Event = field(default_factory=threading.Event, repr=False)
    resolved: threading.Event = field(default_factory=threading.Event, repr=False)  # recovered or given up

    @property
    def recovery_s(self) -> float | None:
        if self.lifted_ms is None or self.recovered_ms is None:
            return None
        return (self.recovered_ms - self.lifted_ms) / 1000

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "kind": self.kind,
            "target": self.target,
            "start_ms": self.start_ms,
            "lifted_ms": self.lifted_ms,
            "recovered_ms": self.recovered_ms,
            "recovery_s": self.recovery_s,
            "detail": self.detail,
            "error": self.error,
        }


class Injector:
    """Picks targets, injects and lifts faults, and waits for recovery, against one campaign."""

    def __init__(self, campaign: Campaign) -> None:
        self.c = campaign
        self.busy: set[str] = set()
        self.lock = threading.Lock()
        self.faulty_windows: list[tuple[str, int, int | None]] = []  # (peer, from ms, to ms)
        self.threads: list[threading.Thread] = []
        self.faults: list[Fault] = []

    # -- choosing ---------------------------------------------------------------------------

    def _free(self, names: list[str]) -> list[str]:
        """The names no fault holds; of peer-a's two workers, only while the other is not held either.

        Tansu limit (found by this campaign, see README.md): after a member of a group was stopped past
        its session timeout and came back, a group whose members all left (SIGTERM) never assigns
        partitions to new members. So peer-a's group is never emptied: at most one of its workers is
        hurt at a time (the zombie fault then still finds its shards moved to the other).
        """
        fleet = self.c.fleet
        out = []
        for n in names:
            if n in self.busy:
                continue
            p = fleet.procs.get(n)
            siblings = [w.name for w in fleet.workers(p.peer) if w.name != n] if p and p.role == "worker" else []
            if not any(w in self.busy for w in siblings):
                out.append(n)
        return out

    def plan(self, kind: str, rng: random.Random) -> tuple[str, list[str]] | None:
        """A target for `kind` and the resources it holds, or None when none is free now."""
        fleet = self.c.fleet
        with self.lock:
            if kind in ("worker_kill", "worker_term"):
                free = self._free([w.name for w in fleet.workers()])
                return (t := rng.choice(free), [t]) if free else None
            if kind == "worker_zombie":
                free = self._free([w.name for w in fleet.workers("peer-a")])
                return (t := rng.choice(free), [t]) if free else None
            if kind in ("redis_kill", "broker_pause"):
                res = kind.split("_")[0]
                return None if res in self.busy else (res, [res])
            if kind in ("bad_deltas", "vote_garbage"):
                return None if kind in self.busy else (kind, [kind])
            if kind == "faulty_hook":
                if "faulty" in self.busy:
                    return None
                # A peer with one worker: restarting both of peer-a's at once could empty its group (above).
                peers = [
                    p for p in self.c.peers if len(fleet.workers(p)) == 1 and fleet.workers(p)[0].name not in self.busy
                ]
                if not peers:
                    return None
                peer = rng.choice(peers)
                return peer, ["faulty", *(w.name for w in fleet.workers(peer))]
            if kind == "reader_kill":
                free = self._free([r.name for r in fleet.readers() if r.alive])
                return (t := rng.choice(free), [t]) if free else None
        raise ValueError(f"unknown fault kind {kind!r}")

    def launch(self, n: int, kind: str, target: str, holds: list[str], rng: random.Random) -> Fault:
        fault = Fault(n, kind, target)
        with self.lock:
            self.busy.update(holds)
            self.faults.append(fault)
        run: Callable[[Fault, random.Random], None] = getattr(self, f"_{kind}")

        def body() -> None:
            try:
                fault.start_ms = now_ms()
                self.c.log(f"fault #{n} {kind} -> {target}")
                run(fault, rng)
            except Exception as e:  # a failed injection is reported, and the campaign goes on
                fault.error = f"{type(e).__name__}: {e}"
                self.c.log(f"fault #{n} {kind} failed: {fault.error}")
            finally:
                if fault.lifted_ms is None:
                    fault.lifted_ms = now_ms()
                fault.lifted.set()
                # A worker is free for the next fault only once it holds shards again (Fleet.wait_joined).
                for name in holds:
                    p = self.c.fleet.procs.get(name)
                    if p is not None and p.role == "worker" and p.alive:
                        self.c.fleet.wait_joined(name)
                with self.lock:
                    self.busy.difference_update(holds)
            try:
                if fault.error is None:
                    self._await_recovery(fault)
            finally:
                fault.resolved.set()

        t = threading.Thread(target=body, name=f"fault-{n}-{kind}", daemon=True)
        self.threads.append(t)
        t.start()
        return fault

    def faulty_at(self, peer: str, at_ms: int) -> bool:
        return any(
            p == peer and start <= at_ms and (end is None or at_ms <= end) for p, start, end in self.faulty_windows
        )

    # -- the kinds --------------------------------------------------------------------------

    def _lift(self, fault: Fault) -> None:
        fault.lifted_ms = now_ms()
        fault.detail["heads_at_lift"] = self.c.checker.heads()

    def _worker_kill(self, fault: Fault, rng: random.Random) -> None:
        self.c.fleet.kill(fault.target)
        fault.detail["down_s"] = down = round(rng.uniform(1, 5), 2)
        time.sleep(down)
        self.c.fleet.start(fault.target)
        self._lift(fault)

    def _worker_zombie(self, fault: Fault, rng: random.Random) -> None:
        self.c.fleet.sigstop(fault.target)
        fault.detail["stopped_s"] = stopped = round(
            rng.uniform(SESSION_TIMEOUT_MS / 1000 + 2, SESSION_TIMEOUT_MS / 1000 + 6), 2
        )
        time.sleep(stopped)
        self.c.fleet.sigcont(fault.target)
        self._lift(fault)

    def _terminate(self, name: str, fault: Fault) -> None:
        if not self.c.fleet.wait_joined(name):
            fault.detail.setdefault("sigterm_before_join", []).append(name)
        rc, secs = self.c.fleet.terminate(name)
        fault.detail.setdefault("sigterm", []).append({"worker": name, "rc": rc, "seconds": round(secs, 2)})
        if rc != 0:
            what = "did not exit within 30 s (killed)" if rc is None else f"exited with status {rc}"
            self.c.checker.violation(
                "no_unexpected_exit",
                f"{name} {what} after SIGTERM (fault #{fault.n}); log: {self.c.fleet.log_tail(name, 600)!r}",
                f"term:{name}:{fault.n}",
            )

    def _worker_term(self, fault: Fault, rng: random.Random) -> None:
        self.c.fleet.wait_joined(fault.target)
        beat = 8 * self.c.settings.tick_ms
        into = rng.uniform(0.3, 0.7) * beat
        wait = (into - time.time() * 1000 % beat) % beat
        time.sleep(wait / 1000)
        fault.detail["ms_into_beat"] = round(time.time() * 1000 % beat)
        self._terminate(fault.target, fault)
        fault.detail["down_s"] = down = round(rng.uniform(1, 5), 2)
        time.sleep(down)
        self.c.fleet.start(fault.target)
        self._lift(fault)

    def _redis_kill(self, fault: Fault, rng: random.Random) -> None:
        self.c.redis.kill()
        fault.detail["down_s"] = down = round(rng.uniform(1, 5), 2)
        time.sleep(down)
        self.c.redis.start()
        self._lift(fault)

    def _broker_pause(self, fault: Fault, rng: random.Random) -> None:
        pid = self.c.broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        fault.detail["paused_s"] = paused = round(rng.uniform(2, 5), 2)
        try:
            time.sleep(paused)
        finally:
            os.kill(pid, signal.SIGCONT)
        self._lift(fault)

    def _bad_deltas(self, fault: Fault, rng: random.Random) -> None:
        from bench.chaos.load import bad_deltas_burst

        n = rng.randint(20, 80)
        offsets = bad_deltas_burst(
            self.c.bootstrap,
            self.c.topics.deltas.name,
            self.c.acked,
            rng,
            n,
            self.c.settings.max_triples,
            f"bad{fault.n}",
        )
        fault.detail.update(records=n, acknowledged=len(offsets))
        fault.detail["offsets"] = offsets
        self._lift(fault)

    def _vote_garbage(self, fault: Fault, rng: random.Random) -> None:
        from bench.chaos.load import vote_garbage_burst

        heads = {s: (ce[-1].entry.cycle, ce[-1].entry_hash) for s, ce in self.c.checker.committed.items() if ce}
        n = rng.randint(20, 80)
        fault.detail["records"] = n
        fault.detail["kinds"] = vote_garbage_burst(
            self.c.bootstrap, self.c.topics.votes.name, self.c.settings, rng, n, heads
        )
        self._lift(fault)

    def _faulty_hook(self, fault: Fault, rng: random.Random) -> None:
        peer = fault.target
        workers = [w.name for w in self.c.fleet.workers(peer)]
        window = [peer, now_ms(), None]
        self.faulty_windows.append(tuple(window))  # type: ignore[arg-type]
        idx = len(self.faulty_windows) - 1
        try:
            for name in workers:
                self._terminate(name, fault)
                self.c.fleet.start(name, settings=self.c.faulty_path)
            fault.detail["faulty_s"] = faulty = round(rng.uniform(10, 25), 2)
            time.sleep(faulty)
            for name in workers:
                self._terminate(name, fault)
        finally:
            self.faulty_windows[idx] = (peer, window[1], now_ms())  # type: ignore[arg-type]
            for name in workers:
                if not self.c.fleet.procs[name].alive:
                    self.c.fleet.start(name, settings=self.c.settings_path)
        self._lift(fault)

    def _reader_kill(self, fault: Fault, rng: random.Random) -> None:
        self.c.checker.killed_readers.add(fault.target)
        self.c.fleet.kill(fault.target)
        fault.detail["replaced_after_s"] = wait = round(rng.uniform(1, 3), 2)
        time.sleep(wait)
        new = self.c.fleet.new_reader()
        self.c.checker.add_member(new.name, self.c.fleet.reader_out(new.name))
        fault.detail["replacement"] = new.name
        self._lift(fault)

    # -- recovery ---------------------------------------------------------------------------

    def _recovered(self, fault: Fault) -> bool:
        ch = self.c.checker
        at_lift: dict[int, int | None] = fault.detail.get("heads_at_lift", {})
        if fault.kind in ("worker_kill", "worker_zombie", "worker_term", "faulty_hook"):
            peer = fault.target if fault.kind == "faulty_hook" else self.c.fleet.procs[fault.target].peer
            return all(ch.agree.get((peer, s), -1) > (-1 if h is None else h) for s, h in at_lift.items())
        if fault.kind in ("redis_kill", "broker_pause", "vote_garbage"):
            heads = ch.heads()
            return all(heads[s] is not None and (h is None or heads[s] > h) for s, h in at_lift.items())
        if fault.kind == "bad_deltas":
            return all(ch.committed_last_offset(s) >= off for s, off in fault.detail.get("offsets", []))
        if fault.kind == "reader_kill":
            return all(h is None or (ch.reader_last[s] or -1) >= h for s, h in at_lift.items())
        return True

    def _await_recovery(self, fault: Fault) -> None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline and not self.c.closing.is_set():
            if self._recovered(fault):
                fault.recovered_ms = now_ms()
                self.c.log(f"fault #{fault.n} {fault.kind} recovered in {fault.recovery_s:.1f} s")
                return
            time.sleep(0.25)
        if self.c.closing.is_set():
            fault.detail["recovery"] = "the campaign ended first"
        else:
            fault.detail["recovery"] = f"not within {RECOVERY_TIMEOUT_S} s"
            self.c.log(f"fault #{fault.n} {fault.kind}: not recovered within {RECOVERY_TIMEOUT_S} s")

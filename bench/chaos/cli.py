"""`python -m bench.chaos` / `make chaos`: the options, one campaign, the report and the summary line."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

import bench.chaos
from bench.chaos.campaign import Config, run
from bench.chaos.faults import KINDS


def parse_args(argv: Iterable[str] | None = None) -> Config:
    ap = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=(bench.chaos.__doc__ or "").split("\n\n")[0],
        epilog=(bench.chaos.__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--minutes", type=float, default=10, help="how long the faults go on, under load (default 10)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fault schedule and the load (default 1)")
    ap.add_argument(
        "--faults", default=",".join(KINDS), help=f"comma-separated kinds, from {', '.join(KINDS)} (default all)"
    )
    ap.add_argument("--rate", type=int, default=400, help="steady load, deltas per second (default 400)")
    ap.add_argument(
        "--fault-interval",
        type=float,
        default=8.0,
        help="mean seconds between two fault starts, each drawn from 0.5x..1.5x (default 8)",
    )
    ap.add_argument("--out", type=Path, default=None, help="where the report goes (default bench/results)")
    ap.add_argument("--name", default="chaos-latest", help="file name of the report, without suffix")
    ap.add_argument("--keep", action="store_true", help="keep the work directory with every log")
    ap.add_argument("--no-audit", action="store_true", help="skip the final audit_shard replay of every shard")
    ap.add_argument("--no-chart", action="store_true", help="no PNG timeline")
    ap.add_argument(
        "--ref", help="test the code of this git ref (a copy by `git archive`; default: the checkout as it is)"
    )
    a = ap.parse_args(list(argv) if argv is not None else None)
    faults = tuple(k.strip() for k in a.faults.split(",") if k.strip())
    unknown = sorted(set(faults) - set(KINDS))
    if unknown or not faults:
        ap.error(f"--faults: unknown kinds {unknown}; known: {', '.join(KINDS)}")
    if a.minutes <= 0 or a.rate <= 0 or a.fault_interval <= 0:
        ap.error("--minutes, --rate and --fault-interval must be positive")
    cfg = Config(
        minutes=a.minutes,
        seed=a.seed,
        faults=faults,
        rate=a.rate,
        fault_interval=a.fault_interval,
        name=a.name,
        keep=a.keep,
        audit=not a.no_audit,
        chart=not a.no_chart,
    )
    if a.out is not None:
        cfg.out = a.out
    return cfg


def main(argv: Iterable[str] | None = None) -> int:
    cfg = parse_args(argv)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # clean up the processes and the broker on SIGTERM too
    outcome = run(cfg)
    for f in outcome.files:
        print(f"wrote {f}")
    print(outcome.summary_line, flush=True)
    return 1 if outcome.violations else 0


if __name__ == "__main__":
    sys.exit(main())

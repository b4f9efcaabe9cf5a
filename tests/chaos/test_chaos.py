"""The chaos campaign's short form for CI (issue 15): 60 seconds of overlapping faults with a fixed seed.

`make chaos` is the long run (10 minutes by default, by hand); this one runs in `make test`. Every fault
kind is injected at least once, and the checker, which reads Kafka and Redis itself, must find no
violation of any invariant (bench/chaos/checker.py lists them).
"""

from __future__ import annotations

import shutil

import pytest

from bench.chaos.campaign import Config, run
from bench.chaos.faults import KINDS

pytestmark = pytest.mark.integration

SEED = 15


@pytest.mark.timeout(600)
def test_sixty_seconds_of_chaos_break_no_invariant(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("the chaos campaign needs a redis-server binary to kill and restart one of its own")
    cfg = Config(minutes=1, seed=SEED, fault_interval=4, out=tmp_path, name="chaos-ci", chart=False)
    outcome = run(cfg)
    print(outcome.summary_line)
    injected = {k: v["injected"] for k, v in outcome.figures["faults_by_kind"].items()}
    assert all(injected.get(k, 0) >= 1 for k in KINDS), injected
    problems = "\n".join(f"{v['invariant']}: {v['detail'][:600]}" for v in outcome.violations)
    assert not outcome.violations, f"{len(outcome.violations)} violations (logs in {outcome.workdir}):\n{problems}"
    deltas = outcome.figures["deltas"]
    assert deltas["produced"] == deltas["committed"] > 0

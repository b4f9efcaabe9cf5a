"""5. Scale-out: one versus two worker processes of one peer (each from its shard assignment to its
last commit), in the same run."""

from __future__ import annotations

import argparse

from bench.cases.one import one_peer_run
from bench.cluster import Env
from bench.harness import Report, Result, log
from bench.load import json_values

NEEDS = "kafka"


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
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

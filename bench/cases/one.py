"""3. One peer: one `knhk-stream worker` on 4 shards (1 peer, threshold 1), topic -> committed entries,
beside bare consume of the same topic; and the same worker with the core at --baseline-ref."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.baseline import extract_ref, hybrid_tree
from bench.cases.bare import bare_consume, bare_median, versus_bare
from bench.cluster import SESSION_TIMEOUT_MS, Committed, Env, Workers, chain_settings
from bench.harness import Report, Result, log
from bench.load import json_values, produce_all
from bench.profiling import PySpy, summarize_collapsed
from knhk_stream.store.lockchain import LockchainStore

NEEDS = "kafka"


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
    with env.measurement(tag) as (prefix, topic_prefix, topics, wd):
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


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
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
    rep.add(
        versus_bare(
            "3. One peer",
            "1 worker, topic -> committed entries (nothing subtracted)",
            res,
            "e2e",
            label="1 peer e2e, nothing subtracted",
            extra={"total_s": [r["total_s"] for r in res]},
        )
    )
    after = rep.add(
        versus_bare(
            "3. One peer",
            "1 worker, after the group join (from its shard assignment to its last commit)",
            res,
            "after_join",
            label="1 peer after join",
        )
    )
    # the stable line (issue 14): medians of the same runs, the ratio of the medians (target >= 0.25)
    ratio = after.ratio
    rep.summary["one-worker"] = (
        f"one-worker: after_join={after.median:.0f} bare={after.baseline_median:.0f} "
        f"ratio={'nan' if ratio is None else f'{ratio:.2f}'}"
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
                    versus_bare(
                        "3. One peer",
                        f"1 worker with the core at {args.baseline_ref} (before), after the join",
                        bres,
                        "after_join",
                        label="1 peer after join, core before",
                        note="this tree with decode/hooks/receipts/beats/merkle/encoding from the baseline ref",
                        extra={"e2e": [r["e2e"] for r in bres]},
                    )
                )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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

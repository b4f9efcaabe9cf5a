"""The campaign's figures, and its report: {name}.json, {name}.md (tables) and {name}.png (timeline)."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.chaos.checker import INVARIANTS
from bench.chaos.faults import DESCRIPTIONS, KINDS
from bench.harness import percentile
from bench.report import git_meta, load_avg

if TYPE_CHECKING:
    from bench.chaos.campaign import Campaign, Config

AFTER_MS = 30_000  # "in the 30 s after each kind of fault"


def _pcts(xs: list[float]) -> dict[str, float | int | None]:
    return {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99), "max": max(xs) if xs else None}


def _code_meta() -> dict[str, Any]:
    """The commit of the code under test (the campaign's frozen copy says where it came from)."""
    if os.environ.get("KNHK_CHAOS_COMMIT"):
        return {
            "commit": os.environ["KNHK_CHAOS_COMMIT"],
            "dirty": bool(os.environ.get("KNHK_CHAOS_DIRTY")),
            "code": os.environ.get("KNHK_CHAOS_SOURCE", "a copy of knhk_stream/ and bench/ taken at the start"),
        }
    return {**git_meta(), "code": "the checkout itself"}


def figures(c: Campaign, final: dict[str, Any]) -> dict[str, Any]:
    ch, cfg = c.checker, c.cfg
    faults = c.injector.faults
    lat = [(end, ms) for end, ms, _ in ch.latencies]
    overall = [ms for _, ms in lat]
    windows = [(f.start_ms, (f.lifted_ms or f.start_ms) + AFTER_MS) for f in faults]
    quiet = [ms for end, ms in lat if not any(a <= end <= b for a, b in windows)]
    by_kind: dict[str, Any] = {}
    for kind in KINDS:
        fs = [f for f in faults if f.kind == kind]
        if not fs and kind not in cfg.faults:
            continue
        after = [ms for end, ms in lat if any(f.start_ms <= end <= f.start_ms + AFTER_MS for f in fs)]
        rec = [f.recovery_s for f in fs if f.recovery_s is not None]
        by_kind[kind] = {
            "injected": len(fs),
            "failed": sum(1 for f in fs if f.error),
            "not_recovered": sum(1 for f in fs if str(f.detail.get("recovery", "")).startswith("not within")),
            "recovery_s": {
                "n": len(rec),
                "p50": statistics.median(rec) if rec else None,
                "max": max(rec) if rec else None,
            },
            "latency_30s_after_ms": _pcts(after),
            "targets": sorted({f.target for f in fs}),
        }
    kinds_bad: dict[str, int] = {k: v for k, v in sorted(c.acked.kinds.items()) if k != "steady"}
    procs = {
        p.name: {
            "role": p.role,
            "peak_rss_mb": round(p.peak_rss_mb, 1),
            "cpu_s": round(sum(p.cpu_s.values()), 1),
            "incarnations": p.incarnation,
            "exits": [{k: v for k, v in e.items() if k != "pid"} for e in p.exits],
        }
        for p in c.fleet.procs.values()
    }
    return {
        "meta": {
            **_code_meta(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg_end": load_avg(),
            "workdir": str(c.workdir),
        },
        "config": {
            "minutes": cfg.minutes,
            "seed": cfg.seed,
            "faults": list(cfg.faults),
            "rate": cfg.rate,
            "fault_interval_s": cfg.fault_interval,
            "peers": list(c.peers),
            "threshold": 3,
            "workers": {p.name: p.peer for p in c.fleet.workers()},
            "tick_ms": c.settings.tick_ms,
            "session_timeout_ms": 6000,
        },
        "faults_total": len(faults),
        "faults_by_kind": by_kind,
        "faults": [f.to_json() for f in faults],
        "deltas": {
            "produced": final["produced"],
            "committed": final["committed"],
            "steady": c.acked.kinds.get("steady", 0),
            "bad": sum(kinds_bad.values()),
            "bad_by_kind": kinds_bad,
            "producer_errors": len(c.acked.errors),
            "records_not_acknowledged": final["records_not_acknowledged"],
            "markers": final["markers"],
            "producer_behind_s": round(c.producer.behind_s, 3),
        },
        "entries": final["entries"],
        "latency_ms": {
            "overall": _pcts(overall),
            "quiet": _pcts(quiet),
            "definition": "committed_at_ms - end of the beat ((cycle+1) * 8 * tick_ms)",
        },
        "processes": procs,
        "cpu": c.cpu_figures(),
        "checks": dict(sorted(ch.counts.items()))
        | {
            "checker_rounds": ch.rounds,
            "redis_errors_seen": ch.redis_errors,
            "reader_redeliveries_after_crash": ch.redeliveries,
        },
        "reader_stats": {n: m.stats for n, m in ch.members.items()},
        "notable_log_lines": c.notable(),
        "audits": final["audits"],
        "drain_s": round(getattr(c, "drain_s", 0.0), 1),
        "cooldown_s": getattr(c, "cooldown_s", None),
        "checker_round_s": {"p50": percentile(ch.round_s, 50), "max": max(ch.round_s, default=None)},
        "timeline": {
            "t_ms": [t for t, _ in ch.timeline],
            "heads": [h for _, h in ch.timeline],
            "faults_from_ms": c.faults_from_ms,
            "faults_to_ms": c.faults_to_ms,
        },
    }


def _f(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:,.1f}{unit}"


def markdown(figs: dict[str, Any], violations: list[dict[str, Any]]) -> str:
    cfg, d, lat, meta = figs["config"], figs["deltas"], figs["latency_ms"], figs["meta"]
    code = f"commit {meta.get('commit', '?')}{' with local changes' if meta.get('dirty') else ''} ({meta.get('code')})"
    lines = [
        "# Chaos campaign",
        "",
        f"{cfg['minutes']} minutes of faults, seed {cfg['seed']}, {cfg['rate']} deltas/s, a fault every "
        f"~{cfg['fault_interval_s']:g} s; {len(cfg['peers'])} peers (threshold {cfg['threshold']}), workers "
        f"{', '.join(f'{w} ({p})' for w, p in cfg['workers'].items())}; Tansu, redis-server with AOF "
        f"(appendfsync always). Code: {code}; {meta['cpus']} CPUs, load "
        f"average at the end {figs['meta']['load_avg_end']}.",
        "",
        f"**Violations: {len(violations)}.** Deltas produced {d['produced']:,} ({d['steady']:,} steady, {d['bad']:,} "
        f"bad), committed as receipts {d['committed']:,}. Faults injected: {figs['faults_total']}.",
        "",
        "| fault | injected | recovery p50 / max (s) | not recovered | latency p50 / p99 in the 30 s after (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, k in figs["faults_by_kind"].items():
        r, a = k["recovery_s"], k["latency_30s_after_ms"]
        lines.append(
            f"| {kind} | {k['injected']} | {_f(r['p50'])} / {_f(r['max'])} | {k['not_recovered']} | "
            f"{_f(a['p50'])} / {_f(a['p99'])} |"
        )
    o, q = lat["overall"], lat["quiet"]
    lines += [
        "",
        f"Commit latency ({lat['definition']}): overall p50 {_f(o['p50'])} ms, p99 {_f(o['p99'])} ms, max "
        f"{_f(o['max'])} ms over {o['n']} entries; away from faults (no fault started within 30 s before the beat's "
        f"end) p50 {_f(q['p50'])} ms, p99 {_f(q['p99'])} ms over {q['n']} entries.",
        "",
        "Recovery is measured from the moment the fault is lifted (restart, SIGCONT, Redis back, burst acknowledged): "
        "worker faults and the faulty hook until the peer's votes agree with the committed entry on every shard for a "
        "beat after the head it had then; Redis, broker and vote garbage until every shard has committed past that "
        "head; bad deltas until the whole burst is committed; reader kill until the group has handed out every head.",
        "",
        "| invariant | violations |",
        "| --- | ---: |",
    ]
    for name, what in INVARIANTS.items():
        n = sum(1 for v in violations if v["invariant"] == name)
        lines.append(f"| {what} | {n} |")
    other = [v for v in violations if v["invariant"] not in INVARIANTS]
    if other:
        lines.append(f"| checker errors | {len(other)} |")
    lines += ["", "| process | peak RSS (MB) | CPU (s) | incarnations |", "| --- | ---: | ---: | ---: |"]
    for name, p in figs["processes"].items():
        lines.append(f"| {name} ({p['role']}) | {p['peak_rss_mb']:.1f} | {p['cpu_s']:.1f} | {p['incarnations']} |")
    cpu = figs["cpu"]
    lines += [
        "",
        f"CPU over the {cpu['wall_s']:.0f} s of the run: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in cpu["seconds"].items())
        + f"; {cpu['cores']:.2f} cores on average.",
    ]
    checks = figs["checks"]
    lines += [
        "",
        "What the checker checked: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in checks.items()) + ".",
    ]
    if d["bad_by_kind"]:
        lines += ["", "Bad deltas by kind: " + ", ".join(f"{k} {v}" for k, v in d["bad_by_kind"].items()) + "."]
    if figs["notable_log_lines"]:
        lines += [
            "",
            "Notable worker and reader log lines (counts): "
            + "; ".join(
                f"{n}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for n, c in figs["notable_log_lines"].items()
            )
            + ".",
        ]
    lines += ["", "Fault kinds:", ""] + [f"- `{k}`: {DESCRIPTIONS[k]}" for k in KINDS]
    if violations:
        lines += ["", "## Violations", ""] + [
            f"- `{v['invariant']}`: {v['detail']}" + (f" (and {v['repeats']} more like it)" if v["repeats"] else "")
            for v in violations
        ]
    return "\n".join(lines) + "\n"


def chart(figs: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (it is in the dev extra): no PNG timeline", flush=True)
        return False
    tl = figs["timeline"]
    if not tl["t_ms"]:
        return False
    t0 = tl["faults_from_ms"]
    xs = [(t - t0) / 1000 for t in tl["t_ms"]]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    base = min((h for hs in tl["heads"] for h in hs if h is not None), default=0)
    for s in range(len(tl["heads"][0])):
        ys = [None if hs[s] is None else hs[s] - base for hs in tl["heads"]]
        ax.plot(xs, ys, lw=1.2, label=f"shard {s}")
    colors = dict(zip(KINDS, plt.get_cmap("tab10").colors, strict=False))
    seen: set[str] = set()
    for f in figs["faults"]:
        a = (f["start_ms"] - t0) / 1000
        b = ((f["lifted_ms"] or f["start_ms"]) - t0) / 1000
        kind = f["kind"]
        kw = {"label": kind} if kind not in seen else {}
        seen.add(kind)
        for axis in (ax, ax2):
            axis.axvspan(a, max(b, a + 0.4), color=colors[kind], alpha=0.25, lw=0, **(kw if axis is ax else {}))
    ax.set_ylabel(f"committed head (cycle - {base})")
    ax.set_title(
        f"chaos: {figs['config']['minutes']} min, seed {figs['config']['seed']}, {figs['faults_total']} "
        f"faults; deltas {figs['deltas']['produced']}/{figs['deltas']['committed']}"
    )
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    lat = figs.get("latency_points") or []
    if lat:
        ax2.scatter([(e - t0) / 1000 for e, _ in lat], [ms for _, ms in lat], s=3, color="k")
    ax2.set_yscale("log")
    ax2.set_ylabel("commit latency (ms)")
    ax2.set_xlabel("seconds since the faults started")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(cfg: Config, figs: dict[str, Any], violations: list[dict[str, Any]], c: Campaign) -> list[Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    figs["latency_points"] = [(end, ms) for end, ms, _ in c.checker.latencies]
    js = out / f"{cfg.name}.json"
    js.write_text(json.dumps({**figs, "violations": violations}, indent=1, default=str) + "\n")
    files.append(js)
    md = out / f"{cfg.name}.md"
    text = markdown(figs, violations)
    md.write_text(text)
    files.append(md)
    print(text, flush=True)
    png = out / f"{cfg.name}.png"
    if cfg.chart and chart(figs, png):
        files.append(png)
    return files

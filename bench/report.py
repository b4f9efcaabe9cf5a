"""The results in bench/results: latest.json (raw runs), latest.md (tables), latest.png (chart;
needs matplotlib), and the run's metadata (commit, load average)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.cases.bare import bare_median
from bench.harness import Report, fmt, log


def write_all(rep: Report, meta: dict[str, Any], out: Path) -> None:
    """latest.json, latest.md and latest.png in `out`, and a log line for each."""
    out_json = out / "latest.json"
    out_json.write_text(
        json.dumps(
            {
                "meta": meta,
                "results": [r.to_json() for r in rep.results],
                "targets": rep.targets,
                "summary": list(rep.summary.values()),
                "notes": rep.notes,
                "errors": rep.errors,
            },
            indent=2,
        )
    )
    write_markdown(rep, meta, out / "latest.md")
    chart = write_chart(rep, out / "latest.png")
    log(chart)
    log(f"wrote {out_json}, {out / 'latest.md'} in {meta['seconds']:.0f}s")


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
    if rep.summary:
        lines += ["", "## Summary lines", "", "```", *rep.summary.values(), "```"]
    if rep.notes or rep.errors:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in rep.notes]
        lines += [f"- ERROR: {e}" for e in rep.errors]
    lines += ["", "Chart: `latest.png`. Raw numbers: `latest.json` (both beside this file).", ""]
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

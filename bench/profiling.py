"""Profiles (--profile): py-spy of a worker, summarized as inclusive/self shares, and pyinstrument
(or cProfile) of the core."""

from __future__ import annotations

import argparse
import io
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench.baseline import CURRENT, Pkg
from bench.harness import log
from bench.load import json_values


class PySpy:
    """py-spy record of a worker (raw collapsed stacks), summarized as inclusive/self percentages."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc: subprocess.Popen[bytes] | None = None
        if not Path(exe).exists():
            log("  py-spy not found: no worker profile (pip install py-spy)")
            return
        cmd = [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking", "-o", str(out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def summarize_collapsed(path: Path, top: int = 30) -> str:
    """Inclusive and self sample shares per function from py-spy raw (collapsed) output."""
    incl: dict[str, int] = {}
    selfc: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no profile)"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]  # fmt: skip
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
        if frames:
            selfc[frames[-1]] = selfc.get(frames[-1], 0) + k
    if not total:
        return "(no samples)"
    out = [f"{total} samples", "", "inclusive %  function", "-----------  --------"]
    for f, k in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * k / total:10.1f}%  {f}")
    out += ["", "self %       function", "-----------  --------"]
    for f, k in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * k / total:10.1f}%  {f}")
    return "\n".join(out)


def profile_core(args: argparse.Namespace) -> None:
    from bench.cases.core import core_feed

    values = json_values(args.deltas)
    pkg = Pkg(CURRENT)
    out = args.out / "profile_core.txt"
    try:
        from pyinstrument import Profiler
    except ImportError:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(core_feed, pkg, values)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out.write_text(buf.getvalue())
        return
    p = Profiler(interval=0.0005)
    p.start()
    core_feed(pkg, values)
    p.stop()
    out.write_text(p.output_text(unicode=False, color=False, show_all=False))

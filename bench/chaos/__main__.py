"""`python -m bench.chaos`: the campaign runs on a copy of the code, frozen when it starts.

Workers are restarted all through a campaign, and each restart imports knhk_stream afresh: in a
checkout that someone edits meanwhile, peers would run different code (and rightly dissent). So the
campaign copies knhk_stream/ and bench/ into a directory of its own and runs everything from there
(this process, the workers and the reader members); the report goes to the checkout's bench/results.
`--ref REF` takes that copy from a git ref instead (`git archive`), e.g. `--ref HEAD` for the
committed code without the checkout's local changes.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("KNHK_CHAOS_CODE"):
    from bench.chaos.cli import main

    sys.exit(main())

root = Path(__file__).resolve().parents[2]
args = sys.argv[1:]
ref = None
if "--ref" in args:
    i = args.index("--ref")
    ref, args = args[i + 1], args[:i] + args[i + 2 :]


def git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


code = Path(tempfile.mkdtemp(prefix="knhk-chaos-code-"))
try:
    if ref is None:
        for pkg in ("knhk_stream", "bench"):
            shutil.copytree(root / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__", "results", "*.pyc"))
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "knhk_stream")
    else:
        archive = subprocess.run(["git", "-C", str(root), "archive", ref, "knhk_stream", "bench"], capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        commit, dirty = git("rev-parse", "--short", ref), ""

    env = {**os.environ, "KNHK_CHAOS_CODE": str(code), "KNHK_CHAOS_ROOT": str(root),
           "KNHK_CHAOS_COMMIT": commit or "unknown", "KNHK_CHAOS_DIRTY": "1" if dirty else "",
           "KNHK_CHAOS_SOURCE": f"git archive of {ref}" if ref else "a copy of the checkout taken at the start",
           "PYTHONPATH": os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bench.chaos", *args], cwd=code, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
finally:
    shutil.rmtree(code, ignore_errors=True)
sys.exit(rc)

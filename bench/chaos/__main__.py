"""`python -m bench.chaos`: the campaign runs on a copy of the code, frozen when it starts.

Workers are restarted all through a campaign, and each restart imports knhk_stream afresh: in a
checkout that someone edits meanwhile, peers would run different code (and rightly dissent). So the
campaign copies knhk_stream/ and bench/ into a directory of its own and runs everything from there
(this process, the workers and the reader members); the report goes to the checkout's bench/results.
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
code = Path(tempfile.mkdtemp(prefix="knhk-chaos-code-"))
try:
    for pkg in ("knhk_stream", "bench"):
        shutil.copytree(root / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__", "results", "*.pyc"))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    env = {**os.environ, "KNHK_CHAOS_CODE": str(code), "KNHK_CHAOS_ROOT": str(root),
           "KNHK_CHAOS_COMMIT": git("rev-parse", "--short", "HEAD") or "unknown",
           "KNHK_CHAOS_DIRTY": "1" if git("status", "--porcelain", "--", "knhk_stream") else "",
           "PYTHONPATH": os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bench.chaos", *sys.argv[1:]], cwd=code, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
finally:
    shutil.rmtree(code, ignore_errors=True)
sys.exit(rc)

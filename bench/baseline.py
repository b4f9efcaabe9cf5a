"""The core before the optimizations, for the "before" baselines: the knhk_stream package at
--baseline-ref, in-process (core case) or as a worker's core (one-peer case)."""

from __future__ import annotations

import importlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

from bench import ROOT
from bench.harness import log

# The last commit before the issue-6 hot-path work: the "before" of the core and one-peer cases.
DEFAULT_BASELINE_REF = "2084579"
CORE_MODULES = ("decode", "hooks", "receipts", "beats", "merkle", "encoding")
CURRENT = "knhk_stream.protocol"  # where this tree has them (and quorum)


def extract_ref(ref: str, dest: Path) -> Path | None:
    """The knhk_stream package at git `ref` under dest/knhk_base (for in-process "before" numbers)."""
    try:
        data = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "knhk_stream"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"  baseline ref {ref!r} unavailable ({e}); 'before' columns skipped")
        return None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest / "ref", filter="data")
    base = dest / "knhk_base"
    if base.exists():
        shutil.rmtree(base)
    shutil.move(str(dest / "ref" / "knhk_stream"), base)
    return base


def hybrid_tree(ref_pkg: Path, dest: Path) -> Path:
    """This tree's knhk_stream with the core modules of the baseline ref (a worker with the old core).

    The baseline ref has them at the top of the package (knhk_stream/decode.py, ...), this tree in
    knhk_stream/protocol/, where the worker imports them from; their imports are relative."""
    pkg = dest / "hybrid" / "knhk_stream"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(ROOT / "knhk_stream", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for m in CORE_MODULES:
        shutil.copy(ref_pkg / f"{m}.py", pkg / "protocol" / f"{m}.py")
    return pkg.parent


class Pkg:
    """The core modules of a package: `Pkg(CURRENT)` for this tree's, `Pkg("knhk_base")` for the
    baseline ref's (extract_ref, on sys.path), which has them at the top of the package."""

    def __init__(self, name: str) -> None:
        self.name = name
        for m in (*CORE_MODULES, "quorum"):
            setattr(self, m, importlib.import_module(f"{name}.{m}"))

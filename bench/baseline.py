"""The core "before": the knhk_stream package at --baseline-ref, in-process (core case) or as a
worker's core (one-peer case).

A ref may have either layout: the flat one (knhk_stream/decode.py, ..., relative imports; up to the
package split) or the current one (knhk_stream/protocol/decode.py, ..., absolute imports of
`knhk_stream.…`). For the in-process copy the package is renamed `knhk_base` and every absolute
import of `knhk_stream` in it is rewritten to `knhk_base`, so that the "before" modules import each
other and never this tree's."""

from __future__ import annotations

import importlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

from bench import ROOT
from bench.harness import log

# The core before the issue-14 work (the last commit before it): the "before" of the core and
# one-peer cases. The issue-6 "before" was 2084579 (flat layout); it still works as --baseline-ref.
DEFAULT_BASELINE_REF = "c852194"
CORE_MODULES = ("decode", "hooks", "receipts", "beats", "merkle", "encoding")
CURRENT = "knhk_stream.protocol"  # where this tree has them (and quorum)
BASE = "knhk_base"  # the baseline ref's package, renamed
_NAME = re.compile(rb"\bknhk_stream\b")


def extract_ref(ref: str, dest: Path) -> Path | None:
    """The knhk_stream package at git `ref`, as it is, under dest/ref/knhk_stream; and renamed to
    dest/knhk_base with its imports (and its own package name, `resources.files("knhk_stream")`)
    rewritten (put dest on sys.path and use Pkg(BASE))."""
    try:  # the whole tree: old layouts link knhk_stream/schemas and topics to ../schemas, ../topics
        data = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", ref],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"  baseline ref {ref!r} unavailable ({e}); 'before' columns skipped")
        return None
    raw = dest / "ref"
    if raw.exists():
        shutil.rmtree(raw)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(raw, filter="data")
    base = dest / BASE
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(raw / "knhk_stream", base)  # the links followed: the package data is in the copy
    for py in base.rglob("*.py"):
        text = py.read_bytes()
        new = _NAME.sub(BASE.encode(), text)
        if new != text:
            py.write_bytes(new)
    return raw / "knhk_stream"


def core_dir(pkg: Path) -> Path:
    """Where a package tree keeps its core modules: protocol/ (current layout) or the top (flat)."""
    return pkg / "protocol" if (pkg / "protocol" / "decode.py").exists() else pkg


def hybrid_tree(ref_pkg: Path, dest: Path) -> Path:
    """This tree's knhk_stream with the core modules of the baseline ref (a worker with the old core).

    `ref_pkg` is the ref's knhk_stream as extracted (extract_ref's return value, not renamed). This
    tree's worker imports the core from knhk_stream/protocol/; the ref has them there too (absolute
    imports of knhk_stream.protocol.…, which resolve inside the hybrid tree) or, in the flat layout,
    at the top of the package (relative imports)."""
    pkg = dest / "hybrid" / "knhk_stream"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(ROOT / "knhk_stream", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    src = core_dir(ref_pkg)
    for m in CORE_MODULES:
        shutil.copy(src / f"{m}.py", pkg / "protocol" / f"{m}.py")
    beats = pkg / "protocol" / "beats.py"
    if "def hash_ahead" not in beats.read_text():
        with beats.open("a") as f:  # this tree's engine asks for it; a ref before it hashes at the close
            f.write(_HASH_AHEAD_SHIM)
    return pkg.parent


_HASH_AHEAD_SHIM = """

# Added by bench/baseline.py for the hybrid tree: the baseline ref hashes a beat's tree at its close.
BeatAssembler.hash_ahead = lambda self: None
"""


class Pkg:
    """The core modules of a package: `Pkg(CURRENT)` for this tree's, `Pkg(BASE)` for the baseline
    ref's (extract_ref's dest on sys.path), wherever its layout has them."""

    def __init__(self, name: str) -> None:
        self.name = name
        for m in (*CORE_MODULES, "quorum"):
            setattr(self, m, _import_core(name, m))
        if name != CURRENT:
            _check_separate(self)


def _import_core(name: str, module: str) -> ModuleType:
    for full in (f"{name}.{module}", f"{name}.protocol.{module}"):
        try:
            return importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name is None or not full.startswith(e.name):
                raise  # the module exists but imports something missing: say so
    raise ModuleNotFoundError(f"no {module} module in {name} (neither {name}.{module} nor {name}.protocol.{module})")


def _check_separate(pkg: Pkg) -> None:
    """The "before" modules must not come from this tree (an import left unrewritten would do that)."""
    here = (ROOT / "knhk_stream").resolve()
    for n, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if n.split(".")[0] == pkg.name and f and Path(f).resolve().is_relative_to(here):
            raise RuntimeError(f"baseline module {n} was loaded from this tree ({f})")
    for m in CORE_MODULES:
        name = getattr(pkg, m).__name__
        if name.split(".")[0] != pkg.name:
            raise RuntimeError(f"baseline module {m} is {name}, not from {pkg.name}")

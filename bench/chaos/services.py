"""What a campaign runs and hurts: a private redis-server with AOF, the workers of the four peers and
the RootsReader group members, each a subprocess that can be killed, stopped, continued and restarted.

Every process keeps its log in the work directory ({name}.log, appended over restarts). Whoever stops
a process on purpose says so first (`expect_exit`), so the monitor can tell a planned exit from a crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import ROOT
from knhk_stream.runtime.demo import start_worker

SESSION_TIMEOUT_MS = 6000  # Tansu group joins take about half of it (docs/tansu.md)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_ms() -> int:
    return int(time.time() * 1000)


class RedisServer:
    """A redis-server of the campaign's own on a free port: AOF with appendfsync always, no RDB."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the chaos campaign needs a redis-server binary (Debian: apt-get install redis-server)")
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self.cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        self.cmd += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(self.log_path)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20) -> RedisServer:
        import redis

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.RedisError:  # includes "LOADING" while the AOF is read back
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {timeout}s; see {self.log_path}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Proc:
    """One named process (a worker or a reader member) over its incarnations."""

    name: str
    role: str  # "worker" | "reader"
    peer: str = ""
    popen: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    expected_exit: bool = False  # set before we stop or kill it
    stopped: bool = False  # SIGSTOPped
    settings: Path | None = None  # the settings file of the current incarnation
    peak_rss_mb: float = 0.0
    pids: list[int] = field(default_factory=list)
    cpu_s: dict[int, float] = field(default_factory=dict)  # pid -> CPU seconds at its last sample
    log_mark: int = 0  # size of its log when it was last started or continued
    exits: list[dict[str, object]] = field(default_factory=list)  # every exit: rc, expected, at_ms

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the process's peak resident set so far (what a sampler between two samples misses)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class Fleet:
    """The workers and reader members of a campaign."""

    def __init__(
        self,
        workdir: Path,
        bootstrap: str,
        redis_url: str,
        prefix: str,
        topic_prefix: str,
        roots_topic: str,
        settings_path: Path,
    ) -> None:
        self.workdir, self.bootstrap, self.redis_url = workdir, bootstrap, redis_url
        self.prefix, self.topic_prefix, self.roots_topic = prefix, topic_prefix, roots_topic
        self.settings_path = settings_path
        self.procs: dict[str, Proc] = {}
        self.lock = threading.RLock()
        self.reader_group = f"{topic_prefix}.roots-readers"
        self._readers_made = 0
        # The workers import the faulty hook (bench.chaos.hooks) from the checkout; put back in close().
        self._pythonpath = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self._pythonpath) if p)

    # -- starting ---------------------------------------------------------------------------

    def add_worker(self, name: str, peer: str) -> Proc:
        p = self.procs[name] = Proc(name, "worker", peer, settings=self.settings_path)
        return p

    def start(self, name: str, settings: Path | None = None) -> Proc:
        with self.lock:
            p = self.procs[name]
            if p.alive:
                raise RuntimeError(f"{name} is running")
            p.log_mark = self._log_size(name)
            if p.role == "worker":
                p.settings = settings or p.settings or self.settings_path
                extra = ("--allow-producer-timestamps", "--group-id", f"knhk.{self.topic_prefix}.{p.peer}")
                p.popen = start_worker(
                    self.workdir,
                    p.peer,
                    self.bootstrap,
                    self.redis_url,
                    self.prefix,
                    self.topic_prefix,
                    extra,
                    settings_path=p.settings,
                    log_name=name,
                )
            else:
                log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.chaos.reader",
                    "--settings",
                    str(self.settings_path),
                    "--bootstrap",
                    self.bootstrap,
                    "--topic",
                    self.roots_topic,
                    "--group",
                    self.reader_group,
                    "--name",
                    name,
                    "--out",
                    str(self.reader_out(name)),
                    "--session-timeout-ms",
                    str(SESSION_TIMEOUT_MS),
                ]
                p.popen = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
                )
            p.incarnation += 1
            p.expected_exit = False
            p.stopped = False
            p.pids.append(p.popen.pid)
            return p

    def new_reader(self) -> Proc:
        with self.lock:
            self._readers_made += 1
            name = f"reader-{self._readers_made}"
            self.procs[name] = Proc(name, "reader")
            return self.start(name)

    def reader_out(self, name: str) -> Path:
        return self.workdir / f"{name}.jsonl"

    # -- hurting ----------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        with self.lock:
            p = self.procs[name]
            p.expected_exit = True
            if p.alive:
                assert p.popen is not None
                p.popen.send_signal(signal.SIGKILL)
                p.popen.wait(10)
            p.stopped = False

    def terminate(self, name: str, timeout: float = 30) -> tuple[int | None, float]:
        """SIGTERM and wait; returns (exit code or None if it had to be killed, seconds taken)."""
        with self.lock:
            p = self.procs[name]
            p.expected_exit = True
            assert p.popen is not None
            if p.stopped:
                p.popen.send_signal(signal.SIGCONT)
                p.stopped = False
            t0 = time.monotonic()
            p.popen.send_signal(signal.SIGTERM)
        try:
            rc: int | None = p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
            rc = None
        return rc, time.monotonic() - t0

    def sigstop(self, name: str) -> None:
        with self.lock:
            p = self.procs[name]
            assert p.popen is not None
            p.popen.send_signal(signal.SIGSTOP)
            p.stopped = True

    def sigcont(self, name: str) -> None:
        with self.lock:
            p = self.procs[name]
            if p.popen is not None and p.stopped:
                p.log_mark = self._log_size(name)
                p.popen.send_signal(signal.SIGCONT)
            p.stopped = False

    def _log_size(self, name: str) -> int:
        try:
            return (self.workdir / f"{name}.log").stat().st_size
        except OSError:
            return 0

    def joined(self, name: str) -> bool:
        """Whether the process took shards since it was last started or continued (its group join is done)."""
        p = self.procs[name]
        try:
            with open(self.workdir / f"{name}.log", "rb") as f:
                f.seek(p.log_mark)
                text = f.read()
        except OSError:
            return False
        return (b"resume at offset" if p.role == "worker" else b"from offset") in text

    def wait_joined(self, name: str, timeout: float = 30) -> bool:
        """Until `joined(name)`, the process exits, or `timeout`; whether it joined.

        Tansu limit: a member that leaves its group (SIGTERM) while a rebalance is under way can leave
        the group never assigning partitions again, so the campaign SIGTERMs only members that joined.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.procs[name]
            if not p.alive or self.joined(name):
                return p.alive
            time.sleep(0.2)
        return False

    # -- watching ---------------------------------------------------------------------------

    def exited(self) -> list[tuple[Proc, int]]:
        """Processes that exited since the last call: (proc, return code); each exit reported once."""
        out = []
        with self.lock:
            for p in self.procs.values():
                if p.popen is None:
                    continue
                rc = p.popen.poll()
                if rc is not None and not any(e.get("pid") == p.popen.pid for e in p.exits):
                    p.exits.append({"pid": p.popen.pid, "rc": rc, "expected": p.expected_exit, "at_ms": now_ms()})
                    out.append((p, rc))
        return out

    def sample_rss(self) -> None:
        with self.lock:
            for p in self.procs.values():
                if p.alive and p.popen is not None:
                    rss = peak_rss_mb(p.popen.pid)
                    if rss is not None and rss > p.peak_rss_mb:
                        p.peak_rss_mb = rss
                    cpu = cpu_seconds(p.popen.pid)
                    if cpu is not None:
                        p.cpu_s[p.popen.pid] = cpu

    def log_tail(self, name: str, n: int = 3000) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def workers(self, peer: str | None = None) -> list[Proc]:
        return [p for p in self.procs.values() if p.role == "worker" and (peer is None or p.peer == peer)]

    def readers(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.role == "reader"]

    def close(self) -> None:
        with self.lock:
            for p in self.procs.values():
                if p.alive and p.popen is not None:
                    p.expected_exit = True
                    if p.stopped:
                        p.popen.send_signal(signal.SIGCONT)
                    p.popen.kill()
                    p.popen.wait()
        if self._pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self._pythonpath

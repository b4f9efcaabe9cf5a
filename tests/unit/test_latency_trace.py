"""The latency trace the bench splits commit latency with: one line per event, garbage collections too."""

from __future__ import annotations

import gc
import os
import time

from knhk_stream.runtime.latency_trace import TRACE_ENV, LatencyTrace, Moment


def test_the_trace_writes_a_line_per_event_and_each_garbage_collection(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    trace = LatencyTrace.from_env()
    assert trace is not None
    trace.vote(2, 1000, Moment(5.0, 1.0, 0.5), Moment(6.5, 1.25, 1.5))
    trace.vote_acked(2, 17, 30.25)
    trace.votes_read([(2, 17), (3, 4)], Moment(40.0, 2.0, 1.5))
    trace.appended(2, 1000, Moment(45.5, 3.0, 1.75))
    gc.collect()
    trace.close()
    path = tmp_path / f"trace.{os.getpid()}"
    written = path.read_text()
    gc.collect()
    assert path.read_text() == written  # closed: nothing more is written
    lines = [ln.split() for ln in written.splitlines()]
    events = [f for f in lines if f[0] != "G"]
    assert events == [["V", "2", "1000", "5.000", "6.500", "1.000", "0.500", "1.250", "1.500"],
                      ["K", "2", "17", "30.250"], ["R", "2", "17", "40.000", "2.000", "1.500"],
                      ["R", "3", "4", "40.000", "2.000", "1.500"],
                      ["A", "2", "1000", "45.500", "3.000", "1.750"]]  # fmt: skip
    collections = [f[1:] for f in lines if f[0] == "G"]  # gc.collect(), and any the interpreter ran itself
    assert collections and collections[-1][0] == "2"
    assert all(float(started) > 0 and float(ms) >= 0 for _, started, ms in collections)


def test_the_counters_are_the_loop_threads_time_on_a_cpu(tmp_path, monkeypatch):
    """Between two moments, on_cpu grows by about the CPU time the thread used (schedstat on Linux)."""
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    trace = LatencyTrace.from_env()
    assert trace is not None
    if not os.path.exists("/proc/thread-self/schedstat"):
        assert trace.now()[1:] == (0.0, 0.0)
        return
    a, cpu = trace.now(), time.thread_time()
    deadline = time.perf_counter() + 0.05
    while time.perf_counter() < deadline:
        pass  # 50 ms on a CPU (or waiting for one)
    b, used = trace.now(), (time.thread_time() - cpu) * 1000
    trace.close()
    assert b.wall - a.wall >= 50
    assert abs((b.on_cpu - a.on_cpu) - used) < 5, (b, a, used)
    assert b.waiting >= a.waiting and (b.on_cpu - a.on_cpu) + (b.waiting - a.waiting) <= b.wall - a.wall + 5


def test_no_trace_unless_the_variable_names_a_file(monkeypatch):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    assert LatencyTrace.from_env() is None

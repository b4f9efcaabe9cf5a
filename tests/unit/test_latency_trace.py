"""The latency trace the bench splits commit latency with: one line per event, garbage collections too."""

from __future__ import annotations

import gc
import os

from knhk_stream.runtime.latency_trace import TRACE_ENV, LatencyTrace


def test_the_trace_writes_a_line_per_event_and_each_garbage_collection(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    trace = LatencyTrace.from_env()
    assert trace is not None
    trace.vote(2, 1000, 5.0, 6.5)
    trace.vote_acked(2, 17, 30.25)
    trace.votes_read([(2, 17), (3, 4)], 40.0)
    trace.appended(2, 1000, 45.5)
    gc.collect()
    trace.close()
    path = tmp_path / f"trace.{os.getpid()}"
    written = path.read_text()
    gc.collect()
    assert path.read_text() == written  # closed: nothing more is written
    lines = [ln.split() for ln in written.splitlines()]
    events = [f for f in lines if f[0] != "G"]
    assert events == [["V", "2", "1000", "5.000", "6.500"], ["K", "2", "17", "30.250"], ["R", "2", "17", "40.000"],
                      ["R", "3", "4", "40.000"], ["A", "2", "1000", "45.500"]]  # fmt: skip
    collections = [f[1:] for f in lines if f[0] == "G"]  # gc.collect(), and any the interpreter ran itself
    assert collections and collections[-1][0] == "2"
    assert all(float(started) > 0 and float(ms) >= 0 for _, started, ms in collections)


def test_no_trace_unless_the_variable_names_a_file(monkeypatch):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    assert LatencyTrace.from_env() is None

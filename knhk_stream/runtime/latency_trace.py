"""Where a commit's latency goes, per worker: a line per event, for the bench to split broker time from ours.

Off unless `KNHK_STREAM_LATENCY_TRACE` names a file (each worker appends to `<file>.<pid>`). Lines,
all times wall-clock ms (one machine, one clock):

- `V shard cycle arrived produced`: a vote of this peer; `arrived` is when the consume call that
  brought the beat's closing record returned, `produced` when the vote was handed to the producer;
- `K shard offset latency`: the broker acknowledged a vote at that votes-topic offset, `latency`
  ms after it was produced (librdkafka's own measure: linger, send and ack);
- `R shard offset arrived`: a votes-topic record reached this worker (its consume call returned);
- `A shard cycle returned`: this worker's append of that cycle returned (written, not found there);
- `G generation started duration`: a garbage collection of the interpreter (it stops this worker).

The bench joins them with the votes topic (offset -> peer, cycle) and the committed entries.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable
from typing import IO

TRACE_ENV = "KNHK_STREAM_LATENCY_TRACE"


def wall_ms() -> float:
    return time.time() * 1000


class LatencyTrace:
    """Buffered event lines of one worker process (the buffer is written at close or when full)."""

    def __init__(self, path: str) -> None:
        self._f: IO[str] = open(f"{path}.{os.getpid()}", "a", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = wall_ms()
        elif not self._f.closed:
            self._f.write(f"G {info['generation']} {self._gc_started:.3f} {wall_ms() - self._gc_started:.3f}\n")

    @classmethod
    def from_env(cls) -> LatencyTrace | None:
        path = os.environ.get(TRACE_ENV)
        return cls(path) if path else None

    def vote(self, shard: int, cycle: int, arrived: float, produced: float) -> None:
        self._f.write(f"V {shard} {cycle} {arrived:.3f} {produced:.3f}\n")

    def vote_acked(self, shard: int, offset: int, latency_ms: float) -> None:
        self._f.write(f"K {shard} {offset} {latency_ms:.3f}\n")

    def votes_read(self, at: Iterable[tuple[int, int]], arrived: float) -> None:
        self._f.write("".join(f"R {shard} {offset} {arrived:.3f}\n" for shard, offset in at))

    def appended(self, shard: int, cycle: int, returned: float) -> None:
        self._f.write(f"A {shard} {cycle} {returned:.3f}\n")

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._f.close()

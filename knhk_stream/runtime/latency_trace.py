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

After each moment of a V, R or A line come the loop thread's two scheduler counters at that moment
(`Moment`: ms on a CPU, ms runnable but waiting for one, from /proc/thread-self/schedstat; 0 where
Linux does not keep them): between two moments, wall time = on a CPU + waiting for a CPU + blocked
(a round trip, a sleep). What waits for a CPU is the machine's, not the code's.

The bench joins them with the votes topic (offset -> peer, cycle) and the committed entries.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable
from typing import IO, NamedTuple

TRACE_ENV = "KNHK_STREAM_LATENCY_TRACE"


def wall_ms() -> float:
    return time.time() * 1000


class Moment(NamedTuple):
    """A point in the loop thread's time: wall clock, and its scheduler counters (cumulative ms)."""

    wall: float
    on_cpu: float
    waiting: float

    def counters(self) -> str:
        return f"{self.on_cpu:.3f} {self.waiting:.3f}"


class LatencyTrace:
    """Buffered event lines of one worker process (the buffer is written at close or when full).

    Made on the loop's thread: the scheduler counters are that thread's."""

    def __init__(self, path: str) -> None:
        self._f: IO[str] = open(f"{path}.{os.getpid()}", "a", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)
        try:
            self._schedstat: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:  # not Linux, or no scheduler statistics: the counters read 0
            self._schedstat = None

    def now(self) -> Moment:
        wall = wall_ms()
        if self._schedstat is None:
            return Moment(wall, 0.0, 0.0)
        on_cpu, waiting = os.pread(self._schedstat, 128, 0).split()[:2]
        return Moment(wall, int(on_cpu) / 1e6, int(waiting) / 1e6)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = wall_ms()
        elif not self._f.closed:
            self._f.write(f"G {info['generation']} {self._gc_started:.3f} {wall_ms() - self._gc_started:.3f}\n")

    @classmethod
    def from_env(cls) -> LatencyTrace | None:
        path = os.environ.get(TRACE_ENV)
        return cls(path) if path else None

    def vote(self, shard: int, cycle: int, arrived: Moment, produced: Moment) -> None:
        self._f.write(f"V {shard} {cycle} {arrived.wall:.3f} {produced.wall:.3f} {arrived.counters()} "
                      f"{produced.counters()}\n")  # fmt: skip

    def vote_acked(self, shard: int, offset: int, latency_ms: float) -> None:
        self._f.write(f"K {shard} {offset} {latency_ms:.3f}\n")

    def votes_read(self, at: Iterable[tuple[int, int]], arrived: Moment) -> None:
        tail = f"{arrived.wall:.3f} {arrived.counters()}\n"
        self._f.write("".join(f"R {shard} {offset} {tail}" for shard, offset in at))

    def appended(self, shard: int, cycle: int, returned: Moment) -> None:
        self._f.write(f"A {shard} {cycle} {returned.wall:.3f} {returned.counters()}\n")

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None
        self._f.close()

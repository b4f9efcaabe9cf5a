"""`knhk-stream` with one change applied first: what an attacker (or a test's odd peer) runs.

    python -m tests.adversarial.launch [--withhold-roots] [--clock-skew-ms MS] [--recent-entries N] -- worker ...

- `--withhold-roots`: a byzantine peer that makes sure it is the one that appends (it counts its
  own vote at once and holds it back from the votes topic until its beat is committed, so with
  `threshold` peers running the others see a quorum only after it appended) and then never
  publishes the root (protocol "Where a shard starts, commits and resumes": the appender does).
- `--clock-skew-ms MS`: the peer's own clock runs MS ahead (its tick-marker decisions and
  reports); the broker's clock (the record timestamps) stays right.
- `--recent-entries N`: an honest peer that remembers only N committed entries per shard, so
  that re-appending deleted entries must come from the roots topic.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv: list[str]) -> None:
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="tests.adversarial.launch")
    parser.add_argument("--withhold-roots", action="store_true")
    parser.add_argument("--clock-skew-ms", type=int, default=0)
    parser.add_argument("--recent-entries", type=int, default=None)
    opts = parser.parse_args(argv[:split])

    from knhk_stream.runtime import node, worker

    if opts.withhold_roots:
        _withhold_roots(worker)
    if opts.clock_skew_ms:
        real = node.now_ms

        def skewed() -> int:
            return real() + opts.clock_skew_ms

        node.now_ms = skewed  # type: ignore[assignment]
        worker.now_ms = skewed  # type: ignore[assignment]
    if opts.recent_entries is not None:
        init = node.PeerNode.__init__

        def small_memory(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            init(self, *args, **kwargs)
            self.limits = dataclasses.replace(self.limits, recent_entries=opts.recent_entries)

        node.PeerNode.__init__ = small_memory  # type: ignore[method-assign]

    from knhk_stream.cli import main as cli

    cli(argv[split + 1 :], prog_name="knhk-stream")


def _withhold_roots(worker) -> None:  # type: ignore[no-untyped-def]
    import time

    from knhk_stream.runtime.node import vote_out

    step = worker.Worker.step

    def publish_vote(self, vote) -> None:  # type: ignore[no-untyped-def]
        self.node.consensus.add(vote)  # its own vote counts here at once ...
        self.__dict__.setdefault("held_back", []).append((time.monotonic(), vote))
        self._undelivered.append(vote)  # ... and it checkpoints as if it were delivered

    def step_and_release(self) -> None:  # type: ignore[no-untyped-def]
        step(self)
        keep = []
        for at, vote in self.__dict__.get("held_back", []):
            view = self.node.consensus.views.get(vote.entry.shard)
            committed = view is not None and view.head_cycle is not None and view.head_cycle >= vote.entry.cycle
            if committed or time.monotonic() - at > 5:
                self._produce(self.topics.votes.name, vote_out(vote))  # only once it appended the entry
            else:
                keep.append((at, vote))
        self.__dict__["held_back"] = keep

    worker.Worker._publish_vote = publish_vote
    worker.Worker.step = step_and_release
    worker.Worker._publish_root = lambda self, ce: None  # and the root is never published


if __name__ == "__main__":
    main(sys.argv[1:])

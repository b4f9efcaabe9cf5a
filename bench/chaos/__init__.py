"""The chaos campaign (`make chaos`, issue 15): faults injected for minutes while a checker proves nothing was lost.

On the embedded broker (Tansu) and a private `redis-server` with AOF (`appendfsync always`) that the
campaign starts on a free port of its own, four peers (threshold 3) run as `knhk-stream worker`
processes, two of them for peer-a; a steady producer writes deltas and a RootsReader group of two
members hands out the committed roots. Faults are drawn from the seed and overlap:

    worker_kill     SIGKILL of a random worker, restarted after 1-5 s
    worker_zombie   SIGSTOP of one of peer-a's workers for longer than its session timeout, then SIGCONT
                    (it wakes up after its shards moved to the other worker of the peer); at most one of
                    peer-a's workers is hurt at a time, so its group never empties (a Tansu limit, README.md)
    worker_term     SIGTERM of a random worker in the middle of a beat (it must exit 0), restarted after 1-5 s
    redis_kill      SIGKILL of redis-server, restarted on its AOF after 1-5 s
    broker_pause    SIGSTOP of the broker for 2-5 s, then SIGCONT (Tansu keeps data in memory only: never killed)
    bad_deltas      a burst of malformed and oversized deltas (every one must get a rejected receipt)
    vote_garbage    a burst of garbage, forged and foreign records on the votes topic
    faulty_hook     one peer (b, c or d: one worker each) restarted with a buggy hook under the chain's
                    hook name (a dissenting replica) for 10-25 s, then restarted with the right one
    reader_kill     SIGKILL of a RootsReader group member, replaced by a new one after 1-3 s

The checker (checker.py) reads Kafka and Redis itself, never the peers' state, and checks continuously
and at the end: no fork and no hole in any shard; every produced delta gets exactly one receipt in a
committed entry; every committed entry equals a replay of the shard through the core (and the public
audit replay agrees); no honest peer signs two different successors of one entry, nor an entry the
replay does not make; every committed root reaches the roots topic (and every root there is the
entry in Redis); the RootsReader group hands out every root exactly once, in order (a root handed
out by a SIGKILLed member before its offset commit may come once more: RootsReader's documented
at-least-once after a crash); no worker or reader exits except the ones stopped on purpose.

    .venv/bin/python -m bench.chaos --minutes 2 --seed 7
    make chaos MINUTES=3 SEED=7          # default 10 minutes

Writes bench/results/chaos-latest.{md,json,png} (--out); the last line printed is
`chaos: minutes=<m> faults=<n> violations=<v> deltas=<produced>/<committed>`. Exit status 1 when
there was a violation. tests/chaos/ runs a 60-second campaign with a fixed seed in `make test`.

Modules: cli (options), campaign (the run), services (Redis, broker, workers, reader members),
faults (kinds and the schedule), load (the producers and bad input), checker (the invariants),
reader (a RootsReader member process), hooks (the faulty replica's hook), report (table, JSON, PNG).
"""

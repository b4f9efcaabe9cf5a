"""The cases, one module each, in the order they run (bare consume first: the others refer to it).

Each module has `run(env, rep, args)` and `NEEDS`: "kafka" (the embedded broker and Redis), "redis",
or None (in-process only).
"""

from __future__ import annotations

from types import ModuleType

from bench.cases import audit, bare, core, four, kilohertz, memory, one, redis, redis_cluster, scale

CASES: dict[str, ModuleType] = {
    "bare": bare,
    "core": core,
    "one": one,
    "four": four,  # with bench.cases.latency: the latency breakdown and the tick search
    "scale": scale,
    "memory": memory,
    "redis": redis,
    "audit": audit,
    "redis-cluster": redis_cluster,
    "kilohertz": kilohertz,  # issue 14: tick_ms 1 sustained, and the own/broker latency split, before and after
}

"""The faulty replica's hook, loaded by entrypoint `bench.chaos.hooks:upper` under the chain's hook name."""

from __future__ import annotations

from knhk_stream.protocol.decode import Delta


def upper(delta: Delta) -> list[tuple[int, str, str, str, str]]:
    """Deterministic but wrong: additions with upper-cased objects, in input order, then the removals."""
    out = [(1, t.s, t.p, t.o.upper(), t.g or "") for t in delta.additions]
    out += [(2, t.s, t.p, t.o, t.g or "") for t in delta.removals]
    return out

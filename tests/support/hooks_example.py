"""User hooks for the tests, loaded by entrypoint `tests.support.hooks_example:<name>`."""

from __future__ import annotations

import itertools

from knhk_stream.protocol.decode import Delta

_calls = itertools.count()


def upper(delta: Delta) -> list[tuple[int, str, str, str, str]]:
    """Deterministic: additions with upper-cased objects, in input order, then removals as given."""
    out = [(1, t.s, t.p, t.o.upper(), t.g or "") for t in delta.additions]
    out += [(2, t.s, t.p, t.o, t.g or "") for t in delta.removals]
    return out


def boom(delta: Delta) -> list[tuple[int, str, str, str, str]]:
    """Always raises, with a message that differs on every call (it must not reach the receipt)."""
    raise RuntimeError(f"boom #{next(_calls)} on {len(delta.additions)} additions")


def not_a_list(delta: Delta) -> dict[str, int]:
    """Returns something that is not a list of actions."""
    return {"additions": len(delta.additions)}


def bad_action(delta: Delta) -> list[tuple[int, str, str, str, str]]:
    """Returns a list whose action has an invalid op."""
    return [(3, "s", "p", "o", "")]


NOT_CALLABLE = 42

"""Cycle ranges above 2^53: read by the padded members, never by the float scores (protocol "Redis")."""

from __future__ import annotations

from knhk_stream.store.lockchain import LockchainStore, verify_range
from tests.integration.test_store import make_chain

BIG = 2**60


def test_ranges_and_previous_above_2_pow_53(redis_url, redis_prefix, settings, peer_keys):
    store = LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)
    chain = make_chain(settings, peer_keys, 6, start_cycle=BIG)  # cycles BIG, BIG+2, ..., BIG+10
    for ce in chain:
        assert store.append(ce)
    cycles = [ce.entry.cycle for ce in chain]
    # a double cannot tell BIG from BIG+2: scores alone would widen or empty these ranges
    assert store.cycles(0, BIG + 2, BIG + 4) == [BIG + 2, BIG + 4]
    assert store.cycles(0, BIG + 3, BIG + 3) == []
    assert store.count(0, BIG + 1, BIG + 7) == 3
    assert [ce.entry.cycle for ce in store.range(0, BIG + 6)] == cycles[3:]
    assert store.previous(0, BIG + 4).entry.cycle == BIG + 2
    assert store.previous(0, BIG + 5).entry.cycle == BIG + 4
    assert store.previous(0, BIG) is None
    report = verify_range(store, settings, 0, BIG + 4, BIG + 8)
    assert report.ok and report.entries == 3, report.problems

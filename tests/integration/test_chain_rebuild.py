"""`chain rebuild` and recovery after Redis loses data: the roots topic restores the chain byte for byte."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from knhk_stream.cli.main import main
from knhk_stream.protocol.encoding import H
from tests.support.cluster import SHARDS, Cluster


@pytest.fixture(scope="module")
def committed(tmp_path_factory, broker, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("rebuild"), broker.bootstrap, redis_url)
    c.start_all()
    c.produce(1200, rate=300)  # about four seconds: several beats per shard (a beat is 1 s at tick_ms 125)
    c.wait_all_committed()
    assert all(len(c.store.range(s)) >= 3 for s in range(SHARDS)), "the rebuild tests need several entries"
    c.stop_all()
    yield c
    c.close()


def _stored(c: Cluster, prefix: str) -> dict[int, list[dict]]:
    from knhk_stream.store import LockchainStore

    store = LockchainStore.from_url(c.redis_url, c.settings.chain_id, prefix)
    return {s: [ce.to_json() for ce in store.range(s)] for s in range(SHARDS)}


def _rebuild(c: Cluster, prefix: str, *extra: str):
    return CliRunner().invoke(main, [
        "chain", "rebuild", "--settings", str(c.workdir / "chain.toml"), "--redis", c.redis_url, "--prefix", prefix,
        "--bootstrap", c.bootstrap, "--topic-prefix", c.topic_prefix, "--quiet", *extra,
    ])  # fmt: skip


def _wipe(c: Cluster, prefix: str) -> None:
    keys = list(c.store.client.scan_iter(match=f"{prefix}:*"))
    if keys:
        c.store.client.delete(*keys)


def test_rebuild_into_an_empty_redis_reproduces_the_chain_byte_for_byte(committed):
    prefix = committed.prefix + "-rebuilt"
    try:
        dry = _rebuild(committed, prefix, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert "would restore" in dry.stdout and _stored(committed, prefix) == {s: [] for s in range(SHARDS)}
        result = _rebuild(committed, prefix)
        assert result.exit_code == 0, result.output
        assert _stored(committed, prefix) == _stored(committed, committed.prefix)
        again = _rebuild(committed, prefix)
        assert again.exit_code == 0 and again.stdout.count("restored 0 entries") == SHARDS, again.output
    finally:
        _wipe(committed, prefix)


def test_rebuild_refuses_to_overwrite_a_different_chain(committed):
    import dataclasses

    from knhk_stream.protocol.committed import CommittedEntry
    from knhk_stream.store import LockchainStore

    prefix = committed.prefix + "-other"
    store = LockchainStore.from_url(committed.redis_url, committed.settings.chain_id, prefix)
    first = committed.store.range(0)[0]
    other = dataclasses.replace(first.entry, root=H(b"another history"))
    store.append(CommittedEntry(other, other.entry_hash, first.votes, first.committed_by, 1, first.epoch))
    try:
        result = _rebuild(committed, prefix, "--shard", "0")
        assert result.exit_code == 1
        assert "shard 0: REFUSED" in result.stdout and "conflicting chain" in result.stdout
        assert [ce.entry_hash for ce in store.range(0)] == [other.entry_hash]  # nothing written over it
    finally:
        _wipe(committed, prefix)


def test_rebuild_after_the_newest_entries_were_lost(committed):
    """Like a restored old backup: Redis holds a prefix of the chain; rebuild appends the rest."""
    from knhk_stream.protocol.committed import CommittedEntry  # noqa: F401
    from knhk_stream.store import LockchainStore

    prefix = committed.prefix + "-old"
    store = LockchainStore.from_url(committed.redis_url, committed.settings.chain_id, prefix)
    for s in range(SHARDS):
        for ce in committed.store.range(s)[:2]:
            store.append(ce)
    try:
        result = _rebuild(committed, prefix)
        assert result.exit_code == 0, result.output
        assert _stored(committed, prefix) == _stored(committed, committed.prefix)
        assert "2 already in Redis" in result.stdout
    finally:
        _wipe(committed, prefix)

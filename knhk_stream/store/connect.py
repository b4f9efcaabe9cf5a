"""One `--redis` URL for a single server or any node of a Redis Cluster.

Cluster mode is detected (`INFO cluster`), not configured, so every command
and API that takes a URL works on both. knhk-stream's own options ride in the
URL's query string and are removed before redis-py sees it:

- `wait_replicas=N`: an append returns only once N replicas acknowledged it
  (Redis `WAIT`); a peer publishes a committed root only after that.
- `wait_timeout_ms=T` (default 1000): how long to wait for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster

from knhk_stream.errors import KnhkError

OPTIONS = ("wait_replicas", "wait_timeout_ms")


class RedisUrlError(KnhkError, ValueError):
    """A --redis URL whose knhk-stream options are wrong."""


class ReplicasLagging(KnhkError, redis.TimeoutError):
    """An append that fewer replicas than asked acknowledged in time: retried (it is idempotent),
    and its root is not published until it is durable."""


@dataclass(frozen=True)
class Durability:
    """How many replicas must hold an append before it counts as durable."""

    replicas: int = 0
    timeout_ms: int = 1000


def split_url(url: str) -> tuple[str, Durability]:
    """The URL without knhk-stream's options, and those options."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        (ours.__setitem__(k, v) if k in OPTIONS else rest.append((k, v)))
    values = {}
    for k, v in ours.items():
        if not v.isascii() or not v.isdigit():
            raise RedisUrlError(f"--redis: {k}={v!r} must be a non-negative integer (e.g. ?{k}=1)")
        values[k] = int(v)
    durability = Durability(values.get("wait_replicas", 0), values.get("wait_timeout_ms", 1000))
    return urlunsplit(parts._replace(query=urlencode(rest))), durability


def is_cluster(client: redis.Redis) -> bool:
    """Ask the server; a server that cannot be reached yet is taken as a single server, so that a
    client can be made while Redis is down (the caller's first command says it is unreachable)."""
    try:
        return int(client.info("cluster").get("cluster_enabled", 0)) == 1
    except redis.ResponseError:
        return False  # a server or proxy without INFO cluster
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def connect(url: str, **kwargs: Any) -> tuple[redis.Redis | RedisCluster, Durability]:
    """A client for `url` (a RedisCluster when the server is a cluster node) and the durability asked for."""
    plain, durability = split_url(url)
    client = redis.Redis.from_url(plain, **kwargs)
    if not is_cluster(client):
        return client, durability
    client.close()
    parts = urlsplit(plain)
    if parts.path not in ("", "/", "/0"):
        raise RedisUrlError(f"--redis {plain}: a Redis Cluster has only database 0; drop {parts.path!r}")
    return RedisCluster.from_url(urlunsplit(parts._replace(path="")), **kwargs), durability


def wait_for_replicas(client: redis.Redis | RedisCluster, key: str, durability: Durability) -> int:
    """WAIT on the node that holds `key`; returns how many replicas acknowledged."""
    if durability.replicas <= 0:
        return 0
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(key)
        got = client.execute_command("WAIT", durability.replicas, durability.timeout_ms, target_nodes=node)
    else:
        got = client.execute_command("WAIT", durability.replicas, durability.timeout_ms)
    return int(got)

"""A `PeerNode` taking a shard while Redis is down can be stopped (embedders have no signal to raise)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from knhk_stream.runtime.node import Interrupt, PeerNode
from knhk_stream.store.lockchain import LockchainStore


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_taking_a_shard_while_redis_is_down_ends_when_asked_to_stop(settings, peer_keys):
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    store = LockchainStore.from_url(url, settings.chain_id, "knhk", socket_timeout=1, socket_connect_timeout=1)
    node = PeerNode(settings, "peer-a", peer_keys["peer-a"], store)
    stop = threading.Event()
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            node.assign(0, stop=stop.is_set)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    time.sleep(2.5)  # several retries against the closed port
    assert t.is_alive() and not outcome, "assign returned while Redis was down"
    asked = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive(), "assign kept waiting for Redis after stop said so"
    assert time.monotonic() - asked < 3
    assert len(outcome) == 1 and isinstance(outcome[0], Interrupt), outcome
    assert "waiting for Redis to take shard 0" in str(outcome[0])
    assert node.shards == []  # nothing half taken


@pytest.mark.parametrize("stop", [None, lambda: False])
def test_a_stop_that_never_says_so_changes_nothing(settings, peer_keys, redis_url, redis_prefix, stop):
    store = LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)
    node = PeerNode(settings, "peer-a", peer_keys["peer-a"], store)
    at = node.assign(0, stop=stop)
    assert at.next_offset == settings.start_offset(0) and node.shards == [0]

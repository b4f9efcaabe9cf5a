"""Attack tests: each runs one attack against real peers (worker processes on the embedded broker and Redis)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster


@pytest.fixture()
def cluster(tmp_path, broker, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    yield c
    c.close()

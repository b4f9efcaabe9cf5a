"""Behaviour that needs real Kafka semantics: run under testcontainers or KNHK_TEST_BOOTSTRAP.

On the embedded Tansu broker these skip, saying why: Tansu delivers aborted
transactions to read_committed consumers and does not compact topics.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from knhk_stream.protocol.decode import Delta, Triple, encode_json
from tests.support.cluster import SHARDS, Cluster
from tests.support.services import TANSU_LACKS

pytestmark = pytest.mark.integration


@pytest.fixture()
def real_kafka(broker):
    if not broker.real_kafka:
        pytest.skip(f"{TANSU_LACKS} (read_committed filtering of aborted transactions, compaction); "
                    "runs under testcontainers where a Docker engine answers, or with KNHK_TEST_BOOTSTRAP")  # fmt: skip
    return broker


@pytest.fixture()
def cluster(tmp_path, real_kafka, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, real_kafka.bootstrap, redis_url)
    yield c
    c.close()


def test_aborted_deltas_get_no_receipt(cluster):
    cluster.start_all()
    p = Producer({"bootstrap.servers": cluster.bootstrap, "transactional.id": f"tx-{uuid.uuid4().hex[:6]}"})
    p.init_transactions()
    delta = encode_json(Delta((Triple("urn:a", "urn:p", "aborted"),), ()))
    p.begin_transaction()
    for i in range(40):
        p.produce(cluster.topics.deltas.name, value=delta, partition=i % SHARDS)
    p.abort_transaction()
    cluster.produce(400, malformed_every=0)
    cluster.wait_all_committed()
    time.sleep(2)
    cluster.stop_all()
    assert cluster.committed_receipts() == 400  # the 40 aborted deltas never became receipts

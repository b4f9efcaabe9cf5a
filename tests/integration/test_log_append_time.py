"""A worker refuses a deltas topic that is not LogAppendTime (protocol v2, "Beats").

`test_worker_refuses_a_topic_without_the_setting` runs on any broker: a topic created
without `message.timestamp.type` is CreateTime on Kafka, and unreported on Tansu.
The others need real Kafka semantics (a broker that honours and reports the setting,
and stamps records with its own clock), so they run under testcontainers where a
Docker engine answers, or with KNHK_TEST_BOOTSTRAP, and skip on the embedded Tansu.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from knhk_stream.kafka.admin import Admin, apply_topics, create_topics, topic_configs
from knhk_stream.protocol.decode import Delta, Triple, encode_json
from knhk_stream.runtime.demo import start_worker, write_chain
from tests.support.cluster import SHARDS, Cluster
from tests.support.services import TANSU_LACKS

pytestmark = pytest.mark.integration


@pytest.fixture()
def real_kafka(broker):
    if not broker.real_kafka:
        pytest.skip(f"{TANSU_LACKS} (Tansu accepts message.timestamp.type=LogAppendTime and ignores it: its "
                    "records keep the producer's timestamp); runs under testcontainers where a Docker engine "
                    "answers, or with KNHK_TEST_BOOTSTRAP")  # fmt: skip
    return broker


@pytest.fixture()
def cluster(tmp_path, real_kafka, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, real_kafka.bootstrap, redis_url)
    yield c
    c.close()


def _refusal(p: subprocess.Popen[bytes], log: str, timeout: float = 60) -> str:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"the worker did not refuse within {timeout} s") from None
    assert p.returncode == 1
    errors = [line for line in log.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, log
    return errors[0]


def test_worker_refuses_a_topic_without_the_setting(tmp_path, broker, redis_url):
    topic_prefix = f"lat{uuid.uuid4().hex[:8]}"
    create_topics(
        broker.bootstrap,
        {
            f"{topic_prefix}.deltas": (SHARDS, {}),  # no message.timestamp.type
            f"{topic_prefix}.votes": (SHARDS, {"cleanup.policy": "delete"}),
            f"{topic_prefix}.roots": (SHARDS, {"cleanup.policy": "delete"}),
        },
    )
    write_chain(tmp_path, ("peer-a", "peer-b", "peer-c"), 2)
    p = start_worker(tmp_path, "peer-a", broker.bootstrap, redis_url, f"knhktest-{topic_prefix}", topic_prefix)
    p.wait(60)  # the log is complete once the process is gone
    log = (tmp_path / "peer-a.log").read_text(errors="replace")
    line = _refusal(p, log)
    deltas = f"'{topic_prefix}.deltas'"
    found = "has message.timestamp.type=CreateTime" if broker.real_kafka else "does not report message.timestamp.type"
    assert line.startswith(f"Error: deltas topic {deltas} "), line
    assert found in line, line
    assert (
        f"kafka-configs --bootstrap-server {broker.bootstrap} --alter --entity-type topics --entity-name "
        f"{topic_prefix}.deltas --add-config message.timestamp.type=LogAppendTime"
    ) in line
    assert "--allow-producer-timestamps" in line
    assert "Traceback" not in log


def _wait_timestamp_type(bootstrap: str, topic: str, value: str, timeout: float = 30) -> None:
    """Until DescribeConfigs reports `value` (an altered config reaches the broker a moment later)."""
    admin = Admin(bootstrap)
    deadline = time.monotonic() + timeout
    while True:
        found = topic_configs(admin, topic)
        if isinstance(found, dict) and found.get("message.timestamp.type") == value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic}: message.timestamp.type still not {value} after {timeout} s: {found}")
        time.sleep(0.2)


def _set_timestamp_type(bootstrap: str, topic: str, value: str) -> None:
    entry = ConfigEntry("message.timestamp.type", value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin = Admin(bootstrap)  # kept while the future is pending (the client goes with it)
    admin.client.incremental_alter_configs([resource])[resource].result(timeout=30)
    _wait_timestamp_type(bootstrap, topic, value)


def test_worker_refuses_create_time_then_runs_once_fixed(cluster):
    deltas = cluster.topics.deltas.name
    _set_timestamp_type(cluster.bootstrap, deltas, "CreateTime")
    p = cluster.start("peer-a", allow_producer_timestamps=False)
    p.wait(60)
    line = _refusal(p, cluster.log("peer-a"))
    assert f"deltas topic '{deltas}' has message.timestamp.type=CreateTime, not LogAppendTime" in line
    assert f"--entity-name {deltas} --add-config message.timestamp.type=LogAppendTime" in line
    # The fix the line names (here through `topics apply --fix-config`, which sets the same value).
    results = apply_topics(cluster.bootstrap, cluster.topics, fix_config=True)
    assert "message.timestamp.type=LogAppendTime" in [f for r in results for f in r.fixed]
    _wait_timestamp_type(cluster.bootstrap, deltas, "LogAppendTime")
    cluster.procs.pop("peer-a")
    cluster.start("peer-a", name="peer-a-fixed", allow_producer_timestamps=False)
    cluster.wait_joined("peer-a-fixed")


def test_broker_clock_drives_the_beats(cluster):
    """On a LogAppendTime topic a producer's timestamp counts for nothing: the beats follow the broker's clock."""
    for peer in cluster.settings.peers:
        cluster.start(peer.id, allow_producer_timestamps=False)  # the check passes: the topic is LogAppendTime
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    before_ms = int(time.time() * 1000)
    p = Producer({"bootstrap.servers": cluster.bootstrap})
    delta = encode_json(Delta((Triple("urn:a", "urn:p", "1970"),), ()))
    for shard in range(SHARDS):
        p.produce(cluster.topics.deltas.name, value=delta, partition=shard, timestamp=1)  # 1 ms after the epoch
    p.flush(10)
    cluster.produced += SHARDS
    cluster.wait_all_committed()
    beat_ms = 8 * cluster.settings.tick_ms
    for shard, chain in cluster.chains().items():
        assert chain, f"shard {shard} committed nothing"
        assert all(ce.entry.cycle >= before_ms // beat_ms for ce in chain), (shard, [c.entry.cycle for c in chain])
    cluster.stop_all()

"""`knhk-stream topics apply` and `knhk-stream produce` against a real (embedded Tansu) broker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from knhk_stream.cli.main import main
from knhk_stream.kafka.admin import create_topics
from knhk_stream.kafka.embedded import EmbeddedBroker
from knhk_stream.kafka.producer import parse_delta_json
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.decode import AVRO_MAGIC, Delta, decode_delta

pytestmark = pytest.mark.integration

DECLARED = load_topics()


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture()
def prefix() -> str:
    """A topic prefix of this test's own (topics cannot be shared between tests)."""
    return f"tp{uuid.uuid4().hex[:10]}"


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def partitions(bootstrap: str) -> dict[str, int]:
    """Partition counts without naming topics (a named request makes Tansu auto-create them)."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in metadata.topics.items()}


def read_values(bootstrap: str, topic: str) -> list[bytes]:
    return [value for _partition, value in read_records(bootstrap, topic)]


def read_records(bootstrap: str, topic: str) -> list[tuple[int, bytes]]:
    """(partition, value) of every record of `topic`, read from offset 0 up to the high watermarks
    a fetch reported (Tansu's ListOffsets "latest" cannot be trusted)."""
    n = partitions(bootstrap)[topic]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})  # fmt: skip
    values: list[tuple[int, bytes]] = []
    try:
        tps = [TopicPartition(topic, p, 0) for p in range(n)]
        c.assign(tps)
        position = dict.fromkeys(range(n), 0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for m in c.consume(1000, timeout=0.2):
                assert m.error() is None, m.error()
                values.append((m.partition(), m.value()))
                position[m.partition()] = m.offset() + 1
            high = {tp.partition: c.get_watermark_offsets(tp, cached=True)[1] for tp in tps}
            if all(h >= 0 and position[p] >= h for p, h in high.items()):
                return values
        raise AssertionError(f"{topic}: high watermarks {high} not reached by {position} in 20 s")
    finally:
        c.close()


def apply(bootstrap: str, prefix: str, *extra: str) -> Result:
    return run("topics", "apply", "--bootstrap", bootstrap, "--topic-prefix", prefix, *extra)


# -- topics apply -------------------------------------------------------------------------


def test_apply_creates_the_three_topics_then_says_ok(broker, prefix):
    result = apply(broker.bootstrap, prefix)
    assert result.exit_code == 0, result.output
    names = [t.name for t in DECLARED.renamed(prefix).all()]
    found = partitions(broker.bootstrap)
    for name in names:
        assert found[name] == DECLARED.deltas.partitions
        assert f"created   {name}" in result.output
    again = apply(broker.bootstrap, prefix)
    assert again.exit_code == 0, again.output
    assert [line.split()[:2] for line in again.stdout.splitlines()] == [["ok", n] for n in names]
    report = json.loads(apply(broker.bootstrap, prefix, "--json", "--check").stdout)
    assert report["ok"] and [t["status"] for t in report["topics"]] == ["ok"] * len(names)


def test_apply_refuses_a_topic_with_fewer_partitions(broker, prefix):
    create_topics(broker.bootstrap, {f"{prefix}.votes": (2, {})})
    result = apply(broker.bootstrap, prefix)
    assert result.exit_code == 1
    message = next(line for line in result.output.splitlines() if "error:" in line and f"{prefix}.votes" in line)
    assert "has 2 partitions" in message and f"{DECLARED.votes.partitions} are declared" in message
    assert "cannot shrink" in message and "--partitions 2" in message
    assert partitions(broker.bootstrap)[f"{prefix}.votes"] == 2  # left alone


def test_check_reports_missing_topics_and_creates_nothing(broker, prefix):
    result = apply(broker.bootstrap, prefix, "--check")
    assert result.exit_code == 1
    assert "missing" in result.output and "without --check" in result.output
    assert not [name for name in partitions(broker.bootstrap) if name.startswith(prefix)]


def test_apply_warns_about_and_fixes_a_compacted_roots_topic(broker, prefix):
    create_topics(broker.bootstrap, {f"{prefix}.roots": (DECLARED.roots.partitions, {"cleanup.policy": "compact"})})
    warned = apply(broker.bootstrap, prefix)
    assert warned.exit_code == 0, warned.output
    assert "config cleanup.policy is 'compact' on the broker, declared 'delete'" in warned.output
    fixed = apply(broker.bootstrap, prefix, "--fix-config")
    assert "fixed: cleanup.policy=delete" in fixed.output
    assert "warning" not in apply(broker.bootstrap, prefix).output


# -- produce ------------------------------------------------------------------------------


def test_produce_synthetic_json(broker, prefix):
    assert apply(broker.bootstrap, prefix).exit_code == 0
    result = run("produce", "--bootstrap", broker.bootstrap, "--topic-prefix", prefix,
                 "--synthetic", "500", "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"producing to {prefix}.deltas" in result.stderr  # the progress bar (label only: not a TTY)
    assert result.stdout.startswith(f"sent 500 deltas to {prefix}.deltas (json)")
    values = read_values(broker.bootstrap, f"{prefix}.deltas")
    assert len(values) == 500
    assert all(v[:1] == b"{" and isinstance(decode_delta(v), Delta) for v in values)


def jsonl(n: int) -> list[str]:
    """n JSON delta lines with varied spacing and key order (to see that JSON is sent unchanged)."""
    lines = []
    for i in range(n):
        t = {"s": f"urn:s{i}", "p": "urn:p", "o": f"v {i} é"}
        lines.append(json.dumps({"id": f"d{i}", "additions": [t], "removals": []}, ensure_ascii=i % 2 == 0)
                     if i % 3 else f'{{ "additions" : [ {json.dumps(t)} ] , "actor": "a{i}" }}')  # fmt: skip
    return lines


def test_produce_avro_from_a_file(broker, prefix, tmp_path: Path):
    assert apply(broker.bootstrap, prefix).exit_code == 0
    lines = jsonl(300)
    path = tmp_path / "deltas.jsonl"
    path.write_text("\n".join(lines[:100]) + "\n\n  \n" + "\n".join(lines[100:]) + "\n", "utf-8")
    result = run("produce", "--bootstrap", broker.bootstrap, "--topic-prefix", prefix, "--format", "avro",
                 "--quiet", str(path))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout.startswith("sent 300 deltas")
    values = read_values(broker.bootstrap, f"{prefix}.deltas")
    assert len(values) == 300
    assert all(v[:2] == AVRO_MAGIC for v in values)
    # Avro has no null id/actor: a missing one arrives as "".
    sent = [d._replace(id=d.id or "", actor=d.actor or "") for d in map(parse_delta_json, lines)]
    assert sorted(map(decode_delta, values)) == sorted(sent)


def test_produce_json_from_stdin_is_byte_identical(broker, prefix):
    assert apply(broker.bootstrap, prefix).exit_code == 0
    lines = jsonl(200)
    result = run("produce", "--bootstrap", broker.bootstrap, "--topic-prefix", prefix, "--format", "json",
                 "--partition", "1", "-", stdin="\n".join(lines) + "\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    records = read_records(broker.bootstrap, f"{prefix}.deltas")
    assert {partition for partition, _ in records} == {1}
    values = [value for _, value in records]
    assert sorted(values) == sorted(line.encode("utf-8") for line in lines)
    assert all(isinstance(decode_delta(v), Delta) for v in values)


def test_produce_avro_names_a_bad_line_and_sends_nothing(broker, prefix, tmp_path: Path):
    assert apply(broker.bootstrap, prefix).exit_code == 0
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([*jsonl(3), "", "{not json", *jsonl(2)]) + "\n", "utf-8")
    base = ("produce", "--bootstrap", broker.bootstrap, "--topic-prefix", prefix, "--quiet", str(path))
    result = run(*base)
    assert result.exit_code == 1
    assert "line 5 is not valid JSON" in result.output and "--as-is" in result.output
    assert read_values(broker.bootstrap, f"{prefix}.deltas") == []
    as_is = run(*base, "--as-is")
    assert as_is.exit_code == 0, as_is.output
    values = read_values(broker.bootstrap, f"{prefix}.deltas")
    assert len(values) == 6 and b"{not json" in values


def test_produce_rate_is_kept_on_average(broker, prefix):
    assert apply(broker.bootstrap, prefix).exit_code == 0
    started = time.monotonic()
    result = run("produce", "--bootstrap", broker.bootstrap, "--topic-prefix", prefix, "--synthetic", "1000",
                 "--rate", "1000", "--quiet")  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert 0.95 <= elapsed < 2.5, elapsed
    assert len(read_values(broker.bootstrap, f"{prefix}.deltas")) == 1000


def test_produce_refuses_a_missing_topic(broker, prefix):
    result = run("produce", "--bootstrap", broker.bootstrap, "--topic-prefix", prefix, "--synthetic", "5")
    assert result.exit_code == 1
    assert f"{prefix}.deltas' does not exist" in result.output and "topics apply" in result.output
    assert f"{prefix}.deltas" not in partitions(broker.bootstrap)  # not auto-created either

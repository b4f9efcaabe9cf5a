"""Issue 16, "From produce to proof": produce refuses what is not a delta, says where each delta went,
and `prove` finds a delta by id or offset with an exit code that says "not yet" (75).

The whole path with committed beats (prove --id, verify-proof) runs in test_readme.py.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from knhk_stream.cli.main import main
from tests.cli.conftest import knhk
from tests.integration.test_topics_produce import read_values

pytestmark = pytest.mark.integration

GOOD = '{"id": "o-1", "additions": [{"s": "urn:order:1", "p": "urn:status", "o": "shipped"}]}'


def make_topics(bootstrap: str) -> tuple[str, list[str]]:
    """A topic prefix of its own, its topics created; and the Kafka options to pass."""
    prefix = f"pp{uuid.uuid4().hex[:10]}"
    kafka = ["--bootstrap", bootstrap, "--topic-prefix", prefix]
    assert knhk("topics", "apply", *kafka).rc == 0
    return prefix, kafka


@pytest.fixture()
def topics(broker) -> tuple[str, list[str]]:
    return make_topics(broker.bootstrap)


@pytest.fixture(scope="module")
def refusing(broker) -> tuple[str, list[str]]:
    """Topics shared by the refusal tests: nothing may ever be sent to them."""
    return make_topics(broker.bootstrap)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"addtions": [{"s": "urn:a", "p": "urn:b", "o": "c"}]}',
         "line 2: field 'addtions': unknown field (did you mean 'additions'?)"),
        ('{"foo": 1}', "line 2: field 'foo': unknown field; a delta has only additions, removals, id, actor"),
        ('{"id": "x"}', "line 2: field 'additions': missing: a delta needs additions or removals"),
        ('{"additions": [{"s": "urn:a", "p": "urn:b", "o": 7}]}', "line 2: field 'additions[0].o': must be a string"),
        ('{"additions": [], "removals": []}', "line 2: field 'additions': the delta has no triples"),
        ('{"additions": "urn:a"}', "line 2: field 'additions': must be an array of triples, not a string"),
    ],
)  # fmt: skip
def test_produce_refuses_a_line_that_is_not_a_delta(broker, refusing, tmp_path: Path, line: str, message: str):
    prefix, kafka = refusing
    path = tmp_path / "deltas.jsonl"
    path.write_text(f"{GOOD}\n{line}\n", "utf-8")
    ran = knhk("produce", str(path), *kafka, "-q")  # Avro, the default
    assert ran.rc == 1, ran.err
    assert ran.seconds < 5, ran.seconds
    assert ran.err_lines == [ran.err_lines[-1]] and ran.err_lines[0].startswith(f"Error: {message}"), ran.err
    assert "nothing was sent" in ran.err and "--as-is" in ran.err
    as_json = CliRunner().invoke(main, ["produce", str(path), *kafka, "-q", "--format", "json"])  # also as JSON
    assert as_json.exit_code == 1 and f"Error: {message}" in as_json.output
    assert read_values(broker.bootstrap, f"{prefix}.deltas") == []


def test_produce_from_stdin_stops_at_the_bad_line_and_as_is_sends_it(broker, topics):
    prefix, kafka = topics
    ran = knhk("produce", "-", *kafka, "-q", stdin=f'{GOOD}\n{{"addtions": []}}\n{GOOD}\n')
    assert ran.rc == 1 and ran.seconds < 5
    assert "line 2: field 'addtions'" in ran.err and "the 1 deltas before it were sent" in ran.err
    as_is = knhk("produce", "-", *kafka, "-q", "--as-is", "--format", "json", stdin='{"addtions": []}\n')
    assert as_is.rc == 0, as_is.err
    values = read_values(broker.bootstrap, f"{prefix}.deltas")  # the good line (Avro), then the bad one as it is
    assert len(values) == 2 and b'{"addtions": []}' in values


def test_produce_report_says_where_each_delta_went(broker, topics, tmp_path: Path):
    prefix, kafka = topics
    lines = [GOOD.replace("o-1", f"o-{i}").replace("order:1", f"order:{i}") for i in range(1, 6)]
    path = tmp_path / "deltas.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", "utf-8")
    ran = knhk("produce", str(path), *kafka, "--report", "-", "-q")
    assert ran.rc == 0, ran.err
    assert ran.err.startswith("sent 5 deltas")  # the summary moves to stderr: stdout is the report
    rows = [json.loads(line) for line in ran.out.splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 4, 5, 6]  # file line numbers, blank lines counted
    assert sorted(r["id"] for r in rows) == [f"o-{i}" for i in range(1, 6)]
    assert all(r["topic"] == f"{prefix}.deltas" and r["partition"] in range(4) and r["offset"] >= 0 for r in rows)
    assert len({(r["partition"], r["offset"]) for r in rows}) == 5
    report = tmp_path / "sent.jsonl"
    again = knhk("produce", "--synthetic", "3", *kafka, "--report", str(report), "--partition", "2", "-q")
    assert again.rc == 0 and again.out.startswith("sent 3 deltas")
    assert [json.loads(x)["partition"] for x in report.read_text().splitlines()] == [2, 2, 2]


def test_prove_says_not_yet_with_exit_75_and_waits_when_asked(topics, tmp_path: Path, redis_url, settings):
    _prefix, kafka = topics
    (tmp_path / "chain.toml").write_text(settings.to_toml())
    store = ["--settings", str(tmp_path / "chain.toml"), "--redis", redis_url, "--prefix", f"none-{uuid.uuid4().hex}"]
    by_offset = knhk("prove", *store, *kafka, "--shard", "1", "--offset", "0")
    assert by_offset.rc == 75 and by_offset.seconds < 5
    assert by_offset.err_lines[-1].startswith("Error: shard 1 of chain 'knhk' has no committed entry")
    assert "try again" in by_offset.err
    by_id = knhk("prove", *store, *kafka, "--id", "o-1")
    assert by_id.rc == 75 and "no delta with id 'o-1'" in by_id.err and "--wait" in by_id.err
    bounded = knhk("prove", *store, *kafka, "--id", "o-1", "--to", "5")  # a closed range: not there is final
    assert bounded.rc == 1 and "widen --from/--to" in bounded.err
    waited = knhk("prove", *store, *kafka, "--shard", "1", "--offset", "0", "--wait", "2")
    assert waited.rc == 75 and 2 <= waited.seconds < 7
    assert "trying again for up to 2 s (--wait)" in waited.err
    usage = knhk("prove", *store, *kafka, "--shard", "1", "--offset", "0", "--id", "o-1")
    assert usage.rc == 2 and "give --offset O (with --shard S) or --id ID" in usage.err

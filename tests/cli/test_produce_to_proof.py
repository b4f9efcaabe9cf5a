"""Issue 16, "From produce to proof": produce refuses what is not a delta, says where each delta went,
and `prove` finds a delta by id or offset with an exit code that says "not yet" (75).

The whole path with committed beats (prove --id, verify-proof) runs in test_readme.py.
"""

from __future__ import annotations

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

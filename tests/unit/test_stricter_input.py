"""Protocol v2's stricter input, beyond the vectors (tests/unit/test_vectors_v2.py has those).

Deep JSON up to 10,000 levels never raises and is malformed exactly above 64, whatever
the recursion limit; the rejection codes' precedence; negative timestamps count as 0; a
marker header does not hide a delta; the worker's and the Faust adapter's record
conversions give the same receipts; and the LogAppendTime refusal (the function that
reads DescribeConfigs, the worker, the CLI and the Faust peer), without a broker.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException
from hypothesis import given, settings
from hypothesis import strategies as st

from knhk_stream.errors import TopicsError
from knhk_stream.kafka import admin
from knhk_stream.protocol.beats import BeatAssembler
from knhk_stream.protocol.decode import MALFORMED, MAX_DEPTH, Delta, Triple, decode_delta, decode_valid
from knhk_stream.protocol.engine import MARKER_HEADER, ResumePoint, is_marker
from knhk_stream.protocol.hooks import Hook, load_hook
from knhk_stream.protocol.receipts import APPLIED, REJECTED, DeltaProcessor, Receipt, rejected_a_hash
from knhk_stream.runtime import worker as worker_module
from knhk_stream.runtime.node import PeerNode, Record

CANONICAL = load_hook("canonical@1")
PROC = DeltaProcessor(CANONICAL)
TRIPLE = '{"s":"a","p":"b","o":"c"}'
DEEP_REASON = f"not a JSON delta: nested deeper than {MAX_DEPTH} levels"


# -- deep JSON ------------------------------------------------------------------------------


def _nested(levels: int, kinds: str, inner: str) -> str:
    """`inner` inside `levels` arrays and objects, built without recursion (kinds cycled: a array, o object)."""
    opens, closes = [], []
    for i in range(levels):
        if kinds[i % len(kinds)] == "a":
            opens.append("[")
            closes.append("]")
        else:
            opens.append('{"k":')
            closes.append("}")
    return "".join(opens) + inner + "".join(reversed(closes))


INNER = {"1": 0, "null": 0, '"[[[{"': 0, '"\\\\"': 0, '"\\""': 0, "-1.5e400": 0, "[]": 1, "{}": 1, '[{"k":[]}]': 3}


def _deep_delta(levels: int, kinds: str, inner: str) -> tuple[bytes, int]:
    """A valid delta with a nested ignored field; (value, its depth)."""
    text = '{"additions":[' + TRIPLE + '],"x":' + _nested(levels, kinds, inner) + "}"
    return text.encode(), 1 + levels + INNER.get(inner, 0)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.integers(0, 80), st.integers(0, 10_000)),
    st.text(alphabet="ao", min_size=1, max_size=4),
    st.sampled_from(sorted(INNER)),
)
def test_deep_json_never_raises_and_is_malformed_above_64(levels, kinds, inner):
    value, depth = _deep_delta(levels, kinds, inner)
    decoded = decode_delta(value)
    outcome = PROC.outcome(value)
    receipt = Receipt.from_bytes(PROC.receipt(0, 1, 2, 3, value))
    if depth > MAX_DEPTH:
        assert decoded == (MALFORMED, DEEP_REASON)
        assert decode_valid(value) is None
        assert (outcome.status, outcome.code) == (REJECTED, MALFORMED)
        assert (receipt.status, receipt.lanes, receipt.a_hash) == (REJECTED, 0, rejected_a_hash(MALFORMED))
    else:
        assert decoded == Delta((Triple("a", "b", "c"),), ())
        assert decode_valid(value) in (None, decoded)
        assert (outcome.status, outcome.lanes) == (APPLIED, 1)
        assert (receipt.status, receipt.lanes, receipt.a_hash) == (APPLIED, 1, outcome.a_hash)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10_000), st.text(alphabet="ao", min_size=1, max_size=3))
def test_deep_json_top_level_chain(levels, kinds):
    """The delta object itself nested: {"k":{"k":...}} has no triples (empty) up to 64, then malformed."""
    value = _nested(levels, "o" + kinds, "1").encode()
    code = decode_delta(value).code
    assert code == (MALFORMED if levels > MAX_DEPTH else "empty")


def test_deep_json_does_not_depend_on_the_recursion_limit():
    """Lowered to a little above what 64 levels need, or raised far up: the same answers, for the same reasons."""
    shallow, depth = _deep_delta(63, "ao", "1")
    assert depth == MAX_DEPTH
    cases = [shallow] + [_deep_delta(n, kinds, "1")[0] for n in (64, 900, 5000, 10_000) for kinds in ("a", "o", "oa")]
    expected = [decode_delta(v) for v in cases]
    assert expected[0] == Delta((Triple("a", "b", "c"),), ())
    assert all(e == (MALFORMED, DEEP_REASON) for e in expected[1:])
    frames, f = 0, sys._getframe()
    while f is not None:
        frames, f = frames + 1, f.f_back
    limit = sys.getrecursionlimit()
    for new_limit in (frames + MAX_DEPTH + 40, 100_000):
        sys.setrecursionlimit(new_limit)
        try:
            got = [decode_delta(v) for v in cases]
            receipts = [PROC.receipt(0, 1, 2, 3, v) for v in cases]
        finally:
            sys.setrecursionlimit(limit)
        assert got == expected
        assert [Receipt.from_bytes(r).status for r in receipts] == [APPLIED] + [REJECTED] * (len(cases) - 1)


def test_lone_surrogate_deep_in_an_ignored_field():
    value, _ = _deep_delta(60, "oa", '"\\udbff"')
    assert decode_delta(value).code == MALFORMED
    value, _ = _deep_delta(60, "oa", '"\\udbff\\udfff"')  # a pair is a character
    assert isinstance(decode_delta(value), Delta)


# -- precedence of the rejection codes ------------------------------------------------------


def _raising(_delta):
    raise RuntimeError("the hook failed")


@pytest.mark.parametrize(
    ("text", "max_triples", "hook", "code"),
    [
        pytest.param('{"additions":[],"id":5}', 4, CANONICAL, MALFORMED, id="malformed-before-empty"),
        pytest.param(
            '{"additions":[' + ",".join([TRIPLE] * 3) + '],"x":NaN}',
            2,
            CANONICAL,
            MALFORMED,
            id="malformed-before-too_large",
        ),
        pytest.param(
            '{"additions":[{"s":"","p":"b","o":"c"}],"x":{"k":1,"k":2}}',
            4,
            CANONICAL,
            MALFORMED,
            id="malformed-before-invalid_term",
        ),
        pytest.param(
            '{"additions":[' + ",".join(['{"s":"","p":"b","o":"c"}'] * 3) + "]}",
            2,
            CANONICAL,
            "too_large",
            id="too_large-before-invalid_term",
        ),
        pytest.param(
            '{"additions":[' + TRIPLE + "," + TRIPLE + "]}", 1, CANONICAL, "too_large", id="too_large-counts-duplicates"
        ),
        pytest.param(
            '{"additions":[{"s":"","p":"b","o":"c"}]}',
            4,
            Hook("raising@1", _raising),
            "invalid_term",
            id="invalid_term-before-hook_error",
        ),
        pytest.param('{"additions":[' + TRIPLE + "]}", 4, Hook("raising@1", _raising), "hook_error", id="hook_error"),
    ],
)
def test_rejection_code_precedence(text, max_triples, hook, code):
    out = DeltaProcessor(hook, max_triples).outcome(text.encode())
    assert (out.status, out.code, out.a_hash) == (REJECTED, code, rejected_a_hash(code))
    receipt = Receipt.from_bytes(DeltaProcessor(hook, max_triples).receipt(0, 0, 0, 0, text.encode()))
    assert receipt.a_hash == rejected_a_hash(code)


# -- negative timestamps and markers --------------------------------------------------------


@pytest.mark.parametrize("ts", [-1, -5, -(2**63)])
def test_negative_timestamp_counts_as_zero(ts):
    asm = BeatAssembler(2, 125, PROC)
    value = ('{"additions":[' + TRIPLE + "]}").encode()
    assert asm.feed(10, ts, False, value) is None  # used to crash the receipt step (cycle -1)
    assert (asm.last_tick, asm.open_cycle) == (0, 0)
    assert asm.feed(11, 999, False, value) is None  # tick 7, still cycle 0
    beat = asm.feed(12, 1000, True, None)  # cycle 1 closes cycle 0
    assert beat is not None
    assert [(r.cycle, r.tick, r.offset) for r in map(Receipt.from_bytes, beat.receipts)] == [(0, 0, 10), (0, 7, 11)]
    assert asm.feed(13, ts, False, value) is None  # after later records: the running maximum holds
    assert asm.last_tick == 8


@pytest.mark.parametrize(
    ("headers", "value", "marker"),
    [
        ([(MARKER_HEADER, b"")], None, True),
        ([(MARKER_HEADER, None)], b"", True),
        ({MARKER_HEADER: b"1"}, None, True),
        ([("trace", b"x"), (MARKER_HEADER, b"")], b"", True),
        ([(MARKER_HEADER, b"")], b"{}", False),  # a header cannot hide a delta
        ([(MARKER_HEADER, b"")], b"\x00", False),
        ({MARKER_HEADER: b""}, b'{"additions":[]}', False),
        (None, None, False),
        ([], b"", False),
        ({}, None, False),
        ([("knhk-markers", b"")], None, False),
    ],
)
def test_is_marker(headers, value, marker):
    assert is_marker(headers, value) is marker


# -- the worker's and the Faust adapter's records give the same receipts --------------------


class _KafkaMessage:
    """What confluent-kafka's consumer returns, for `worker.from_message`."""

    def __init__(self, partition, offset, ts, headers, value, key=None):
        self._p, self._o, self._ts, self._h, self._v, self._k = partition, offset, ts, headers, value, key

    def error(self):
        return None

    def topic(self):
        return "knhk.deltas"

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return (TIMESTAMP_NOT_AVAILABLE, -1) if self._ts is None else (TIMESTAMP_CREATE_TIME, self._ts)

    def headers(self):
        return self._h

    def value(self):
        return self._v

    def key(self):
        return self._k


def _faust_message(partition, offset, ts, headers, value, key=None):
    """What Faust hands an agent (timestamps as float seconds, None when the record has none)."""
    return SimpleNamespace(
        partition=partition, offset=offset, timestamp=None if ts is None else ts / 1000, headers=headers,
        value=value, key=key,
    )  # fmt: skip


T0 = 1_700_000_000_000  # a beat boundary (ms) with tick_ms 125
DEEP_RECORDS = [
    # (offset, ts ms or None, headers, value)
    (0, None, None, _deep_delta(63, "ao", "1")[0]),  # no timestamp: -1, counts as 0
    (1, 5, [(MARKER_HEADER, b"")], _deep_delta(64, "ao", "1")[0]),  # header on a delta: 65 levels, malformed
    (2, 7, None, _deep_delta(10_000, "oa", "[]")[0]),
    (3, T0, None, _deep_delta(900, "a", '"[[[{"')[0]),
    (4, T0 + 130, [(MARKER_HEADER, b"")], b""),  # a marker
    (5, T0 + 260, {"other": b"1"}, _deep_delta(62, "o", "{}")[0]),
    (6, T0 + 1000, [(MARKER_HEADER, b"")], None),  # a marker of the next beat: closes the open one
]


def _receipts(records: list[Record]) -> list[bytes]:
    asm = BeatAssembler(0, 125, PROC)
    out: list[bytes] = []
    for r in records:
        beat = asm.feed(r.offset, r.timestamp_ms, is_marker(r.headers, r.value), r.value)
        if beat is not None:
            out.extend(beat.receipts)
    return out


def test_worker_and_faust_records_give_identical_receipts(settings, peer_keys):
    from knhk_stream.integrations.faust import record_of

    via_worker = worker_module.records([_KafkaMessage(0, *r) for r in DEEP_RECORDS])
    via_faust = [record_of(_faust_message(0, *r)) for r in DEEP_RECORDS]
    stamps = [-1, 5, 7, T0, T0 + 130, T0 + 260, T0 + 1000]
    assert [r.timestamp_ms for r in via_worker] == [r.timestamp_ms for r in via_faust] == stamps
    receipts = _receipts(via_worker)
    assert receipts == _receipts(via_faust)
    parsed = [Receipt.from_bytes(r) for r in receipts]
    assert [(p.offset, p.cycle, p.status) for p in parsed] == [
        (0, 0, APPLIED),  # 64 levels
        (1, 0, REJECTED),  # 65 levels, under a marker header
        (2, 0, REJECTED),
        (3, T0 // 1000, REJECTED),
        (5, T0 // 1000, APPLIED),  # 64 levels
    ]
    assert {p.a_hash for p in parsed if p.status == REJECTED} == {rejected_a_hash(MALFORMED)}
    # And through the node, which the worker and the Faust peer both drive: the same entries.
    entries = []
    for records in (via_worker, via_faust):
        node = PeerNode(settings, "peer-a", peer_keys["peer-a"], SimpleNamespace(chain_id=settings.chain_id))
        node.engine.assign(0, ResumePoint(0))
        entries.append([v.entry for v in node.process(records)])
    assert entries[0] == entries[1]
    assert [(e.cycle, e.receipt_count, e.first_offset, e.last_offset) for e in entries[0]] == [
        (0, 3, 0, 2),
        (T0 // 1000, 2, 3, 5),
    ]


# -- LogAppendTime: reading DescribeConfigs -------------------------------------------------


def test_log_append_time_passes():
    assert admin.log_append_time_problem("knhk.deltas", {"message.timestamp.type": "LogAppendTime"}) is None
    found = {"cleanup.policy": "delete", "message.timestamp.type": "LogAppendTime", "retention.ms": None}
    assert admin.log_append_time_problem("knhk.deltas", found, "k:9092") is None


@pytest.mark.parametrize(
    ("found", "words"),
    [
        ({"message.timestamp.type": "CreateTime"}, "has message.timestamp.type=CreateTime"),
        ({"message.timestamp.type": "logappendtime"}, "has message.timestamp.type=logappendtime"),
        ({"message.timestamp.type": None}, "does not report message.timestamp.type"),
        ({"cleanup.policy": "delete"}, "does not report message.timestamp.type"),  # Tansu: keys set at creation
        ({}, "does not report message.timestamp.type"),
    ],
)
def test_log_append_time_refused(found, words):
    line = admin.log_append_time_problem("orders.deltas", found, "k1:9092,k2:9092")
    assert line is not None and "\n" not in line
    assert "'orders.deltas'" in line and words in line
    assert (
        "kafka-configs --bootstrap-server k1:9092,k2:9092 --alter --entity-type topics --entity-name orders.deltas "
        "--add-config message.timestamp.type=LogAppendTime"
    ) in line
    assert "--allow-producer-timestamps" in line


@pytest.mark.parametrize(
    ("found", "words"),
    [
        (KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized")), "not authorized"),
        (TimeoutError(), "TimeoutError"),
        (RuntimeError("DescribeConfigs unsupported"), "DescribeConfigs unsupported"),
    ],
)
def test_log_append_time_unreadable_is_refused(found, words):
    line = admin.log_append_time_problem("knhk.deltas", found, "k:9092")
    assert line is not None and "\n" not in line
    assert "cannot read message.timestamp.type of deltas topic 'knhk.deltas' from k:9092" in line
    assert words in line and "--allow-producer-timestamps" in line


def test_log_append_time_missing_topic():
    line = admin.log_append_time_problem("knhk.deltas", None)
    assert line == "deltas topic 'knhk.deltas' does not exist; run `knhk-stream topics apply` to create it"


def test_require_log_append_time_reads_describe_configs(monkeypatch):
    seen = []

    def configs(adm, topic, timeout):
        seen.append((adm.bootstrap, topic))
        return {"message.timestamp.type": "CreateTime"}

    monkeypatch.setattr(admin, "topic_configs", configs)
    with pytest.raises(TopicsError, match=r"'t\.deltas' has message\.timestamp\.type=CreateTime"):
        admin.require_log_append_time("127.0.0.1:1", "t.deltas")
    monkeypatch.setattr(admin, "topic_configs", lambda adm, topic, timeout: {"message.timestamp.type": "LogAppendTime"})
    admin.require_log_append_time("127.0.0.1:1", "t.deltas")
    assert seen == [("127.0.0.1:1", "t.deltas")]


# -- LogAppendTime: the worker, its command and the Faust peer refuse ------------------------


def _refuse(bootstrap, topic, kafka_config=None, timeout=10.0):
    raise TopicsError(admin.log_append_time_problem(topic, {"message.timestamp.type": "CreateTime"}, bootstrap))


def test_worker_refuses_before_anything_else(monkeypatch, settings, peer_keys):
    monkeypatch.setattr(worker_module, "require_log_append_time", _refuse)
    monkeypatch.setattr(worker_module.PeerNode, "connect", pytest.fail)  # nothing is set up before the check
    opts = worker_module.WorkerOptions(bootstrap="127.0.0.1:1")
    with pytest.raises(TopicsError, match=r"'knhk\.deltas' has message\.timestamp\.type=CreateTime"):
        worker_module.Worker(settings, "peer-a", peer_keys["peer-a"], opts)


def test_worker_allowed_producer_timestamps_skips_the_check(monkeypatch, settings, peer_keys):
    monkeypatch.setattr(worker_module, "require_log_append_time", pytest.fail)

    class Stop(Exception):
        pass

    def connect(*_a, **_kw):
        raise Stop

    monkeypatch.setattr(worker_module.PeerNode, "connect", connect)
    opts = worker_module.WorkerOptions(bootstrap="127.0.0.1:1", allow_producer_timestamps=True)
    with pytest.raises(Stop):  # past the check, at the next step of the start
        worker_module.Worker(settings, "peer-a", peer_keys["peer-a"], opts)
    assert worker_module.WorkerOptions(bootstrap="x").allow_producer_timestamps is False


def _worker_args(tmp_path):
    from knhk_stream.runtime.demo import write_chain

    write_chain(tmp_path, ("peer-a", "peer-b", "peer-c"), 2)
    return ["worker", "--settings", str(tmp_path / "chain.toml"), "--peer-id", "peer-a",
            "--key", str(tmp_path / "peer-a.pem"), "--bootstrap", "127.0.0.1:1"]  # fmt: skip


def test_worker_command_refuses_with_one_line(monkeypatch, tmp_path):
    from knhk_stream.cli import main

    monkeypatch.setattr(worker_module, "require_log_append_time", _refuse)
    monkeypatch.delenv("KNHK_ALLOW_PRODUCER_TIMESTAMPS", raising=False)
    result = CliRunner().invoke(main, _worker_args(tmp_path))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: deltas topic 'knhk.deltas' has message.timestamp.type=CreateTime")
    assert "--add-config message.timestamp.type=LogAppendTime" in lines[0]
    assert "--allow-producer-timestamps" in lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_worker_command_allows_producer_timestamps(monkeypatch, tmp_path, how):
    from knhk_stream.cli import main

    seen = []

    class FakeWorker:
        def __init__(self, settings, peer_id, key, opts, telemetry=None, stop=None):
            seen.append(opts.allow_producer_timestamps)

        def run(self, until=None):
            pass

    monkeypatch.setattr(worker_module, "Worker", FakeWorker)
    args = _worker_args(tmp_path)
    env = {}
    if how == "flag":
        args.append("--allow-producer-timestamps")
    else:
        env["KNHK_ALLOW_PRODUCER_TIMESTAMPS"] = "1"
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    assert seen == [True]


def test_worker_command_help_names_the_flag():
    from knhk_stream.cli import main

    out = CliRunner().invoke(main, ["worker", "--help"], terminal_width=200).output
    assert "--allow-producer-timestamps" in out
    assert "KNHK_ALLOW_PRODUCER_TIMESTAMPS" in out
    assert "Tansu" in out


def _faust_app():
    import faust

    return faust.App(f"knhk-test-{id(object())}", broker="kafka://k1:9092;k2", autodiscover=False)


def test_faust_peer_refuses(monkeypatch, settings, peer_keys):
    from knhk_stream.integrations import faust as integration

    seen = []

    def refuse(bootstrap, topic, kafka_config=None, timeout=10.0):
        seen.append((bootstrap, topic, kafka_config))
        _refuse(bootstrap, topic)

    monkeypatch.setattr(admin, "require_log_append_time", refuse)
    monkeypatch.setattr(integration.PeerNode, "connect", pytest.fail)
    with pytest.raises(TopicsError, match=r"message\.timestamp\.type=CreateTime"):
        integration.add_peer(_faust_app(), settings, "peer-a", peer_keys["peer-a"], kafka_config={"a": "b"})
    assert seen == [("k1:9092,k2:9092", "knhk.deltas", {"a": "b"})]


def test_faust_peer_allowed_producer_timestamps_skips_the_check(monkeypatch, settings, peer_keys):
    from knhk_stream.integrations import faust as integration

    class Stop(Exception):
        pass

    def connect(*_a, **_kw):
        raise Stop

    monkeypatch.setattr(admin, "require_log_append_time", pytest.fail)
    monkeypatch.setattr(integration.PeerNode, "connect", connect)
    with pytest.raises(Stop):
        integration.add_peer(_faust_app(), settings, "peer-a", peer_keys["peer-a"], allow_producer_timestamps=True)


def test_faust_bootstrap_of():
    from knhk_stream.integrations.faust import bootstrap_of

    assert bootstrap_of(_faust_app()) == "k1:9092,k2:9092"


def test_declared_deltas_topic_is_log_append_time():
    from knhk_stream.kafka.topics import load_topics

    assert load_topics().deltas.config.get("message.timestamp.type") == "LogAppendTime"

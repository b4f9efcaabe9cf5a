"""Verifiers report hostile data as findings and never raise: chain verify, verify-proof, audit, chain import,
the roots reader's check (and status, which reads the same data). Random and mutated inputs, modest examples."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knhk_stream.audit.core import DeltaLog, audit_shard, export_chain, import_chain
from knhk_stream.cli.main import main
from knhk_stream.errors import ChainImportError, InvalidRoot
from knhk_stream.kafka.embedded import create_topics
from knhk_stream.kafka.producer import DeltaInputError, delta_from_json
from knhk_stream.kafka.roots import check_root
from knhk_stream.protocol.beats import BeatAssembler
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.entry import entry_for_beat, record_key
from knhk_stream.protocol.proof import make_bundle, verify_bundle
from knhk_stream.protocol.quorum import Vote, sign
from knhk_stream.protocol.wire import encode_root
from knhk_stream.runtime.node import Record
from knhk_stream.runtime.status import shard_status
from knhk_stream.store.lockchain import (
    LockchainStore,
    Pin,
    PinFileError,
    evidence_problem,
    load_checkpoint,
    load_pins,
    pin_problems,
    verify_range,
)

# Past the interpreter's recursion limit: json.loads raises RecursionError on it, not ValueError.
DEEP = "[" * 100_000

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

# What a hostile writer puts where a field should be.
hostile = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(
        [
            "",
            "-1",
            "nan",
            "1e400",
            "[]",
            "{}",
            "null",
            "00" * 31,
            "zz" * 32,
            "\ud800",
            "[{}]",
            '[{"peer_id": 1, "signature": "00"}]',
            "18446744073709551616",
            " 7",
            DEEP,
        ]
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _beats(settings_, shard: int, n: int):
    asm = BeatAssembler(shard, settings_.tick_ms, settings_.processor())
    values, beats = [], []
    for i in range(8 * n + 1):
        v = json.dumps({"additions": [{"s": f"urn:{i}", "p": "urn:p", "o": "o"}], "removals": []}).encode()
        values.append(v)
        beat = asm.feed(i, (1000 + i) * settings_.tick_ms, False, v)
        if beat is not None:
            beats.append(beat)
    return beats, values


def _chain(settings_, keys, shard: int = 0, n: int = 3) -> tuple[list[CommittedEntry], list, list[bytes]]:
    beats, values = _beats(settings_, shard, n)
    prev, out = ZERO_HASH, []
    for beat in beats:
        e = entry_for_beat(settings_.chain_id, beat, prev)
        votes = [Vote(e, p, sign(keys[p], settings_.genesis.epoch_hash, e.entry_hash)) for p in ("peer-a", "peer-b",
                                                                                                 "peer-c")]  # fmt: skip
        out.append(CommittedEntry.from_quorum(e, votes, "peer-a", 1_700_000_000_000))
        prev = e.entry_hash
    return out, beats, values


@pytest.fixture()
def fresh_store(redis_url) -> Iterator:
    client = redis.Redis.from_url(redis_url)
    made: list[str] = []

    def make(chain: list[CommittedEntry]) -> LockchainStore:
        prefix = f"knhkfuzz-{uuid.uuid4().hex[:10]}"
        made.append(prefix)
        store = LockchainStore(client, "knhk", prefix)
        for ce in chain:
            store.append(ce)
        return store

    yield make
    for prefix in made:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


def _mutate(store: LockchainStore, chain: list[CommittedEntry], data) -> None:  # type: ignore[no-untyped-def]
    """One to three hostile writes anywhere in the shard's keys."""
    k = store.keys(0)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["field", "delete_field", "member", "head", "delete_entry", "raw_key"]))
        cycle = data.draw(st.sampled_from([ce.entry.cycle for ce in chain]))
        value = data.draw(hostile)
        value = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value  # Redis holds bytes
        if where == "field":
            name = data.draw(st.sampled_from(list(store.raw(0, cycle)) or ["root"]))
            store.client.hset(k.entry(cycle), name, value)
        elif where == "delete_field":
            name = data.draw(st.sampled_from(list(store.raw(0, cycle)) or ["root"]))
            store.client.hdel(k.entry(cycle), name)
        elif where == "member":
            store.client.zadd(k.cycles, {value: data.draw(st.floats(allow_nan=False, allow_infinity=False))})
        elif where == "head":
            store.client.hset(k.head, data.draw(st.sampled_from(["cycle", "entry_hash"])), value)
        elif where == "delete_entry":
            store.client.delete(k.entry(cycle))
        else:
            store.client.hset(k.entry_prefix.encode() + value, "root", value)


@FUZZ
@given(data=st.data())
def test_chain_verify_and_status_report_hostile_redis_data_and_never_raise(fresh_store, settings, peer_keys, data):
    chain, _, _ = _chain(settings, peer_keys)
    store = fresh_store(chain)
    _mutate(store, chain, data)
    report = verify_range(store, settings, 0)
    assert isinstance(report.ok, bool)
    verify_range(store, settings, 0, chain[1].entry.cycle, chain[1].entry.cycle)
    for pin in (Pin(chain[-1].entry.cycle, chain[-1].entry_hash), Pin(chain[0].entry.cycle, ZERO_HASH)):
        assert all(p.cycle == pin.cycle for p in pin_problems(store, 0, pin))
    shard_status(store, settings, 0)


@FUZZ
@given(data=st.data())
def test_audit_reports_hostile_redis_data_and_never_raises(fresh_store, settings, peer_keys, broker, data):
    chain, _, _ = _audit_topic(broker, settings, peer_keys)
    store = fresh_store(chain)
    _mutate(store, chain, data)
    report = audit_shard(store, settings, _AUDIT["log"], 0)
    assert report.status in ("OK", "FAILED", "INCOMPLETE")


_AUDIT: dict = {}


def _audit_topic(broker, settings_, keys):  # type: ignore[no-untyped-def]
    """One small deltas topic for every example (records as the chain's beats say)."""
    if "log" not in _AUDIT:
        from confluent_kafka import Producer

        chain, beats, values = _chain(settings_, keys)
        topic = f"fuzz-{uuid.uuid4().hex[:8]}"
        create_topics(broker.bootstrap, {topic: (1, {})})
        p = Producer({"bootstrap.servers": broker.bootstrap})
        for i, v in enumerate(values):
            p.produce(topic, value=v, partition=0, timestamp=(1000 + i) * settings_.tick_ms)
        assert p.flush(10) == 0
        _AUDIT.update(log=DeltaLog(broker.bootstrap, topic, idle_timeout_s=5), chain=(chain, beats, values))
    return _AUDIT["chain"]


@pytest.fixture(scope="module")
def bundle(settings, peer_keys):
    chain, beats, values = _chain(settings, peer_keys)
    ce, beat = chain[1], beats[1]
    return make_bundle(ce, beat.receipts, 2, values[beat.first_offset + 2], False, ())


def _mutated(obj, data):  # type: ignore[no-untyped-def]
    """A copy with one value somewhere inside replaced by anything JSON can hold."""
    out = copy.deepcopy(obj)
    node = out
    for _ in range(data.draw(st.integers(1, 3))):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            if not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
                node[key] = data.draw(json_values)
                return out
            node = node[key]
        elif isinstance(node, list) and node:
            i = data.draw(st.integers(0, len(node) - 1))
            if not isinstance(node[i], (dict, list)) or data.draw(st.booleans()):
                node[i] = data.draw(json_values)
                return out
            node = node[i]
        else:
            break
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_verify_proof_reports_hostile_bundles_and_never_raises(bundle, settings, data):
    assert verify_bundle(bundle, settings).ok
    changed = _mutated(bundle, data) if data.draw(st.booleans()) else data.draw(json_values)
    check = verify_bundle(changed, settings)
    assert check.ok in (True, False) and (check.ok or check.failed_step)


@FUZZ
@given(data=st.data())
def test_chain_import_refuses_hostile_lines_and_never_raises_anything_else(fresh_store, settings, peer_keys, data):
    import io

    chain, _, _ = _chain(settings, peer_keys)
    buf = io.StringIO()
    export_chain(fresh_store(chain), buf, [0])
    lines = buf.getvalue().splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    kind = data.draw(st.sampled_from(["json", "text", "bytes"]))
    if kind == "json":
        lines[i] = json.dumps(_mutated(json.loads(lines[i]), data))
    elif kind == "text":
        lines[i] = data.draw(st.text(max_size=200))
    else:
        lines[i] = data.draw(st.binary(max_size=200)).decode("utf-8", "surrogateescape")
    target = fresh_store([])
    try:
        import_chain(target, settings, lines, dry_run=data.draw(st.booleans()))
    except ChainImportError as e:
        assert str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_roots_reader_check_reports_hostile_records_and_never_raises(settings, peer_keys, data):
    chain, _, _ = _chain(settings, peer_keys)
    ce = chain[data.draw(st.integers(0, len(chain) - 1))]
    value = encode_root(ce)
    how = data.draw(st.sampled_from(["flip", "cut", "random", "splice"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(value) - 1))
        value = value[:i] + bytes([value[i] ^ data.draw(st.integers(1, 255))]) + value[i + 1 :]
    elif how == "cut":
        value = value[: data.draw(st.integers(0, len(value)))]
    elif how == "random":
        value = data.draw(st.binary(max_size=400))
    else:
        value = value[:10] + data.draw(st.binary(max_size=300))
    key = record_key("knhk", 0, ce.entry.cycle).encode()
    for check_key in (True, False):
        try:
            got = check_root(settings, Record(0, 7, 0, None, value, key), check_key=check_key)
        except InvalidRoot as e:
            assert e.kind in ("bad_record", "wrong_chain", "wrong_shard", "wrong_key", "bad_quorum")
        else:
            assert got.entry_hash == got.entry.entry_hash


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(obj=json_values)
def test_evidence_and_pin_files_that_are_not_ours_are_findings(settings, tmp_path_factory, obj):
    assert evidence_problem(settings, obj) is not None  # random JSON is never evidence against anyone
    path = tmp_path_factory.mktemp("pins") / "pins.json"
    path.write_text(json.dumps(obj))
    try:
        load_pins(path, "knhk", "knhk")
    except PinFileError as e:
        assert "pin file" in str(e)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["next_offset", "entry_hash", "cycle", "votes_offset", "updated_ms",
                                                "signature"]), hostile, max_size=6))  # fmt: skip
def test_hostile_checkpoints_cannot_be_read_and_say_so(fresh_store, fields):
    store = fresh_store([])
    if fields:
        raw = {k: v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for k, v in fields.items()}
        store.client.hset(store.keys(0).checkpoint("peer-a"), mapping=raw)  # Redis holds bytes
    try:
        load_checkpoint(store, "peer-a", 0)
    except ValueError as e:
        assert "checkpoint of peer 'peer-a'" in str(e)


def test_json_nested_past_the_recursion_limit_is_a_finding_in_every_file_reader(fresh_store, settings, tmp_path):
    with pytest.raises(ChainImportError, match="nested too deeply"):
        import_chain(fresh_store([]), settings, [DEEP], dry_run=False)
    pins = tmp_path / "pins.json"
    pins.write_text(DEEP)
    with pytest.raises(PinFileError, match="nested too deeply"):
        load_pins(pins, "knhk", "knhk")
    with pytest.raises(DeltaInputError, match="nested too deeply"):
        delta_from_json(DEEP)
    bundle_file, settings_file = tmp_path / "bundle.json", tmp_path / "chain.toml"
    bundle_file.write_text(DEEP)
    settings_file.write_text(settings.to_toml())
    result = CliRunner().invoke(main, ["verify-proof", str(bundle_file), "--settings", str(settings_file)])
    assert result.exit_code == 1 and "nested too deeply" in result.output, result.output

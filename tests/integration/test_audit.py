"""Auditors: proof bundles, replay audits, chain export/import, on one real 4-peer run (Tansu + Redis)."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import math
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from knhk_stream.audit.core import (
    AuditError,
    ChainImportError,
    DeltaLog,
    ProofUnavailable,
    RecordsGone,
    audit_shard,
    build_bundle,
    export_chain,
    import_chain,
    locate_offset,
    rebuild_beat,
    replay_beats,
)
from knhk_stream.cli.main import main
from knhk_stream.kafka.embedded import EmbeddedBroker, create_topics
from knhk_stream.protocol import merkle
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry, entry_for_beat
from knhk_stream.protocol.proof import STEPS, verify_bundle
from knhk_stream.protocol.quorum import Vote, load_private_key, sign
from knhk_stream.protocol.receipts import REJECTED, DeltaProcessor, Receipt
from knhk_stream.store.lockchain import LockchainStore, root_key, verify_range
from tests.support.cluster import SHARDS, Cluster

pytestmark = pytest.mark.integration

DELTAS = 3000
PROOF_SHARD = 1  # a shard of the main load: beats of hundreds of deltas
SINGLE_SHARD = DELTAS % SHARDS  # where the lone delta after the load goes


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, broker, redis_url) -> Iterator[Cluster]:
    """One run shared by the module: 4 peers, 3000 deltas (some malformed), then one delta alone in its beat."""
    c = Cluster(tmp_path_factory.mktemp("audit"), broker.bootstrap, redis_url)
    try:
        c.start_all()
        c.produce(DELTAS, malformed_every=37, rate=1000)  # 3 s: at least 3 beats (1 s each) per shard
        c.wait_all_committed()
        # Every beat of the load is closed (by a marker), so this delta's beat holds only it.
        c.produce(1)
        c.wait_all_committed()
        c.stop_all()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def log(cluster) -> DeltaLog:
    return DeltaLog(cluster.bootstrap, cluster.topics.deltas.name)


@pytest.fixture()
def fresh(redis_url) -> Iterator[Callable[[], LockchainStore]]:
    """Stores under new, empty prefixes; their keys are removed afterwards."""
    made: list[str] = []

    def make() -> LockchainStore:
        made.append(f"knhktest-audit-{uuid.uuid4().hex[:10]}")
        return LockchainStore.from_url(redis_url, "knhk", made[-1])

    yield make
    client = redis.Redis.from_url(redis_url)
    for prefix in made:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _redis_args(cluster: Cluster, prefix: str | None = None) -> list[str]:
    return ["--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
            "--prefix", prefix or cluster.prefix]  # fmt: skip


def _kafka_args(cluster: Cluster, prefix: str | None = None) -> list[str]:
    return [*_redis_args(cluster, prefix), "--bootstrap", cluster.bootstrap, "--topic-prefix", cluster.topic_prefix]


# -- bundles --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(cluster, log) -> dict[str, dict[str, Any]]:
    """Bundles for the first, a middle and the last delta of a beat, a rejected delta, and a beat of one."""
    store, settings = cluster.store, cluster.settings
    big = max(store.range(PROOF_SHARD), key=lambda ce: ce.entry.receipt_count)
    beat, _ = rebuild_beat(log, settings, big.entry)
    offsets = [Receipt.from_bytes(r).offset for r in beat.receipts]
    assert len(offsets) >= 3
    rejected = next(Receipt.from_bytes(r).offset for r in beat.receipts if r[22] == REJECTED)
    single = store.range(SINGLE_SHARD)[-1]
    assert single.entry.receipt_count == 1, "the lone delta should be alone in its beat"
    single_beat, _ = rebuild_beat(log, settings, single.entry)
    lone = Receipt.from_bytes(single_beat.receipts[0]).offset

    def prove(shard: int, offset: int, hash_only: bool = False) -> dict[str, Any]:
        return build_bundle(store, settings, log, shard, offset, hash_only)

    return {
        "first": prove(PROOF_SHARD, offsets[0]),
        "middle": prove(PROOF_SHARD, offsets[len(offsets) // 2]),
        "last": prove(PROOF_SHARD, offsets[-1]),
        "rejected": prove(PROOF_SHARD, rejected),
        "single": prove(SINGLE_SHARD, lone),
        "hash_only": prove(PROOF_SHARD, offsets[1], hash_only=True),
    }


KINDS = ["first", "middle", "last", "rejected", "single", "hash_only"]


@pytest.mark.parametrize("kind", KINDS)
def test_bundle_verifies_every_step(cluster, bundles, kind):
    b = bundles[kind]
    check = verify_bundle(b, cluster.settings)
    assert check.ok, check.message
    assert [s.name for s in check.steps] == list(STEPS) and all(s.ok for s in check.steps)
    assert b["entry"]["first_offset"] <= b["offset"] <= b["entry"]["last_offset"]
    if kind == "first":
        assert b["leaf_index"] == 0
    if kind == "last":
        assert b["leaf_index"] == b["tree_size"] - 1
    if kind == "single":
        assert b["tree_size"] == 1 and b["audit_path"] == []
    if kind == "rejected":
        assert bytes.fromhex(b["receipt"])[22] == REJECTED
        assert "rejected (malformed)" in check.steps[2].message
    assert ("value" in b) == (kind != "hash_only")


def test_bundle_is_self_contained_json(cluster, bundles, tmp_path):
    """Written and read back as a file, with settings only: what an auditor gets."""
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(bundles["middle"]))
    result = _cli("verify-proof", str(path), "--settings", str(cluster.workdir / "chain.toml"))
    assert result.exit_code == 0, result.output
    for step in STEPS:
        assert f"{step:<11} OK" in result.stdout
    assert "proof OK" in result.stdout


def _hex_flips(h: str) -> Iterator[tuple[str, str]]:
    raw = bytes.fromhex(h)
    for i in range(len(raw)):
        b = bytearray(raw)
        b[i] ^= 1
        yield f"byte {i}", b.hex()


def _int_flips(v: int, width: int) -> Iterator[tuple[str, int]]:
    for k in range(width):
        yield f"byte {width - 1 - k}", v ^ (1 << (8 * k))


def _str_flips(s: str) -> Iterator[tuple[str, str]]:
    raw = s.encode("utf-8")
    for i in range(len(raw)):
        b = bytearray(raw)
        b[i] ^= 1
        yield f"byte {i}", b.decode("utf-8")


def _b64_flips(s: str) -> Iterator[tuple[str, str]]:
    raw = base64.b64decode(s)
    for i in range(len(raw)):
        b = bytearray(raw)
        b[i] ^= 1
        yield f"byte {i}", base64.b64encode(bytes(b)).decode()


INT_WIDTH = {"shard": 4, "version": 1, "epoch": 4}
ENTRY_FIELDS = ["chain_id", "shard", "cycle", "root", "receipt_count", "first_offset", "last_offset", "prev_entry_hash"]
FIELDS = [
    "protocol", "version", "chain_id", "shard", "cycle", "offset", "value", "delta_hash", "receipt", "leaf_index",
    "tree_size", "audit_path", "root", *(f"entry.{f}" for f in ENTRY_FIELDS), "entry_hash", "votes.signature",
    "votes.peer_id", "committed_by", "epoch",
]  # fmt: skip


def _mutations(b: dict[str, Any], name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every one-byte change of field `name`, as (description, changed bundle)."""

    def put(path: list[Any], value: Any) -> dict[str, Any]:
        out = copy.deepcopy(b)
        node = out
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return out

    def flips(path: list[Any], v: Any, key: str) -> Iterator[tuple[str, Any]]:
        if isinstance(v, int):
            return _int_flips(v, INT_WIDTH.get(key, 8))
        if key == "value":
            return _b64_flips(v)
        try:
            bytes.fromhex(v)
            return _hex_flips(v)
        except ValueError:
            return _str_flips(v)

    if name == "value" and "value" not in b:
        return
    if name == "audit_path":
        if not b["audit_path"]:  # a beat of one: no path, so an extra hash must fail
            yield "extra hash", put(["audit_path"], [H(b"extra").hex()])
        for i, h in enumerate(b["audit_path"]):
            for what, new in _hex_flips(h):
                yield f"audit_path[{i}] {what}", put(["audit_path", i], new)
        return
    if name.startswith("votes."):
        key = name.split(".")[1]
        for i, v in enumerate(b["votes"]):
            for what, new in flips([], v[key], key):
                yield f"votes[{i}].{key} {what}", put(["votes", i, key], new)
        return
    path = name.split(".")
    value: Any = b
    for k in path:
        value = value[k]
    for what, new in flips(path, value, path[-1]):
        yield f"{name} {what}", put(path, new)


def _expected_step(b: dict[str, Any], name: str, what: str, changed: dict[str, Any], peers: set[str]) -> str | None:
    """The step that must catch a one-byte change of `name` (see the proof module's step order).

    None: the change cannot be caught. Only committed_by is like that: it is
    informational (protocol v2), the votes sign the entry hash, not who appended it.
    """
    if name == "committed_by":
        return None
    if name in ("protocol", "version", "chain_id"):
        return "bundle"
    if name in ("value", "delta_hash"):
        return "delta_hash" if "value" in b else "receipt"
    if name == "receipt":
        byte = int(what.rsplit(" ", 1)[1])
        # The tick (byte 13) cannot be recomputed, nor, without the value, status, lanes and a_hash (22..26,
        # 91..122): only the path to the signed root shows those changed.
        unchecked = {13} | (set() if "value" in b else {*range(22, 27), *range(91, 123)})
        return "audit_path" if byte in unchecked else "receipt"
    if name in ("shard", "cycle", "offset"):
        return "receipt"
    if name == "tree_size":  # a size whose tree shape fits the same path passes the path, not the entry
        try:
            got = merkle.root_from_proof(bytes.fromhex(b["receipt"]), b["leaf_index"], changed["tree_size"],
                                         [bytes.fromhex(p) for p in b["audit_path"]])  # fmt: skip
        except ValueError:
            return "audit_path"
        return "root" if got.hex() == b["root"] else "audit_path"
    if name in ("leaf_index", "audit_path", "root"):
        return "audit_path"
    if name in ("entry.root", "entry.receipt_count"):
        return "root"
    if name.startswith("entry"):
        return "entry_hash"
    return "quorum"  # votes and the epoch


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("kind", KINDS)
def test_any_flipped_byte_fails_at_the_right_step(cluster, bundles, kind, name):
    b = bundles[kind]
    wrong: list[str] = []
    n = 0
    for what, changed in _mutations(b, name):
        n += 1
        check = verify_bundle(changed, cluster.settings)
        want = _expected_step(b, name, what, changed, set(cluster.settings.public_keys))
        if check.failed_step != want:
            wrong.append(f"{what}: expected step {want}, got {check.failed_step} ({check.message})")
    if name == "value" and kind == "hash_only":
        assert n == 0
        return
    assert n > 0
    assert not wrong, "\n".join(wrong[:10])


def test_failed_step_says_what_was_wrong(cluster, bundles):
    b = copy.deepcopy(bundles["middle"])
    b["votes"] = b["votes"][:2]
    check = verify_bundle(b, cluster.settings)
    assert check.failed_step == "quorum" and "2 valid votes, the threshold of epoch 0 is 3" in check.message
    assert verify_bundle([], cluster.settings).failed_step == "bundle"  # type: ignore[arg-type]
    del b["receipt"]
    check = verify_bundle(b, cluster.settings)
    assert check.failed_step == "bundle" and "'receipt'" in check.message


def test_verify_bundle_imports_no_kafka_or_redis():
    code = "import sys, knhk_stream.proof; print(sorted({'redis', 'confluent_kafka'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_beat_is_found_by_binary_search(cluster):
    store = cluster.store
    entries = store.range(PROOF_SHARD)
    for ce in entries:
        for offset in (ce.entry.first_offset, ce.entry.last_offset):
            loc = locate_offset(store, PROOF_SHARD, offset)
            assert loc.entry is not None and loc.entry.entry_hash == ce.entry_hash
            assert loc.fetched <= math.ceil(math.log2(len(entries) + 1)) + 2


def test_prove_and_verify_proof_cli(cluster, bundles, tmp_path):
    out = tmp_path / "p.json"
    offset = bundles["last"]["offset"]
    made = _cli("prove", *_kafka_args(cluster), "--shard", str(PROOF_SHARD), "--offset", str(offset), "--out", str(out))
    assert made.exit_code == 0, made.output
    assert json.loads(out.read_text()) == bundles["last"]
    settings = ["--settings", str(cluster.workdir / "chain.toml")]
    assert _cli("verify-proof", str(out), *settings).exit_code == 0
    b = json.loads(out.read_text())
    b["receipt"] = b["receipt"][:-2] + ("00" if b["receipt"][-2:] != "00" else "01")
    out.write_text(json.dumps(b))
    bad = _cli("verify-proof", str(out), *settings)
    assert bad.exit_code == 1
    assert "receipt     FAILED" in bad.stdout and "proof FAILED at step receipt" in bad.stdout
    as_json = json.loads(_cli("verify-proof", str(out), *settings, "--json").stdout)
    assert as_json["failed_step"] == "receipt" and not as_json["ok"]


def test_prove_says_when_there_is_nothing_to_prove(cluster, log):
    store = cluster.store
    head = store.range(SINGLE_SHARD)[-1].entry
    beyond = _cli("prove", *_kafka_args(cluster), "--shard", str(SINGLE_SHARD), "--offset", str(head.last_offset + 1))
    assert beyond.exit_code == 75 and "not committed yet" in beyond.output, beyond.output
    first = store.range(SINGLE_SHARD)[0].entry
    markers = [r.offset for r in log.read(SINGLE_SHARD, first.first_offset, head.last_offset)
               if r.marker and r.offset <= head.last_offset]  # fmt: skip
    assert markers, "peers write markers into idle shards; one closed the load's last beat"
    for offset in {markers[0], markers[-1]}:
        with pytest.raises(ProofUnavailable, match="tick marker"):
            build_bundle(store, cluster.settings, log, SINGLE_SHARD, offset)
    cli = _cli("prove", *_kafka_args(cluster), "--shard", str(SINGLE_SHARD), "--offset", str(markers[0]))
    assert cli.exit_code == 1 and "tick marker" in cli.output


# -- audits ---------------------------------------------------------------------------------


def test_audit_of_four_peer_run_passes(cluster, log):
    total = 0
    for shard in range(SHARDS):
        ticks: list[int] = []
        report = audit_shard(cluster.store, cluster.settings, log, shard, progress=ticks.append)
        assert report.ok, report.problems()
        assert report.entries == report.replayed == sum(ticks) > 0
        entries = cluster.store.range(shard)
        # One sequential read: every record from the first entry's first_offset once, plus the one closing the last.
        assert report.records <= entries[-1].entry.last_offset - entries[0].entry.first_offset + 2
        total += report.receipts
    assert total == DELTAS + 1


def test_audit_cli_table_and_range(cluster):
    result = _cli("audit", *_kafka_args(cluster), "--all-shards")
    assert result.exit_code == 0, result.output
    assert "audit OK" in result.stdout and result.stdout.count(" OK ") >= SHARDS
    cycles = [ce.entry.cycle for ce in cluster.store.range(PROOF_SHARD)]
    one = _cli("audit", *_kafka_args(cluster), "--shard", str(PROOF_SHARD), "--from", str(cycles[-1]),
               "--to", str(cycles[-1]), "--json")  # fmt: skip
    assert one.exit_code == 0, one.output
    report = json.loads(one.stdout)
    assert report["status"] == "OK" and report["entries"] == report["replayed"] == 1


def _copy_chain(cluster: Cluster, target: LockchainStore) -> list[str]:
    out = io.StringIO()
    export_chain(cluster.store, out)
    lines = out.getvalue().splitlines()
    import_chain(target, cluster.settings, lines)
    return lines


def _attack(store: LockchainStore, shard: int, cycle: int) -> None:
    """Change one byte of one root and re-hash the chain after it, as someone without the peers' keys can."""
    prev: bytes | None = None
    for ce in store.range(shard):
        e = ce.entry
        if e.cycle < cycle:
            prev = ce.entry_hash
            continue
        if e.cycle == cycle:
            root = bytearray(e.root)
            root[5] ^= 0x01
            e = dataclasses.replace(e, root=bytes(root))
        else:
            e = dataclasses.replace(e, prev_entry_hash=prev)
        prev = e.entry_hash
        store.client.hset(root_key(store.prefix, store.chain_id, shard, e.cycle),
                          mapping={"root": e.root.hex(), "prev_entry_hash": e.prev_entry_hash.hex(),
                                   "entry_hash": prev.hex()})  # fmt: skip
    store.client.hset(f"{store.key(shard)}:head", "entry_hash", prev.hex())


def test_rehashed_root_is_caught_by_verify_and_audit_naming_the_entry(cluster, log, fresh):
    store = fresh()
    _copy_chain(cluster, store)
    cycles = [ce.entry.cycle for ce in store.range(PROOF_SHARD)]
    assert len(cycles) >= 2
    target = cycles[len(cycles) // 2]
    _attack(store, PROOF_SHARD, target)
    verify = verify_range(store, cluster.settings, PROOF_SHARD)
    assert not verify.ok and verify.problems[0].cycle == target and "votes" in verify.problems[0].fields
    report = audit_shard(store, cluster.settings, log, PROOF_SHARD)
    assert report.status == "FAILED"
    d = report.difference
    assert d is not None and d.cycle == target and d.field == "root"
    assert d.expected != d.found and d.found == cluster.store.get(PROOF_SHARD, target).entry.root.hex()
    result = _cli("audit", *_kafka_args(cluster, store.prefix), "--shard", str(PROOF_SHARD))
    assert result.exit_code == 1
    assert f"replay differs at cycle {target}, offset " in result.stdout and f"cycle {target} [votes]" in result.stdout
    # A proof from the altered chain is refused too: the rebuilt root is not the stored one.
    offset = store.get(PROOF_SHARD, target).entry.first_offset
    with pytest.raises(AuditError, match=f"cycle {target}"):
        build_bundle(store, cluster.settings, log, PROOF_SHARD, offset)


def test_audit_says_when_kafka_no_longer_holds_the_records(broker, redis_url, redis_prefix, settings, peer_keys):
    """Offset 3 is a transaction marker, so Kafka returns 4 first: what a truncated log looks like to a reader."""
    from confluent_kafka import Producer

    from knhk_stream.protocol.decode import Delta, Triple, encode_json

    topic = f"gone-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap, {topic: (1, {})})
    p = Producer({"bootstrap.servers": broker.bootstrap, "transactional.id": f"tx-{topic}"})
    p.init_transactions(10)
    for batch in range(3):
        p.begin_transaction()
        for i in range(3):
            delta = Delta((Triple(f"urn:s{batch}{i}", "urn:p", "o"),), ())
            p.produce(topic, value=encode_json(delta), partition=0)
        p.commit_transaction(10)
    log = DeltaLog(broker.bootstrap, topic)
    processor = DeltaProcessor(settings.load_hook(), settings.max_triples)
    beats = list(replay_beats(log.read(0, 8, 10**9), 0, settings.tick_ms, processor))
    gone = Entry("knhk", 0, beats[0].cycle - 1, H(b"gone"), 3, 3, 7, ZERO_HASH)
    chain = [gone]
    for beat in beats:
        chain.append(entry_for_beat("knhk", beat, chain[-1].entry_hash))
    store = LockchainStore.from_url(redis_url, "knhk", redis_prefix)
    for e in chain:
        votes = [
            Vote(e, pid, sign(peer_keys[pid], settings.genesis.epoch_hash, e.entry_hash))
            for pid in ("peer-a", "peer-b", "peer-c")
        ]
        store.append(CommittedEntry.from_quorum(e, votes, "peer-a", 1))

    # The chain starts at offset 3 (its start_offset): offsets 0..2 are before it, not input it skipped.
    report = audit_shard(store, dataclasses.replace(settings, start_offsets={0: 3}), log, 0)
    assert report.status == "INCOMPLETE", report.problems()
    assert report.gone is not None and report.gone.entries == 1 and report.gone.first_available == 4
    assert report.replayed == len(beats) and "no longer holds" in str(report.gone)
    with pytest.raises(RecordsGone, match="no longer holds offset 3"):
        build_bundle(store, settings, log, 0, 5)
    assert verify_bundle(build_bundle(store, settings, log, 0, 9), settings).ok


# -- export / import ------------------------------------------------------------------------


def _stored(store: LockchainStore) -> dict[str, Any]:
    """Everything the chain keeps in Redis, as stored, keyed without the prefix."""
    out: dict[str, Any] = {}
    for shard in range(SHARDS):
        k = store.key(shard)
        out[f"{shard}:cycles"] = store.client.zrange(f"{k}:cycles", 0, -1, withscores=True)
        out[f"{shard}:head"] = store.client.hgetall(f"{k}:head")
        for c in store.cycles(shard):
            out[f"{shard}:root:{c}"] = store.client.hgetall(f"{k}:root:{c:020d}")
    return out


def test_export_then_import_reproduces_the_chain_byte_for_byte(cluster, fresh, tmp_path):
    path = tmp_path / "chain.jsonl"
    exported = _cli("chain", "export", *_redis_args(cluster), "--out", str(path))
    assert exported.exit_code == 0, exported.output
    lines = path.read_text().splitlines()
    assert len(lines) == sum(len(cluster.store.range(s)) for s in range(SHARDS))
    store = fresh()
    imported = _cli("chain", "import", str(path), *_redis_args(cluster, store.prefix))
    assert imported.exit_code == 0, imported.output
    assert f"{len(lines)} entries appended" in imported.stdout
    assert _stored(store) == _stored(cluster.store)
    again = import_chain(store, cluster.settings, lines)
    assert again.total_appended == 0 and sum(again.skipped.values()) == len(lines)
    for shard in range(SHARDS):
        assert verify_range(store, cluster.settings, shard).ok


def _shard_lines(cluster: Cluster, shard: int) -> list[str]:
    out = io.StringIO()
    export_chain(cluster.store, out, [shard])
    return out.getvalue().splitlines()


def _flip_field(line: str, key: str) -> str:
    obj = json.loads(line)
    if key == "signature":
        sig = bytearray(bytes.fromhex(obj["votes"][1]["signature"]))
        sig[10] ^= 1
        obj["votes"][1]["signature"] = sig.hex()
    elif isinstance(obj[key], int):
        obj[key] ^= 1
    else:
        raw = bytearray(bytes.fromhex(obj[key]))
        raw[0] ^= 1
        obj[key] = raw.hex()
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("root", "was changed"),
        ("receipt_count", "was changed"),
        ("last_offset", "was changed"),
        ("prev_entry_hash", "was changed"),
        ("entry_hash", "bad signature"),
        ("signature", "signature"),
    ],
)
def test_import_refuses_a_tampered_line_and_writes_nothing(cluster, fresh, field, message):
    lines = [line for s in range(SHARDS) for line in _shard_lines(cluster, s)]
    target = len(lines) - 2
    lines[target] = _flip_field(lines[target], field)
    store = fresh()
    with pytest.raises(ChainImportError, match=message) as err:
        import_chain(store, cluster.settings, lines)
    assert err.value.line == target + 1 and str(err.value).startswith(f"line {target + 1}: ")
    assert list(store.client.scan_iter(match=f"{store.prefix}:*")) == []


def test_import_refuses_holes_forks_and_foreign_chains(cluster, fresh, tmp_path):
    lines = _shard_lines(cluster, PROOF_SHARD)
    assert len(lines) >= 3
    store = fresh()
    with pytest.raises(ChainImportError, match="link to genesis") as err:
        import_chain(store, cluster.settings, lines[1:])
    assert err.value.line == 1
    with pytest.raises(ChainImportError, match="line before") as err:
        import_chain(store, cluster.settings, [lines[0], *lines[2:]])
    assert err.value.line == 2
    foreign = dataclasses.replace(cluster.settings, chain_id="other")
    with pytest.raises(ChainImportError, match="settings are for chain 'other'"):
        import_chain(LockchainStore(store.client, "other", store.prefix), foreign, lines)
    assert list(store.client.scan_iter(match=f"{store.prefix}:*")) == []

    # Appending after an existing head is fine; identical entries are skipped.
    assert import_chain(store, cluster.settings, lines[:1]).appended == {PROOF_SHARD: 1}
    rest = import_chain(store, cluster.settings, lines)
    assert rest.appended == {PROOF_SHARD: len(lines) - 1} and rest.skipped == {PROOF_SHARD: 1}

    # A fork signed by a quorum of real peer keys is still refused: the chain never forks.
    keys = {p.id: load_private_key(cluster.workdir / f"{p.id}.pem") for p in cluster.settings.peers}
    honest = CommittedEntry.from_mapping(json.loads(lines[1]))
    forged = dataclasses.replace(honest.entry, root=H(b"another history"))
    votes = [
        Vote(forged, pid, sign(keys[pid], cluster.settings.genesis.epoch_hash, forged.entry_hash))
        for pid in ("peer-a", "peer-b", "peer-c")
    ]
    fork_line = json.dumps(CommittedEntry.from_quorum(forged, votes, "peer-a", 1).to_json())
    before = _stored(store)
    path = tmp_path / "fork.jsonl"
    path.write_text("\n".join([lines[0], fork_line]) + "\n")
    result = _cli("chain", "import", str(path), *_redis_args(cluster, store.prefix))
    assert result.exit_code == 1 and "line 2:" in result.output and "fork" in result.output
    assert "nothing was written" in result.output
    assert _stored(store) == before

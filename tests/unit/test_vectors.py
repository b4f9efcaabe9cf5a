"""Reproduce every test vector of tests/vectors/protocol-v1.json, byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from knhk_stream.protocol import merkle
from knhk_stream.protocol.beats import TICKS_PER_BEAT, BeatAssembler
from knhk_stream.protocol.decode import AVRO_FINGERPRINT, Delta, Rejected, decode_delta
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry, entry_for_beat
from knhk_stream.protocol.hooks import canonical, encode_actions, load_hook
from knhk_stream.protocol.quorum import (
    check_quorum,
    check_threshold,
    default_threshold,
    key_from_seed,
    public_key_bytes,
    sign,
    verify_signature,
    vote_message,
)
from knhk_stream.protocol.receipts import RECEIPT_SIZE, DeltaProcessor, Receipt

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "protocol-v1.json").read_text("utf-8"))
HASHES = {"blake3": H, "sha256": merkle.sha256}


def _name_id(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def _hex(v: str | None) -> bytes | None:
    return None if v is None else bytes.fromhex(v)


def test_vector_file_is_protocol_v1():
    assert VECTORS["protocol"] == "knhk-stream/1"


def test_avro_fingerprint():
    assert AVRO_FINGERPRINT.hex() == VECTORS["avro_delta_fingerprint"]
    assert len(AVRO_FINGERPRINT) == 8


# -- Merkle ---------------------------------------------------------------------------------

MERKLE_ROOT_CASES = [
    pytest.param(name, case, id=f"{name}-n{len(case['leaves'])}")
    for name, cases in VECTORS["merkle"].items()
    for case in cases
]
MERKLE_PATH_CASES = [
    pytest.param(name, case, i, id=f"{name}-n{len(case['leaves'])}-i{i}")
    for name, cases in VECTORS["merkle"].items()
    for case in cases
    for i in range(len(case.get("paths", [])))
]


def test_merkle_vectors_cover_both_hashes_and_have_paths():
    assert set(VECTORS["merkle"]) == set(HASHES)
    assert len(MERKLE_PATH_CASES) >= 2 * (5 + 9 + 17)


@pytest.mark.parametrize(("hash_name", "case"), MERKLE_ROOT_CASES)
def test_merkle_root(hash_name, case):
    h = HASHES[hash_name]
    leaves = [bytes.fromhex(x) for x in case["leaves"]]
    assert merkle.root(leaves, h).hex() == case["root"]


@pytest.mark.parametrize(("hash_name", "case", "index"), MERKLE_PATH_CASES)
def test_merkle_inclusion_proof(hash_name, case, index):
    h = HASHES[hash_name]
    leaves = [bytes.fromhex(x) for x in case["leaves"]]
    expected = case["paths"][index]
    proof = merkle.inclusion_proof(leaves, index, h)
    assert [p.hex() for p in proof] == expected
    root = bytes.fromhex(case["root"])
    path = [bytes.fromhex(p) for p in expected]
    assert merkle.verify_inclusion(leaves[index], index, len(leaves), path, root, h)
    assert merkle.root_from_proof(leaves[index], index, len(leaves), path, h) == root
    # The same path does not prove another leaf at that index.
    assert not merkle.verify_inclusion(leaves[index] + b"!", index, len(leaves), path, root, h)


def test_merkle_sha256_empty_is_rfc6962():
    # RFC 6962: MTH({}) = SHA-256() ; leaf hash prefix 0x00.
    assert merkle.root([], merkle.sha256).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


# -- deltas ---------------------------------------------------------------------------------

DELTA_CASES = [pytest.param(c, id=_name_id(c["name"])) for c in VECTORS["deltas"]]
CANONICAL_HOOK = load_hook("canonical@1")


@pytest.mark.parametrize("case", DELTA_CASES)
def test_delta_outcome(case):
    value = _hex(case["value"])
    proc = DeltaProcessor(CANONICAL_HOOK, case["max_triples"])
    out = proc.outcome(value)
    assert out.status == case["status"]
    assert out.lanes == case["lanes"]
    assert out.code == case["code"]
    assert out.a_hash.hex() == case["a_hash"]
    assert out.delta_hash.hex() == case["delta_hash"]


@pytest.mark.parametrize("case", DELTA_CASES)
def test_delta_decode(case):
    decoded = decode_delta(_hex(case["value"]), case["max_triples"])
    if case["code"] is None:
        assert isinstance(decoded, Delta)
    else:
        assert isinstance(decoded, Rejected)
        assert decoded.code == case["code"]
        assert decoded.reason


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=_name_id(c["name"])) for c in VECTORS["deltas"] if "actions" in c]
)
def test_delta_actions(case):
    decoded = decode_delta(_hex(case["value"]), case["max_triples"])
    assert isinstance(decoded, Delta)
    actions = canonical(decoded)
    encoded = encode_actions(actions)
    assert encoded.hex() == case["actions"]
    assert len(actions) == case["lanes"]
    assert H(encoded).hex() == case["a_hash"]


def test_delta_vectors_cover_every_code():
    codes = {c["code"] for c in VECTORS["deltas"]}
    assert codes >= {None, "malformed", "empty", "too_large", "invalid_term"}


# -- receipt --------------------------------------------------------------------------------


def test_receipt_vector():
    r = VECTORS["receipt"]
    hook = load_hook(r["hook"])
    assert hook.hook_id.hex() == r["hook_id"]
    assert H(r["hook"].encode()).hex() == r["hook_id"]
    receipt = DeltaProcessor(hook).receipt(r["shard"], r["cycle"], r["tick"], r["offset"], _hex(r["value"]))
    assert len(receipt) == RECEIPT_SIZE
    assert receipt.hex() == r["receipt"]
    assert merkle.leaf_hash(receipt).hex() == r["leaf_hash"]
    assert merkle.root([receipt]).hex() == r["leaf_hash"]


def test_receipt_vector_parses():
    r = VECTORS["receipt"]
    parsed = Receipt.from_bytes(bytes.fromhex(r["receipt"]))
    assert (parsed.shard, parsed.cycle, parsed.tick, parsed.offset) == (
        r["shard"],
        r["cycle"],
        r["tick"],
        r["offset"],
    )
    assert parsed.hook_id.hex() == r["hook_id"]
    assert parsed.delta_hash == H(bytes.fromhex(r["value"]))
    assert parsed.to_bytes().hex() == r["receipt"]


# -- entries --------------------------------------------------------------------------------

ENTRY_CASES = [pytest.param(e, id=f"{e['chain_id']}-{e['shard']}-{e['cycle']}") for e in VECTORS["entries"]]


def _entry(e: dict) -> Entry:
    return Entry(
        e["chain_id"],
        e["shard"],
        e["cycle"],
        bytes.fromhex(e["root"]),
        e["receipt_count"],
        e["first_offset"],
        e["last_offset"],
        bytes.fromhex(e["prev_entry_hash"]),
    )


@pytest.mark.parametrize("e", ENTRY_CASES)
def test_entry_hash(e):
    entry = _entry(e)
    assert entry.entry_hash.hex() == e["entry_hash"]
    assert Entry.from_fields(entry.to_fields()) == entry
    assert Entry.from_fields(e).entry_hash.hex() == e["entry_hash"]


@pytest.mark.parametrize("e", ENTRY_CASES)
def test_entry_redis_key(e):
    from knhk_stream.store.lockchain import root_key  # the store module owns the Redis layout

    assert root_key("knhk", e["chain_id"], e["shard"], e["cycle"]) == e["redis_key"]


# -- beats ----------------------------------------------------------------------------------

BEATS = VECTORS["beats"]


def _feed_all():
    hook = load_hook(BEATS["hook"])
    asm = BeatAssembler(BEATS["shard"], BEATS["tick_ms"], DeltaProcessor(hook, BEATS["max_triples"]))
    closed = []
    ticks = []
    for r in BEATS["records"]:
        beat = asm.feed(r["offset"], r["ts"], r["marker"], _hex(r["value"]))
        ticks.append((asm.last_tick, asm.open_cycle))
        if beat is not None:
            closed.append(beat)
    return asm, closed, ticks


@pytest.mark.parametrize(
    "index", [pytest.param(i, id=f"offset{r['offset']}") for i, r in enumerate(BEATS["records"])]
)
def test_beat_record_cycle_and_tick(index):
    _, _, ticks = _feed_all()
    r = BEATS["records"][index]
    last_tick, open_cycle = ticks[index]
    assert divmod(last_tick, TICKS_PER_BEAT) == (r["cycle"], r["tick"])
    assert open_cycle == r["cycle"]


def test_beat_count_and_open_beat():
    asm, closed, _ = _feed_all()
    assert len(closed) == len(BEATS["closed_beats"])
    last = BEATS["records"][-1]
    assert asm.open_cycle == last["cycle"]
    assert asm.open_first_offset == last["offset"]


@pytest.mark.parametrize(
    "index", [pytest.param(i, id=f"cycle{b['cycle']}") for i, b in enumerate(BEATS["closed_beats"])]
)
def test_closed_beat(index):
    _, closed, _ = _feed_all()
    expected = BEATS["closed_beats"][index]
    beat = closed[index]
    assert beat.shard == expected["shard"]
    assert beat.cycle == expected["cycle"]
    assert beat.receipt_count == expected["receipt_count"]
    assert beat.first_offset == expected["first_offset"]
    assert beat.last_offset == expected["last_offset"]
    assert [r.hex() for r in beat.receipts] == expected["receipts"]
    assert beat.root().hex() == expected["root"]
    prev = bytes.fromhex(expected["prev_entry_hash"])
    if index == 0:
        assert prev == ZERO_HASH
    else:
        assert expected["prev_entry_hash"] == BEATS["closed_beats"][index - 1]["entry_hash"]
    entry = entry_for_beat(BEATS["chain_id"], beat, prev)
    assert entry.prev_entry_hash == prev
    assert entry.entry_hash.hex() == expected["entry_hash"]


def test_beat_receipts_carry_record_cycle_and_tick():
    _, closed, _ = _feed_all()
    by_offset = {r["offset"]: r for r in BEATS["records"]}
    for beat in closed:
        for receipt in beat.receipts:
            parsed = Receipt.from_bytes(receipt)
            r = by_offset[parsed.offset]
            assert not r["marker"]
            assert (parsed.shard, parsed.cycle, parsed.tick) == (BEATS["shard"], r["cycle"], r["tick"])
            assert parsed.delta_hash == H(_hex(r["value"]) or b"")


# -- votes ----------------------------------------------------------------------------------

VOTES = VECTORS["votes"]
PEERS = {p["id"]: bytes.fromhex(p["public_key"]) for p in VOTES["peers"]}
ENTRY_HASH = bytes.fromhex(VOTES["entry_hash"])


def test_votes_entry_hash_is_the_first_entry():
    assert VOTES["entry_hash"] == VECTORS["entries"][0]["entry_hash"]


def test_signed_message():
    assert vote_message(ENTRY_HASH).hex() == VOTES["signed_message"]
    assert vote_message(ENTRY_HASH) == b"knhk-vote/1" + ENTRY_HASH


@pytest.mark.parametrize("peer", [pytest.param(p, id=p["id"]) for p in VOTES["peers"]])
def test_public_key_from_seed(peer):
    key = key_from_seed(bytes.fromhex(peer["seed"]))
    assert public_key_bytes(key).hex() == peer["public_key"]
    assert public_key_bytes(key.public_key()).hex() == peer["public_key"]


@pytest.mark.parametrize("peer", [pytest.param(p, id=p["id"]) for p in VOTES["peers"]])
def test_deterministic_signature(peer):
    key = key_from_seed(bytes.fromhex(peer["seed"]))
    expected = VOTES["signatures"][peer["id"]]
    assert sign(key, ENTRY_HASH).hex() == expected
    assert verify_signature(PEERS[peer["id"]], ENTRY_HASH, bytes.fromhex(expected))
    assert not verify_signature(PEERS[peer["id"]], H(b"another entry"), bytes.fromhex(expected))


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=_name_id(c["name"])) for c in VOTES["quorum_cases"]]
)
def test_quorum_case(case):
    assert VOTES["threshold"] == 3
    votes = [(v["peer_id"], bytes.fromhex(v["signature"])) for v in case["votes"]]
    result = check_quorum(ENTRY_HASH, votes, PEERS, VOTES["threshold"])
    assert result.valid is case["valid"]
    if case["valid"]:
        assert len(result.signers) >= VOTES["threshold"]
    else:
        assert len(result.signers) < VOTES["threshold"]
        assert result.problems
    assert len(set(result.signers)) == len(result.signers)


@pytest.mark.parametrize(
    ("n", "t"), [pytest.param(int(n), t, id=f"n{n}") for n, t in VOTES["default_thresholds"].items()]
)
def test_default_threshold(n, t):
    assert default_threshold(n) == t
    check_threshold(t, n)  # the default is always a valid threshold

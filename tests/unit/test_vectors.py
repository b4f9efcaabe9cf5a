"""Reproduce the test vectors of tests/vectors/protocol-v1.json that protocol version 2 did not change.

Version 2 (tests/vectors/protocol-v2.json) keeps the hash, the Avro fingerprint, the Merkle
roots and paths, every version 1 delta case, the receipt, the entries and the beats byte for
byte (test_v2_keeps_these_v1_sections checks that), so those are reproduced here from the
version 1 file. The version 1 vote vectors (signatures over "knhk-vote/1" || entry_hash) are
replaced in version 2 by votes bound to an epoch; tests/unit/test_vectors_epochs.py reproduces
the v2 "epochs", "votes" and "public_keys" sections, and only a check that the old signatures
count for nothing is left here.
"""

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
from knhk_stream.protocol.epochs import Peer, genesis_epoch
from knhk_stream.protocol.hooks import canonical, encode_actions, load_hook
from knhk_stream.protocol.keys import key_from_seed, public_key_bytes, verify_signature
from knhk_stream.protocol.quorum import check_quorum, sign, verify_vote, vote_message
from knhk_stream.protocol.receipts import RECEIPT_SIZE, DeltaProcessor, Receipt

VECTOR_DIR = Path(__file__).parents[1] / "vectors"
VECTORS = json.loads((VECTOR_DIR / "protocol-v1.json").read_text("utf-8"))
V2 = json.loads((VECTOR_DIR / "protocol-v2.json").read_text("utf-8"))
HASHES = {"blake3": H, "sha256": merkle.sha256}


def _name_id(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def _hex(v: str | None) -> bytes | None:
    return None if v is None else bytes.fromhex(v)


def test_vector_file_is_protocol_v1():
    assert VECTORS["protocol"] == "knhk-stream/1"
    assert V2["protocol"] == "knhk-stream/2"


@pytest.mark.parametrize("section", ["hash", "avro_delta_fingerprint", "merkle", "receipt", "entries", "beats"])
def test_v2_keeps_these_v1_sections(section):
    assert V2[section] == VECTORS[section]


def test_v2_keeps_every_v1_delta_case():
    v2 = {c["name"]: c for c in V2["deltas"]}
    for case in VECTORS["deltas"]:
        assert v2.get(case["name"]) == case, case["name"]


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
    assert merkle.root([], merkle.sha256).hex() == ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


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


@pytest.mark.parametrize("case", [pytest.param(c, id=_name_id(c["name"])) for c in VECTORS["deltas"] if "actions" in c])
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


@pytest.mark.parametrize("index", [pytest.param(i, id=f"offset{r['offset']}") for i, r in enumerate(BEATS["records"])])
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


# -- votes ---------------------------------------------------------------------------------
# Version 2 replaced the vote section: votes sign "knhk-vote/2" || epoch_hash || entry_hash
# (tests/unit/test_vectors_epochs.py reproduces it). The version 1 signatures are kept only to
# show that they are still real Ed25519 signatures over "knhk-vote/1" || entry_hash, and that
# they count for nothing as version 2 votes.

V1_VOTES = VECTORS["votes"]
V1_PEERS = {p["id"]: bytes.fromhex(p["public_key"]) for p in V1_VOTES["peers"]}
ENTRY_HASH = bytes.fromhex(V1_VOTES["entry_hash"])
EPOCH0 = genesis_epoch(
    "knhk",
    125,
    V1_VOTES["threshold"],
    "canonical@1",
    1024,
    [Peer(pid, pub) for pid, pub in V1_PEERS.items()],
)


def test_v1_votes_entry_hash_is_the_first_entry():
    assert V1_VOTES["entry_hash"] == VECTORS["entries"][0]["entry_hash"]


def test_v1_vote_message_is_not_the_v2_one():
    assert bytes.fromhex(V1_VOTES["signed_message"]) == b"knhk-vote/1" + ENTRY_HASH
    assert vote_message(EPOCH0.epoch_hash, ENTRY_HASH) != bytes.fromhex(V1_VOTES["signed_message"])
    assert vote_message(EPOCH0.epoch_hash, ENTRY_HASH).startswith(b"knhk-vote/2")


@pytest.mark.parametrize("peer", [pytest.param(p, id=p["id"]) for p in V1_VOTES["peers"]])
def test_v1_vote_signatures_count_for_nothing_in_v2(peer):
    pub = V1_PEERS[peer["id"]]
    old = bytes.fromhex(V1_VOTES["signatures"][peer["id"]])
    # Still a real signature over the version 1 message ...
    assert verify_signature(pub, bytes.fromhex(V1_VOTES["signed_message"]), old)
    # ... but no version 2 vote, and the version 2 vote of the same key is another signature.
    assert not verify_vote(pub, EPOCH0.epoch_hash, ENTRY_HASH, old)
    key = key_from_seed(bytes.fromhex(peer["seed"]))
    assert public_key_bytes(key) == pub
    assert sign(key, EPOCH0.epoch_hash, ENTRY_HASH) != old
    assert verify_vote(pub, EPOCH0.epoch_hash, ENTRY_HASH, sign(key, EPOCH0.epoch_hash, ENTRY_HASH))


def test_v1_quorum_of_v1_signatures_is_no_v2_quorum():
    votes = [(pid, bytes.fromhex(sig)) for pid, sig in V1_VOTES["signatures"].items()]
    result = check_quorum(ENTRY_HASH, votes, EPOCH0)
    assert not result.valid
    assert result.signers == ()
    assert len(result.rejected) == len(votes)
    assert all("bad signature" in r for r in result.rejected)

"""Reproduce the "deltas" and "beats_v2_rules" sections of tests/vectors/protocol-v2.json.

Deltas: every case's status, lanes, code, a_hash, delta_hash and actions, through the
full path (`DeltaProcessor.outcome`, `decode_delta`) and the hot path (`receipt`,
`decode_valid`). Beats under the v2 rules (a marker header on a non-empty value does not
hide the delta, a negative timestamp counts as 0): cycle and tick per record,
`is_marker`, the closed beats with their receipts, roots and entry hashes, through the
beat assembler and through a peer node.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from knhk_stream.protocol.beats import TICKS_PER_BEAT, BeatAssembler
from knhk_stream.protocol.decode import REJECTION_CODES, Delta, Rejected, decode_delta, decode_valid
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.engine import MARKER_HEADER, ResumePoint, is_marker
from knhk_stream.protocol.entry import entry_for_beat
from knhk_stream.protocol.hooks import canonical, encode_actions, load_hook
from knhk_stream.protocol.receipts import APPLIED, RECEIPT_SIZE, REJECTED, DeltaProcessor, Receipt, rejected_a_hash
from knhk_stream.runtime.node import PeerNode, Record

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "protocol-v2.json").read_text("utf-8"))
CANONICAL = load_hook("canonical@1")


def _name_id(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def _hex(v: str | None) -> bytes | None:
    return None if v is None else bytes.fromhex(v)


def test_vector_file_is_protocol_v2():
    assert VECTORS["protocol"] == "knhk-stream/2"


# -- deltas ---------------------------------------------------------------------------------

DELTAS = VECTORS["deltas"]
DELTA_CASES = [pytest.param(c, id=_name_id(c["name"])) for c in DELTAS]


@pytest.mark.parametrize("case", DELTA_CASES)
def test_delta_outcome(case):
    out = DeltaProcessor(CANONICAL, case["max_triples"]).outcome(_hex(case["value"]))
    assert (out.status, out.lanes, out.code) == (case["status"], case["lanes"], case["code"])
    assert out.a_hash.hex() == case["a_hash"]
    assert out.delta_hash.hex() == case["delta_hash"]
    assert out.delta_hash == H(_hex(case["value"]) or b"")
    if case["code"] is not None:
        assert out.a_hash == rejected_a_hash(case["code"])


@pytest.mark.parametrize("case", DELTA_CASES)
def test_delta_receipt_hot_path(case):
    """The receipt (decode_valid's fast path for canonical@1) carries the vector's fields, byte for byte."""
    receipt = DeltaProcessor(CANONICAL, case["max_triples"]).receipt(7, 9, 3, 11, _hex(case["value"]))
    assert len(receipt) == RECEIPT_SIZE
    r = Receipt.from_bytes(receipt)
    assert (r.shard, r.cycle, r.tick, r.offset) == (7, 9, 3, 11)
    assert r.status == (APPLIED if case["code"] is None else REJECTED) == case["status"]
    assert r.lanes == case["lanes"]
    assert r.hook_id == CANONICAL.hook_id
    assert (r.delta_hash.hex(), r.a_hash.hex()) == (case["delta_hash"], case["a_hash"])


@pytest.mark.parametrize("case", DELTA_CASES)
def test_delta_decode(case):
    value = _hex(case["value"])
    decoded = decode_delta(value, case["max_triples"])
    if case["code"] is None:
        assert isinstance(decoded, Delta)
        fast = decode_valid(value, case["max_triples"])
        assert fast is None or fast == decoded
    else:
        assert isinstance(decoded, Rejected)
        assert decoded.code == case["code"]
        assert decoded.reason
        if value:
            assert decode_valid(value, case["max_triples"]) is None


@pytest.mark.parametrize("case", [pytest.param(c, id=_name_id(c["name"])) for c in DELTAS if "actions" in c])
def test_delta_actions(case):
    decoded = decode_delta(_hex(case["value"]), case["max_triples"])
    assert isinstance(decoded, Delta)
    actions = canonical(decoded)
    encoded = encode_actions(actions)
    assert encoded.hex() == case["actions"]
    assert len(actions) == case["lanes"]
    assert H(encoded).hex() == case["a_hash"]


def test_delta_vectors_cover_the_v2_rules():
    """Every code, and each stricter-input rule of v2, has a case (so a lost case shows)."""
    assert {c["code"] for c in DELTAS} >= {None, *REJECTION_CODES} - {"hook_error"}
    names = " ".join(c["name"] for c in DELTAS)
    for words in ("64 levels", "65 levels", "900 levels", "NaN", "-Infinity", "5000-digit", "1.5e400",
                  "surrogate in an ignored key", "byte-order mark", "repeated key in an ignored object",
                  "too_large wins"):  # fmt: skip
        assert words in names


# -- beats under the v2 rules ---------------------------------------------------------------

BEATS = VECTORS["beats_v2_rules"]
RECORDS = BEATS["records"]


def _headers(r: dict) -> list[tuple[str, bytes]] | None:
    return [(MARKER_HEADER, b"")] if r["marker_header"] else None


def _feed_all():
    processor = DeltaProcessor(load_hook(BEATS["hook"]), BEATS["max_triples"])
    asm = BeatAssembler(BEATS["shard"], BEATS["tick_ms"], processor)
    closed, ticks = [], []
    for r in RECORDS:
        value = _hex(r["value"])
        beat = asm.feed(r["offset"], r["ts"], is_marker(_headers(r), value), value)
        ticks.append((asm.last_tick, asm.open_cycle))
        if beat is not None:
            closed.append(beat)
    return asm, closed, ticks


def test_beats_v2_rules_cover_the_rules():
    assert any(r["marker_header"] and r["value"] for r in RECORDS)  # a header on a delta
    assert any(r["marker_header"] and r["value"] == "" for r in RECORDS)  # an empty marker
    assert any(r["marker_header"] and r["value"] is None for r in RECORDS)  # a null marker
    assert any(not r["marker_header"] and r["value"] is None for r in RECORDS)  # a null delta: malformed
    assert any(r["ts"] < 0 for r in RECORDS)


@pytest.mark.parametrize("index", [pytest.param(i, id=f"offset{r['offset']}") for i, r in enumerate(RECORDS)])
def test_beats_v2_record_is_marker(index):
    r = RECORDS[index]
    value = _hex(r["value"])
    assert is_marker(_headers(r), value) is r["is_marker"]
    assert is_marker(dict(_headers(r) or []), value) is r["is_marker"]  # headers as a mapping (Faust)


@pytest.mark.parametrize("index", [pytest.param(i, id=f"offset{r['offset']}") for i, r in enumerate(RECORDS)])
def test_beats_v2_record_cycle_and_tick(index):
    _, _, ticks = _feed_all()
    r = RECORDS[index]
    last_tick, open_cycle = ticks[index]
    assert divmod(last_tick, TICKS_PER_BEAT) == (r["cycle"], r["tick"])
    assert open_cycle == r["cycle"]


def test_beats_v2_count_and_open_beat():
    asm, closed, _ = _feed_all()
    assert len(closed) == len(BEATS["closed_beats"])
    last = RECORDS[-1]
    assert last["is_marker"]  # the open beat holds markers only: it will produce nothing
    assert (asm.open_cycle, asm.open_first_offset, asm.open_deltas) == (last["cycle"], last["offset"], 0)


CLOSED = BEATS["closed_beats"]


@pytest.mark.parametrize("index", [pytest.param(i, id=f"cycle{b['cycle']}") for i, b in enumerate(CLOSED)])
def test_beats_v2_closed_beat(index):
    _, closed, _ = _feed_all()
    expected = BEATS["closed_beats"][index]
    beat = closed[index]
    assert (beat.shard, beat.cycle) == (expected["shard"], expected["cycle"])
    assert (beat.first_offset, beat.last_offset) == (expected["first_offset"], expected["last_offset"])
    assert beat.receipt_count == expected["receipt_count"] == len(expected["receipts"])
    assert [r.hex() for r in beat.receipts] == expected["receipts"]
    assert beat.root().hex() == expected["root"]
    assert expected["epoch"] == 0
    prev = bytes.fromhex(expected["prev_entry_hash"])
    if index == 0:
        assert prev == ZERO_HASH
    else:
        assert expected["prev_entry_hash"] == BEATS["closed_beats"][index - 1]["entry_hash"]
    entry = entry_for_beat(BEATS["chain_id"], beat, prev)
    assert entry.entry_hash.hex() == expected["entry_hash"]


def test_beats_v2_receipts_are_the_non_markers():
    """One receipt per record that is not a marker, header or not, with the record's cycle and tick."""
    _, closed, _ = _feed_all()
    by_offset = {r["offset"]: r for r in RECORDS}
    got = [Receipt.from_bytes(receipt) for beat in closed for receipt in beat.receipts]
    in_closed = [r for r in RECORDS if r["cycle"] < RECORDS[-1]["cycle"]]
    assert [p.offset for p in got] == [r["offset"] for r in in_closed if not r["is_marker"]]
    for p in got:
        r = by_offset[p.offset]
        assert (p.shard, p.cycle, p.tick) == (BEATS["shard"], r["cycle"], r["tick"])
        assert p.delta_hash == H(_hex(r["value"]) or b"")
        if r["value"] is None:  # a null value without the header is a malformed delta
            assert (p.status, p.a_hash) == (REJECTED, rejected_a_hash("malformed"))


def test_beats_v2_through_a_peer_node(settings, peer_keys):
    """The node (which the worker and the Faust peer drive) cuts the same beats: it votes the vector's entries."""
    assert (settings.chain_id, settings.tick_ms, settings.max_triples) == (
        BEATS["chain_id"],
        BEATS["tick_ms"],
        BEATS["max_triples"],
    )
    node = PeerNode(settings, "peer-a", peer_keys["peer-a"], SimpleNamespace(chain_id=settings.chain_id))
    node.engine.assign(BEATS["shard"], ResumePoint(RECORDS[0]["offset"]))
    records = [Record(BEATS["shard"], r["offset"], r["ts"], _headers(r), _hex(r["value"])) for r in RECORDS]
    votes = node.process(records)
    assert [v.entry.entry_hash.hex() for v in votes] == [b["entry_hash"] for b in BEATS["closed_beats"]]
    assert [v.entry.root.hex() for v in votes] == [b["root"] for b in BEATS["closed_beats"]]
    assert node.stats["deltas"] == sum(1 for r in RECORDS if not r["is_marker"])

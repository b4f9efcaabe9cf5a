"""Property tests of the protocol core: Merkle proofs, beat cutting and resuming, decoding, hooks."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from knhk_stream.protocol import merkle
from knhk_stream.protocol.beats import TICKS_PER_BEAT, BeatAssembler
from knhk_stream.protocol.decode import (
    AVRO_PREFIX,
    HOOK_ERROR,
    MAX_TERM_BYTES,
    REJECTION_CODES,
    Delta,
    Rejected,
    Triple,
    decode_delta,
    encode_avro,
    encode_json,
)
from knhk_stream.protocol.encoding import H
from knhk_stream.protocol.hooks import canonical, encode_actions, load_hook
from knhk_stream.protocol.receipts import APPLIED, REJECTED, DeltaProcessor, Receipt, rejected_a_hash

HASHES = {"blake3": merkle.H, "sha256": merkle.sha256}
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- (a) Merkle inclusion proofs ------------------------------------------------------------


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def ref_mth(leaves: list[bytes], h) -> bytes:
    """RFC 6962 section 2.1, literally (recursive)."""
    n = len(leaves)
    if n == 0:
        return h(b"")
    if n == 1:
        return h(b"\x00" + leaves[0])
    k = _split(n)
    return h(b"\x01" + ref_mth(leaves[:k], h) + ref_mth(leaves[k:], h))


def ref_path(m: int, leaves: list[bytes], h) -> list[bytes]:
    """RFC 6962 section 2.1.1 PATH(m, D[n]), literally (recursive)."""
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*ref_path(m, leaves[:k], h), ref_mth(leaves[k:], h)]
    return [*ref_path(m - k, leaves[k:], h), ref_mth(leaves[:k], h)]


def path_shape(m: int, n: int) -> tuple[str, ...]:
    """Which side each audit-path node sits on (bottom to top) for leaf m of n."""
    if n == 1:
        return ()
    k = _split(n)
    if m < k:
        return (*path_shape(m, k), "R")
    return (*path_shape(m - k, n - k), "L")


leaf_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=70)
# With repeated leaves a proof may honestly fit another position holding the same subtree.
unique_leaf_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=70, unique=True)


@pytest.mark.parametrize("hash_name", sorted(HASHES))
@FAST
@given(leaves=leaf_lists, data=st.data())
def test_every_inclusion_proof_verifies(hash_name, leaves, data):
    h = HASHES[hash_name]
    root = merkle.root(leaves, h)
    assert root == ref_mth(leaves, h)
    n = len(leaves)
    for i, leaf in enumerate(leaves):
        proof = merkle.inclusion_proof(leaves, i, h)
        assert len(proof) == len(path_shape(i, n))
        assert merkle.verify_inclusion(leaf, i, n, proof, root, h)
    i = data.draw(st.integers(0, n - 1), label="index")
    assert merkle.inclusion_proof(leaves, i, h) == ref_path(i, leaves, h)


@pytest.mark.parametrize("hash_name", sorted(HASHES))
@FAST
@given(n=st.integers(0, 700), chunk=st.sampled_from([1, 2, 4, 64, 128]), seed=st.binary(max_size=4))
def test_a_compact_range_of_equal_subtrees_and_a_tail_gives_the_root(hash_name, n, chunk, seed):
    """CompactRange: the roots of runs of `chunk` leaves, then the tail's root, fold to MTH of all."""
    h = HASHES[hash_name]
    leaves = [seed + i.to_bytes(2, "big") for i in range(n)]
    cr = merkle.CompactRange(h)
    whole = n // chunk * chunk
    for i in range(0, whole, chunk):
        cr.add(chunk, merkle.root(leaves[i : i + chunk], h))
    assert cr.leaves == whole
    tail = leaves[whole:]
    assert cr.root(merkle.root(tail, h) if tail else None) == merkle.root(leaves, h) == ref_mth(leaves, h)


@SLOW
@given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    markers=st.sets(st.integers(0, 2400)),
    ahead=st.sets(st.integers(0, 2400)),
)
def test_beats_hashed_ahead_anywhere_have_the_root_of_their_receipts(sizes, markers, ahead):
    """hash_ahead after any record puts the open beat's complete runs of ROOT_CHUNK receipts into its
    tree; closed, the beat's root is still MTH of its receipts, and its receipts are the same."""
    proc = DeltaProcessor(load_hook("canonical@1"))
    a, plain = BeatAssembler(0, 1, proc), BeatAssembler(0, 1, proc)
    beats, offset = [], 0
    for cycle, size in enumerate([*sizes, 1]):
        for _ in range(size):
            marker = offset in markers or cycle == len(sizes)  # a marker of the next beat closes the last
            value = None if marker else b'{"additions": []}'
            b = a.feed(offset, cycle * TICKS_PER_BEAT, marker, value)
            p = plain.feed(offset, cycle * TICKS_PER_BEAT, marker, value)
            if offset in ahead:
                a.hash_ahead()
            assert (b is None) == (p is None)
            if b is not None:
                assert b.receipts == p.receipts
                beats.append(b)
            offset += 1
    assert all(b.root() == merkle.root(b.receipts) for b in beats)
    assert len(beats) == sum(1 for i, size in enumerate(sizes) if any(
        o not in markers for o in range(sum(sizes[:i]), sum(sizes[:i]) + size)))  # fmt: skip


def _flip(b: bytes, pos: int, mask: int) -> bytes:
    if not b:
        return b"\x00"
    pos %= len(b)
    return b[:pos] + bytes([b[pos] ^ mask]) + b[pos + 1 :]


@pytest.mark.parametrize("hash_name", sorted(HASHES))
@FAST
@given(leaves=leaf_lists, data=st.data())
def test_tampered_proof_fails(hash_name, leaves, data):
    h = HASHES[hash_name]
    n = len(leaves)
    i = data.draw(st.integers(0, n - 1), label="index")
    root = merkle.root(leaves, h)
    proof = merkle.inclusion_proof(leaves, i, h)
    leaf = leaves[i]
    targets = ["leaf", "root"] + (["path"] if proof else [])
    target = data.draw(st.sampled_from(targets), label="target")
    pos = data.draw(st.integers(0, 63), label="byte")
    mask = data.draw(st.integers(1, 255), label="mask")
    if target == "leaf":
        leaf = _flip(leaf, pos, mask)
    elif target == "root":
        root = _flip(root, pos, mask)
    else:
        j = data.draw(st.integers(0, len(proof) - 1), label="path element")
        proof = [*proof[:j], _flip(proof[j], pos, mask), *proof[j + 1 :]]
    assert not merkle.verify_inclusion(leaf, i, n, proof, root, h)


@pytest.mark.parametrize("hash_name", sorted(HASHES))
@FAST
@given(leaves=unique_leaf_lists, data=st.data())
def test_wrong_index_or_size_fails(hash_name, leaves, data):
    h = HASHES[hash_name]
    n = len(leaves)
    i = data.draw(st.integers(0, n - 1), label="index")
    root = merkle.root(leaves, h)
    proof = merkle.inclusion_proof(leaves, i, h)
    leaf = leaves[i]
    # Within one tree every leaf position has its own path shape: another index never verifies.
    if n > 1:
        j = data.draw(st.integers(0, n - 1).filter(lambda x: x != i), label="wrong index")
        assert not merkle.verify_inclusion(leaf, j, n, proof, root, h)
    # Out-of-range indexes never verify.
    assert not merkle.verify_inclusion(leaf, n, n, proof, root, h)
    assert not merkle.verify_inclusion(leaf, -1, n, proof, root, h)
    # A longer or shorter path never verifies.
    assert not merkle.verify_inclusion(leaf, i, n, [*proof, root], root, h)
    if proof:
        assert not merkle.verify_inclusion(leaf, i, n, proof[:-1], root, h)
    # An audit path does not commit to the tree size by itself: another size verifies exactly
    # when it gives the same path shape (RFC 6962); the entry's receipt_count fixes the size.
    m = data.draw(st.integers(1, 2 * n + 2).filter(lambda x: x != n), label="wrong size")
    same_shape = i < m and path_shape(i, m) == path_shape(i, n)
    assert merkle.verify_inclusion(leaf, i, m, proof, root, h) is same_shape


def test_tree_size_is_not_committed_by_the_path_alone():
    # Documents the RFC 6962 property the test above relies on: leaf 0 of 3 and of 4 share a shape.
    leaves = [b"a", b"b", b"c"]
    proof = merkle.inclusion_proof(leaves, 0)
    root = merkle.root(leaves)
    assert path_shape(0, 3) == path_shape(0, 4)
    assert merkle.verify_inclusion(b"a", 0, 4, proof, root)
    assert not merkle.verify_inclusion(b"a", 0, 5, proof, root)
    assert not merkle.verify_inclusion(b"c", 2, 4, merkle.inclusion_proof(leaves, 2), root)


# -- strategies for deltas ------------------------------------------------------------------

terms = st.text(min_size=1, max_size=12)
triples = st.builds(Triple, terms, terms, terms, st.none() | st.text(max_size=8))
valid_deltas = st.builds(
    Delta,
    st.lists(triples, max_size=6).map(tuple),
    st.lists(triples, max_size=6).map(tuple),
    st.none() | st.text(max_size=10),
    st.none() | st.text(max_size=10),
).filter(lambda d: d.additions or d.removals)

small_terms = st.sampled_from(["urn:a", "urn:b", "ü", "x y", "日本"])
small_deltas = st.builds(
    Delta,
    st.lists(st.builds(Triple, small_terms, small_terms, small_terms), min_size=1, max_size=3).map(tuple),
    st.lists(st.builds(Triple, small_terms, small_terms, small_terms), max_size=2).map(tuple),
)
encoded_valid = small_deltas.flatmap(lambda d: st.sampled_from([encode_json(d), encode_avro(d)]))
garbage = st.binary(max_size=40)
record_values = st.one_of(encoded_valid, garbage, st.none())

# -- (b) beats: one pass versus stop-and-resume at every beat boundary ----------------------

BASE_TS = 1_700_000_000_000


@st.composite
def record_streams(draw):
    n = draw(st.integers(2, 60), label="records")
    offset = draw(st.integers(0, 10_000), label="first offset")
    ts = BASE_TS + draw(st.integers(-2000, 2000), label="first ts")
    records = []
    for _ in range(n):
        marker = draw(st.integers(0, 4)) == 0
        value = draw(st.none() | st.just(b"")) if marker else draw(record_values)
        records.append((offset, ts, marker, value))
        offset += draw(st.integers(1, 4))
        ts = max(0, ts + draw(st.integers(-400, 1200)))
    return records


def _run(records, tick_ms, shard=3):
    asm = BeatAssembler(shard, tick_ms, DeltaProcessor(load_hook("canonical@1")))
    return [b for r in records if (b := asm.feed(*r)) is not None]


def _reference_beats(records, tick_ms):
    """(cycle, first_offset, last_offset, [(offset, tick, value)]) of each closed beat, per the protocol."""
    groups: list[list] = []
    t_prev = None
    for offset, ts, marker, value in records:
        t = ts // tick_ms if t_prev is None else max(t_prev, ts // tick_ms)
        t_prev = t
        cycle, tick = divmod(t, TICKS_PER_BEAT)
        if not groups or groups[-1][0] != cycle:
            groups.append([cycle, offset, offset, []])
        groups[-1][2] = offset
        if not marker:
            groups[-1][3].append((offset, tick, value))
    return [g for g in groups[:-1] if g[3]]  # the last beat is still open


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=record_streams(), tick_ms=st.sampled_from([1, 7, 125, 1000]))
def test_beats_match_the_protocol_and_resume_identically(records, tick_ms):
    shard = 3
    beats = _run(records, tick_ms, shard)
    processor = DeltaProcessor(load_hook("canonical@1"))

    expected = _reference_beats(records, tick_ms)
    assert [(b.cycle, b.first_offset, b.last_offset) for b in beats] == [tuple(g[:3]) for g in expected]
    for beat, (cycle, _, _, deltas) in zip(beats, expected, strict=True):
        assert beat.shard == shard
        assert beat.receipts == tuple(processor.receipt(shard, cycle, tick, o, v) for o, tick, v in deltas)
        assert beat.ticks == tuple(tick for _, tick, _ in deltas)
        assert beat.root() == merkle.root(list(beat.receipts))
    assert all(a.cycle < b.cycle for a, b in itertools.pairwise(beats))

    # Stop after any closed beat; resume with a fresh assembler at last_offset + 1.
    for k, beat in enumerate(beats):
        j = next(idx for idx, r in enumerate(records) if r[0] > beat.last_offset)
        before = _run(records[: j + 1], tick_ms, shard)
        after = _run(records[j:], tick_ms, shard)
        assert before == beats[: k + 1]
        assert after == beats[k + 1 :]


@FAST
@given(records=record_streams())
def test_offsets_must_increase(records):
    asm = BeatAssembler(0, 125, DeltaProcessor(load_hook("canonical@1")))
    for r in records:
        asm.feed(*r)
    last = records[-1]
    with pytest.raises(ValueError, match="offset"):
        asm.feed(last[0], last[1], False, b"{}")


# -- (c) decode_delta never raises ----------------------------------------------------------

surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=2)
json_text = st.text(max_size=12) | surrogates | small_terms
json_keys = st.sampled_from(["additions", "removals", "id", "actor", "s", "p", "o", "g"]) | json_text
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | json_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=5),
    max_leaves=25,
)


@st.composite
def json_documents(draw):
    value = draw(json_values)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = " " * draw(st.integers(0, 2)) + text + draw(st.sampled_from(["", " ", "\n", "x", "}", ",{}"]))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated_avro(draw):
    body = encode_avro(draw(small_deltas))
    cut = draw(st.integers(len(AVRO_PREFIX), len(body)))
    tail = draw(st.binary(max_size=6))
    if draw(st.booleans()):
        pos = draw(st.integers(len(AVRO_PREFIX), len(body) - 1))
        body = body[:pos] + bytes([body[pos] ^ draw(st.integers(1, 255))]) + body[pos + 1 :]
    return body[:cut] + tail


any_values = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=120).map(lambda b: AVRO_PREFIX + b),
    json_documents(),
    mutated_avro(),
    encoded_valid,
)


def _check_decoded(result, max_triples: int) -> None:
    assert isinstance(result, (Delta, Rejected))
    if isinstance(result, Rejected):
        assert result.code in REJECTION_CODES
        assert result.code != HOOK_ERROR  # only a hook makes that one
        assert isinstance(result.reason, str)
        return
    n = len(result.additions) + len(result.removals)
    assert 1 <= n <= max_triples
    for t in (*result.additions, *result.removals):
        assert isinstance(t, Triple)
        for term in (t.s, t.p, t.o):
            assert isinstance(term, str)
            assert term
            assert len(term.encode("utf-8")) <= MAX_TERM_BYTES
        assert t.g is None or (isinstance(t.g, str) and len(t.g.encode("utf-8")) <= MAX_TERM_BYTES)
    for opt in (result.id, result.actor):
        assert opt is None or isinstance(opt, str)
        if opt is not None:
            opt.encode("utf-8")  # never a lone surrogate


@FAST
@given(value=any_values, max_triples=st.integers(1, 1024))
def test_decode_delta_never_raises(value, max_triples):
    _check_decoded(decode_delta(value, max_triples), max_triples)


@FAST
@given(value=st.binary(max_size=300))
def test_decode_delta_on_raw_bytes(value):
    _check_decoded(decode_delta(value), 1024)


@FAST
@given(value=json_documents())
def test_decode_delta_on_json_like_text(value):
    result = decode_delta(value)
    _check_decoded(result, 1024)
    try:
        parsed = json.loads(value.decode("utf-8"))
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        assert isinstance(result, Rejected)
        assert result.code == "malformed"


@FAST
@given(value=mutated_avro())
def test_decode_delta_on_avro_like_bytes(value):
    _check_decoded(decode_delta(value), 1024)


@FAST
@given(delta=small_deltas, extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_malformed(delta, extra):
    for value in (encode_avro(delta) + extra, encode_json(delta) + b"," + extra):
        result = decode_delta(value)
        assert isinstance(result, Rejected)
        assert result.code == "malformed"


@FAST
@given(value=st.binary(max_size=60), max_triples=st.integers(1, 8))
def test_decode_is_deterministic(value, max_triples):
    assert decode_delta(value, max_triples) == decode_delta(value, max_triples)


# -- (d) encoders round-trip ----------------------------------------------------------------


@FAST
@given(delta=valid_deltas)
def test_json_round_trip(delta):
    assert decode_delta(encode_json(delta)) == delta


@FAST
@given(delta=valid_deltas)
def test_avro_round_trip(delta):
    decoded = decode_delta(encode_avro(delta))
    # Avro has no null id/actor: absent ones travel as "".
    assert decoded == delta._replace(id=delta.id or "", actor=delta.actor or "")


@FAST
@given(delta=valid_deltas)
def test_both_forms_give_the_same_actions(delta):
    a = decode_delta(encode_avro(delta))
    j = decode_delta(encode_json(delta))
    assert encode_actions(canonical(a)) == encode_actions(canonical(j))
    proc = DeltaProcessor(load_hook("canonical@1"))
    assert proc.outcome(encode_avro(delta)).a_hash == proc.outcome(encode_json(delta)).a_hash


@SLOW
@given(term=st.text(min_size=1, max_size=5), extra=st.integers(-3, 3))
def test_term_length_limit_is_in_utf8_bytes(term, extra):
    size = len(term.encode("utf-8"))
    reps = (MAX_TERM_BYTES + extra) // size
    long_term = term * reps
    n = len(long_term.encode("utf-8"))
    assume(n > 0)
    delta = Delta((Triple("s", "p", long_term),), ())
    result = decode_delta(encode_json(delta))
    if n > MAX_TERM_BYTES:
        assert result == Rejected("invalid_term", result.reason)
    else:
        assert result == delta


@FAST
@given(delta=valid_deltas)
def test_canonical_actions_are_sorted_and_unique(delta):
    actions = canonical(delta)
    adds = [a for a in actions if a[0] == 1]
    rems = [a for a in actions if a[0] == 2]
    assert actions == adds + rems

    def key(a):
        return tuple(x.encode("utf-8") for x in a[1:])

    for group in (adds, rems):
        keys = [key(a) for a in group]
        assert keys == sorted(set(keys))
    assert {a[1:] for a in adds} == {(t.s, t.p, t.o, t.g or "") for t in delta.additions}
    assert {a[1:] for a in rems} == {(t.s, t.p, t.o, t.g or "") for t in delta.removals}


# -- (e) DeltaProcessor.outcome never raises; hook errors are deterministic -----------------

USER_HOOKS = {
    "boom@1": "tests.support.hooks_example:boom",
    "not-a-list@1": "tests.support.hooks_example:not_a_list",
    "bad-action@1": "tests.support.hooks_example:bad_action",
}


@FAST
@given(value=any_values | st.none())
def test_canonical_outcome_never_raises(value):
    proc = DeltaProcessor(load_hook("canonical@1"))
    out = proc.outcome(value)
    decoded = decode_delta(value)
    assert out.delta_hash == H(value or b"")
    if isinstance(decoded, Rejected):
        assert (out.status, out.lanes, out.code) == (REJECTED, 0, decoded.code)
        assert out.a_hash == rejected_a_hash(decoded.code) == H(b"rejected:" + decoded.code.encode())
    else:
        actions = canonical(decoded)
        assert (out.status, out.lanes, out.code) == (APPLIED, len(actions), None)
        assert out.a_hash == H(encode_actions(actions))
    receipt = Receipt.from_bytes(proc.receipt(1, 2, 3, 4, value))
    assert (receipt.status, receipt.lanes, receipt.a_hash, receipt.delta_hash) == (
        out.status,
        out.lanes,
        out.a_hash,
        out.delta_hash,
    )


@pytest.mark.parametrize("hook_name", sorted(USER_HOOKS))
@FAST
@given(value=any_values | st.none())
def test_user_hook_errors_are_deterministic(hook_name, value):
    p1 = DeltaProcessor(load_hook(hook_name, USER_HOOKS[hook_name]))
    p2 = DeltaProcessor(load_hook(hook_name, USER_HOOKS[hook_name]))
    o1, o2 = p1.outcome(value), p2.outcome(value)
    decoded = decode_delta(value)
    expected_code = decoded.code if isinstance(decoded, Rejected) else HOOK_ERROR
    for o in (o1, o2):
        assert (o.status, o.lanes, o.code) == (REJECTED, 0, expected_code)
        assert o.a_hash == rejected_a_hash(expected_code)
        assert o.delta_hash == H(value or b"")
    assert p1.receipt(5, 6, 7, 8, value) == p2.receipt(5, 6, 7, 8, value)
    assert Receipt.from_bytes(p1.receipt(5, 6, 7, 8, value)).hook_id == H(hook_name.encode())

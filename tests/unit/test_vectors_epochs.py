"""Reproduce the "epochs", "votes" and "public_keys" sections of tests/vectors/protocol-v2.json.

Epoch hashes from their fields (by the code, and by a literal reading of the protocol's
formula), epochs 1 and 2 accepted from epoch 0, every transition case, the epoch of a cycle,
every signature from the seeds (Ed25519 is deterministic), every quorum case, the default
thresholds and the key rule; and chain settings that list the vector's epochs as [[epochs]].
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from blake3 import blake3

from knhk_stream.errors import EpochError, SettingsError
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.epochs import (
    EPOCH_DOMAIN,
    Epoch,
    Peer,
    build_chain,
    default_threshold,
    genesis_epoch,
    threshold_problem,
    transition_problems,
)
from knhk_stream.protocol.keys import key_from_seed, key_problem, parse_public_key, public_key_bytes, verify_signature
from knhk_stream.protocol.quorum import check_quorum, check_threshold, sign, verify_vote, vote_message
from knhk_stream.protocol.settings import ChainSettings

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "protocol-v2.json").read_text("utf-8"))
EPOCHS = VECTORS["epochs"]
VOTES = VECTORS["votes"]
CHAIN_ID, TICK_MS = EPOCHS["chain_id"], EPOCHS["tick_ms"]
ENTRY_HASH = bytes.fromhex(VOTES["entry_hash"])

# Every private key the vectors use: peer-a..d of epoch 0, peer-d after its rotation, peer-e, peer-x.
SEEDS = {pid: bytes.fromhex(s) for pid, s in EPOCHS["seeds"].items()}
KEYS0 = {pid: key_from_seed(seed) for pid, seed in SEEDS.items()}
KEY_D1 = key_from_seed(bytes.fromhex(EPOCHS["rotated_seed_peer_d"]))
KEY_E = key_from_seed(bytes.fromhex(EPOCHS["seed_peer_e"]))
KEY_X = key_from_seed(bytes.fromhex(EPOCHS["seed_peer_x"]))
KEYS1 = {**KEYS0, "peer-d": KEY_D1}
KEYS2 = {**KEYS1, "peer-e": KEY_E}
ALL_KEYS = [("peer-a", KEYS0["peer-a"]), ("peer-b", KEYS0["peer-b"]), ("peer-c", KEYS0["peer-c"])]
ORDER = 2**252 + 27742317777372353535851937790883648493  # L, the order of the base point
ALL_KEYS += [("peer-d", KEYS0["peer-d"]), ("peer-d", KEY_D1), ("peer-e", KEY_E), ("peer-x", KEY_X)]


def _name_id(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def _fields(raw: dict) -> Epoch:
    """The epoch built straight from its fields, without any check (not through from_json)."""
    return Epoch(
        CHAIN_ID,
        TICK_MS,
        raw["epoch"],
        raw["from_cycle"],
        raw["threshold"],
        raw["hook"],
        raw["max_triples"],
        tuple(Peer(p["id"], bytes.fromhex(p["public_key"])) for p in raw["peers"]),
        bytes.fromhex(raw["prev_epoch_hash"]),
        tuple((s["peer_id"], bytes.fromhex(s["signature"])) for s in raw["signatures"]),
    )


def reference_epoch_hash(chain_id: str, tick_ms: int, raw: dict) -> str:
    """The protocol's formula, literally: H(0x03 || str chain_id || u32 tick_ms || u32 e || u64 from_cycle
    || u16 threshold || str hook || u32 max_triples || u16 n || (str id || [32] key)* in byte order of id
    || [32] prev_epoch_hash)."""

    def s(text: str) -> bytes:
        b = text.encode("utf-8")
        return struct.pack(">H", len(b)) + b

    peers = sorted(raw["peers"], key=lambda p: p["id"].encode("utf-8"))
    data = b"\x03" + s(chain_id) + struct.pack(">IIQH", tick_ms, raw["epoch"], raw["from_cycle"], raw["threshold"])
    data += s(raw["hook"]) + struct.pack(">IH", raw["max_triples"], len(peers))
    for p in peers:
        data += s(p["id"]) + bytes.fromhex(p["public_key"])
    data += bytes.fromhex(raw["prev_epoch_hash"])
    return blake3(data).hexdigest()


E0, E1, E2 = (Epoch.from_json(raw, CHAIN_ID, TICK_MS) for raw in EPOCHS["epochs"])
CHAIN = build_chain(E0, [E1, E2])
BY_NUMBER = {e.number: e for e in (E0, E1, E2)}

# -- epochs ---------------------------------------------------------------------------------

EPOCH_CASES = [pytest.param(raw, id=f"epoch{raw['epoch']}") for raw in EPOCHS["epochs"]]
TRANSITION_CASES = [pytest.param(c, id=_name_id(c["name"])) for c in EPOCHS["transition_cases"]]


def test_vector_file_is_protocol_v2():
    assert VECTORS["protocol"] == "knhk-stream/2"
    assert [raw["epoch"] for raw in EPOCHS["epochs"]] == [0, 1, 2]


@pytest.mark.parametrize("raw", EPOCH_CASES)
def test_epoch_hash_from_fields(raw):
    assert reference_epoch_hash(CHAIN_ID, TICK_MS, raw) == raw["epoch_hash"]
    assert _fields(raw).epoch_hash.hex() == raw["epoch_hash"]
    parsed = Epoch.from_json(raw, CHAIN_ID, TICK_MS)
    assert parsed.epoch_hash.hex() == raw["epoch_hash"]
    assert parsed == _fields(raw)
    assert parsed.message == b"knhk-epoch/2" + bytes.fromhex(raw["epoch_hash"])
    assert EPOCH_DOMAIN == b"knhk-epoch/2"
    assert parsed.problems() == []


@pytest.mark.parametrize("raw", EPOCH_CASES)
def test_epoch_json_round_trip(raw):
    e = Epoch.from_json(raw, CHAIN_ID, TICK_MS)
    out = e.to_json()
    assert (out["chain_id"], out["tick_ms"]) == (CHAIN_ID, TICK_MS)
    assert {k: v for k, v in out.items() if k not in ("chain_id", "tick_ms")} == raw
    assert Epoch.from_json(json.loads(e.dumps())) == e


def test_epoch_hash_orders_peers_by_id_bytes():
    raw = EPOCHS["epochs"][2]
    shuffled = {**raw, "peers": list(reversed(raw["peers"]))}
    assert _fields(shuffled).epoch_hash.hex() == raw["epoch_hash"]
    assert [p.id for p in _fields(shuffled).peers] == sorted(p["id"] for p in raw["peers"])


def test_epoch_zero_identifies_the_chain():
    raw = EPOCHS["epochs"][0]
    assert raw["from_cycle"] == 0
    assert raw["prev_epoch_hash"] == ZERO_HASH.hex()
    assert raw["signatures"] == []
    g = genesis_epoch(CHAIN_ID, TICK_MS, raw["threshold"], raw["hook"], raw["max_triples"], list(E0.peers))
    assert g == E0
    assert g.epoch_hash.hex() == raw["epoch_hash"]


def test_epochs_1_and_2_accepted_from_epoch_0():
    assert [e.number for e in CHAIN.epochs] == [0, 1, 2]
    assert CHAIN.epochs == [E0, E1, E2]
    assert CHAIN.refused == []
    assert CHAIN.forks == []
    assert CHAIN.genesis == E0
    assert CHAIN.newest == E2
    assert transition_problems(E0, E1) == []
    assert transition_problems(E1, E2) == []
    # The order in which statements arrive does not matter; repeats are dropped.
    again = build_chain(E0, [E2, E1, E2, E0])
    assert again.epochs == [E0, E1, E2]
    assert again.refused == []


def test_epoch_2_only_through_epoch_1():
    alone = build_chain(E0, [E2])
    assert alone.epochs == [E0]
    assert [(e, why) for e, why in alone.refused] == [(E2, ["does not follow a valid epoch"])]
    # Epoch 2 is no successor of epoch 0 (wrong number, prev_epoch_hash and signers).
    assert transition_problems(E0, E2)


def test_every_signature_of_epochs_1_and_2_from_the_seeds():
    for epoch, keys in ((E1, KEYS1), (E2, KEYS2)):
        expected = [(pid, keys[pid].sign(epoch.message)) for pid in sorted(keys)]
        assert list(epoch.signatures) == expected
        for pid, sig in epoch.signatures:
            assert verify_signature(epoch.public_keys[pid], epoch.message, sig)
        # signed_by reproduces the same statement.
        bare = Epoch.from_json({**epoch.to_json(), "signatures": []})
        for pid in sorted(keys, reverse=True):
            bare = bare.signed_by(pid, keys[pid])
        assert bare.signatures == epoch.signatures
        assert bare == epoch


def test_public_keys_from_the_seeds():
    assert {pid: public_key_bytes(k) for pid, k in KEYS0.items()} == E0.public_keys
    assert {pid: public_key_bytes(k) for pid, k in KEYS1.items()} == E1.public_keys
    assert {pid: public_key_bytes(k) for pid, k in KEYS2.items()} == E2.public_keys
    x = next(c for c in EPOCHS["transition_cases"] if "peer-x" in c["name"])
    assert {p["id"]: p["public_key"] for p in x["epoch"]["peers"]}["peer-x"] == public_key_bytes(KEY_X).hex()


# What each invalid transition must say (a part of the problem string), by case name.
TRANSITION_PROBLEMS = {
    "a new peer-x that never signed (its new key unproven)": "new key(s) not shown to be held: peer-x",
    "only two old peers signed": "signed by 2 peer(s) of epoch 0",
    "new set threshold met by a, b, c alone (peer-d signed with its retired key)": (
        "new key(s) not shown to be held: peer-d"
    ),
    "old key of peer-d counts for the old set, new set lacks a third": "signed by 2 peer(s) of epoch 1",
    "prev_epoch_hash is not epoch 0": "is not the hash of epoch 0",
    "from_cycle not after epoch 0": "from_cycle 0 must be greater than epoch 0's (0)",
    "signatures of epoch 1 reused for a changed threshold": "signed by 0 peer(s) of epoch 0",
    "threshold 1 is not well-formed, however it is signed": "threshold 1 is not valid for 4 peers",
    "threshold above n is not well-formed": "threshold 5 is not valid for 4 peers",
    "the same key under two ids is not well-formed": "reuses the public key of another peer",
    "a small-order key is not well-formed": "small order",
    "max_triples 0 is not well-formed": "max_triples 0",
    "an empty hook is not well-formed": "hook must be a non-empty string",
}
NOT_WELL_FORMED = {name for name in TRANSITION_PROBLEMS if "not well-formed" in name}


def test_every_invalid_transition_case_has_an_expected_problem():
    invalid = {c["name"] for c in EPOCHS["transition_cases"] if not c["valid"]}
    assert invalid == set(TRANSITION_PROBLEMS)
    assert [c["name"] for c in EPOCHS["transition_cases"] if c["valid"]] == ["epoch 1 as signed"]


@pytest.mark.parametrize("case", TRANSITION_CASES)
def test_transition_case(case):
    raw = case["epoch"]
    candidate = _fields(raw)
    assert candidate.epoch_hash.hex() == raw["epoch_hash"]
    assert reference_epoch_hash(CHAIN_ID, TICK_MS, raw) == raw["epoch_hash"]
    problems = transition_problems(E0, candidate)
    chain = build_chain(E0, [candidate])
    if case["valid"]:
        assert problems == []
        assert chain.epochs == [E0, candidate]
        assert chain.refused == []
        return
    assert problems
    joined = "; ".join(problems)
    assert TRANSITION_PROBLEMS[case["name"]] in joined, joined
    assert chain.epochs == [E0]
    assert chain.refused == [(candidate, problems)]
    assert chain.forks == []
    if case["name"] in NOT_WELL_FORMED:
        assert candidate.problems()
        assert all(p.startswith("not well-formed: ") for p in problems)


@pytest.mark.parametrize("case", TRANSITION_CASES)
def test_transition_case_from_json(case):
    """A statement that is not well-formed is refused as soon as it is read, naming what is wrong."""
    raw = case["epoch"]
    if case["name"] in NOT_WELL_FORMED:
        with pytest.raises(EpochError) as info:
            Epoch.from_json(raw, CHAIN_ID, TICK_MS)
        assert "not well-formed" in str(info.value)
        assert TRANSITION_PROBLEMS[case["name"]] in str(info.value)
    else:
        assert Epoch.from_json(raw, CHAIN_ID, TICK_MS) == _fields(raw)


@pytest.mark.parametrize("case", TRANSITION_CASES)
def test_transition_case_signatures_from_the_seeds(case):
    """Every signature in a case is a seed's signature over the case's own statement or over epoch 1."""
    candidate = _fields(case["epoch"])
    for pid, sig in candidate.signatures:
        made = {
            (kid, which)
            for kid, key in ALL_KEYS
            for which, message in (("own", candidate.message), ("epoch 1", E1.message))
            if kid == pid and key.sign(message) == sig
        }
        assert made, f"{case['name']}: the signature of {pid} is not reproduced from any seed"


def _other_epoch_1() -> Epoch:
    """Another valid statement for epoch 1 (a later from_cycle), signed by every peer."""
    fields = {k: v for k, v in E1.to_json().items() if k != "epoch_hash"}
    other = Epoch.from_json({**fields, "from_cycle": E1.from_cycle + 5, "signatures": []})
    for pid, key in KEYS1.items():
        other = other.signed_by(pid, key)
    return other


def test_a_second_valid_epoch_1_is_a_fork():
    other = _other_epoch_1()
    assert transition_problems(E0, other) == []
    chain = build_chain(E0, [E1, other, E2])
    assert chain.epochs == [E0]
    assert len(chain.forks) == 1
    fork = chain.forks[0]
    assert fork.number == 1
    assert set(fork.hashes) == {E1.epoch_hash, other.epoch_hash}
    assert fork.peers == ("peer-a", "peer-b", "peer-c", "peer-d")
    assert fork.from_cycle == E1.from_cycle
    assert chain.forked_from() == E1.from_cycle
    assert chain.problem_for_cycle(E1.from_cycle - 1) is None
    assert "forked" in chain.problem_for_cycle(E1.from_cycle)


@pytest.mark.parametrize("case", [pytest.param(c, id=f"cycle{c['cycle']}") for c in EPOCHS["epoch_of_cycle"]])
def test_epoch_of_cycle(case):
    assert CHAIN.for_cycle(case["cycle"]).number == case["epoch"]
    assert CHAIN.for_cycle(case["cycle"]) == BY_NUMBER[case["epoch"]]
    assert CHAIN.by_number(case["epoch"]) == BY_NUMBER[case["epoch"]]


# -- votes ----------------------------------------------------------------------------------


def test_votes_entry_hash_is_the_first_entry():
    assert VOTES["entry_hash"] == VECTORS["entries"][0]["entry_hash"]


def test_signed_message_epoch0():
    message = vote_message(E0.epoch_hash, ENTRY_HASH)
    assert message.hex() == VOTES["signed_message_epoch0"]
    assert message == b"knhk-vote/2" + E0.epoch_hash + ENTRY_HASH
    assert len(message) == 11 + 32 + 32


@pytest.mark.parametrize(
    ("epoch", "keys", "name"),
    [
        pytest.param(E0, KEYS0, "signatures_epoch0", id="epoch0"),
        pytest.param(E1, KEYS1, "signatures_epoch1", id="epoch1"),
    ],
)
def test_vote_signatures_from_the_seeds(epoch, keys, name):
    expected = VOTES[name]
    assert set(expected) == set(keys)
    for pid, key in keys.items():
        sig = sign(key, epoch.epoch_hash, ENTRY_HASH)
        assert sig.hex() == expected[pid]
        assert key.sign(vote_message(epoch.epoch_hash, ENTRY_HASH)) == sig
        assert verify_vote(epoch.public_keys[pid], epoch.epoch_hash, ENTRY_HASH, sig)
        other = E1 if epoch is E0 else E0
        assert not verify_vote(epoch.public_keys[pid], other.epoch_hash, ENTRY_HASH, sig)
        assert not verify_vote(epoch.public_keys[pid], epoch.epoch_hash, ZERO_HASH, sig)


def test_rotated_key_signs_differently():
    assert VOTES["signatures_epoch0"]["peer-d"] != VOTES["signatures_epoch1"]["peer-d"]
    old_key_in_epoch1 = sign(KEYS0["peer-d"], E1.epoch_hash, ENTRY_HASH)
    assert not verify_vote(E1.public_keys["peer-d"], E1.epoch_hash, ENTRY_HASH, old_key_in_epoch1)


QUORUM_CASES = [pytest.param(c, id=_name_id(c["name"])) for c in VOTES["quorum_cases"]]


@pytest.mark.parametrize("case", QUORUM_CASES)
def test_quorum_case(case):
    epoch = BY_NUMBER[case["epoch"]]
    votes = [(v["peer_id"], bytes.fromhex(v["signature"])) for v in case["votes"]]
    result = check_quorum(ENTRY_HASH, votes, epoch)
    assert result.valid is case["valid"]
    assert len(set(result.signers)) == len(result.signers)
    assert set(result.signers) <= set(epoch.public_keys)
    assert len(result.signers) + len(result.rejected) == len(votes)
    if case["valid"]:
        assert len(result.signers) >= epoch.threshold
        assert result.problems == ()
    else:
        assert len(result.signers) < epoch.threshold
        assert result.rejected
        assert f"threshold {epoch.threshold}" in result.problems[-1]


def test_quorum_case_reasons():
    by_name = {c["name"]: c for c in VOTES["quorum_cases"]}

    def check(name: str):
        c = by_name[name]
        votes = [(v["peer_id"], bytes.fromhex(v["signature"])) for v in c["votes"]]
        return check_quorum(ENTRY_HASH, votes, BY_NUMBER[c["epoch"]])

    assert check("epoch 0: one peer three times").signers == ("peer-a",)
    assert all("repeated peer" in r for r in check("epoch 0: one peer three times").rejected)
    forged = check("epoch 0: two valid and one forged")
    assert forged.signers == ("peer-a", "peer-b")
    assert "bad signature" in forged.rejected[0]
    assert check("epoch 0: S + L (non-canonical) does not count").signers == ("peer-b", "peer-c")
    assert check("epoch 1: d with its retired key does not count").signers == ("peer-a", "peer-b")
    assert check("epoch 1: epoch 0 signatures do not count").signers == ()


def test_s_plus_l_is_the_same_signature_otherwise():
    """The S + L case is the valid signature of peer-a with L added to S: only the S < L rule refuses it."""
    case = next(c for c in VOTES["quorum_cases"] if "S + L" in c["name"])
    malleated = bytes.fromhex(case["votes"][0]["signature"])
    good = bytes.fromhex(VOTES["signatures_epoch0"]["peer-a"])
    assert malleated[:32] == good[:32]
    assert int.from_bytes(malleated[32:], "little") == int.from_bytes(good[32:], "little") + ORDER
    assert not verify_signature(E0.public_keys["peer-a"], vote_message(E0.epoch_hash, ENTRY_HASH), malleated)


@pytest.mark.parametrize(
    ("n", "t"), [pytest.param(int(n), t, id=f"n{n}") for n, t in VOTES["default_thresholds"].items()]
)
def test_default_threshold(n, t):
    assert default_threshold(n) == t
    assert threshold_problem(t, n) is None
    check_threshold(t, n)  # the default is always a valid threshold
    assert threshold_problem(n // 2, n) is not None
    assert threshold_problem(n + 1, n) is not None


# -- public keys ----------------------------------------------------------------------------

KEY_CASES = [pytest.param(c, id=f"{c['public_key'][:8]}..{c['public_key'][-4:]}") for c in VECTORS["public_keys"]]


@pytest.mark.parametrize("case", KEY_CASES)
def test_public_key_rule(case):
    raw = bytes.fromhex(case["public_key"])
    if case["accepted"]:
        assert key_problem(raw) is None
        assert parse_public_key(case["public_key"]) == raw
    else:
        assert key_problem(raw)
        with pytest.raises(ValueError, match="public_key"):
            parse_public_key(case["public_key"])


@pytest.mark.parametrize("case", [c for c in KEY_CASES if not c.values[0]["accepted"]])
def test_refused_key_never_verifies_and_is_not_well_formed(case):
    raw = bytes.fromhex(case["public_key"])
    message = vote_message(E0.epoch_hash, ENTRY_HASH)
    identity = (1).to_bytes(32, "little")  # the encoding of the neutral point
    for sig in (identity + bytes(32), bytes(64), raw + bytes(32)):
        assert not verify_signature(raw, message, sig)
    peers = (*E0.peers[:3], Peer("peer-z", raw))
    bad = Epoch(CHAIN_ID, TICK_MS, 0, 0, 3, "canonical@1", 1024, peers)
    assert any("peer-z" in p for p in bad.problems())


# -- chain settings with [[epochs]] ---------------------------------------------------------


def _toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _settings_toml(epochs: list[dict]) -> str:
    """Settings written by hand from the vector: epoch 0's fields on top, later epochs as [[epochs]]."""
    raw0 = EPOCHS["epochs"][0]
    lines = [
        f'chain_id = "{CHAIN_ID}"',
        f"tick_ms = {TICK_MS}",
        f"threshold = {raw0['threshold']}",
        f'hook = "{raw0["hook"]}"',
        f"max_triples = {raw0['max_triples']}",
    ]
    for p in raw0["peers"]:
        lines += ["", "[[peers]]", f'id = "{p["id"]}"', f'public_key = "{p["public_key"]}"']
    for raw in epochs:
        lines += ["", "[[epochs]]"] + [f"{k} = {_toml_value(v)}" for k, v in raw.items()]
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chain.toml"
    path.write_text(text, "utf-8")
    return path


def _check_vector_settings(s: ChainSettings) -> None:
    assert s.genesis == E0
    assert s.genesis.epoch_hash.hex() == EPOCHS["epochs"][0]["epoch_hash"]
    assert s.epoch_chain.epochs == [E0, E1, E2]
    assert s.epoch_chain.refused == []
    for case in EPOCHS["epoch_of_cycle"]:
        assert s.epoch_for(case["cycle"]) == BY_NUMBER[case["epoch"]]
    assert s.epoch_for(2000000000).public_keys["peer-d"] == public_key_bytes(KEY_D1)
    assert s.epoch_for(2000100000).max_triples == 2048


def test_settings_with_epochs_by_hand(tmp_path):
    s = ChainSettings.from_toml(_write(tmp_path, _settings_toml(EPOCHS["epochs"][1:])))
    assert s.epochs == (E1, E2)
    _check_vector_settings(s)


def test_settings_with_epochs_to_toml_round_trip(tmp_path):
    s = ChainSettings(E0.peers, E0.threshold, CHAIN_ID, TICK_MS, E0.max_triples, E0.hook, epochs=(E1, E2))
    _check_vector_settings(s)
    text = s.to_toml()
    again = ChainSettings.from_toml(_write(tmp_path, text))
    assert again == s
    assert again.to_toml() == text
    _check_vector_settings(again)


def test_settings_with_epochs_later_added():
    s = ChainSettings(E0.peers, E0.threshold, CHAIN_ID, TICK_MS, E0.max_triples, E0.hook)
    assert s.epoch_for(2**64 - 1) == E0
    more = s.with_epochs([E2, E1, E0])
    assert more.epochs == (E2, E1)
    _check_vector_settings(more)
    assert more.with_epochs([E1]) is more  # nothing new


def test_settings_with_epochs_drops_duplicates_among_the_new_ones():
    s = ChainSettings(E0.peers, E0.threshold, CHAIN_ID, TICK_MS, E0.max_triples, E0.hook)
    assert s.with_epochs([E1, E1, E2]).epochs == (E1, E2)


def test_settings_processor_per_epoch():
    s = ChainSettings(E0.peers, E0.threshold, CHAIN_ID, TICK_MS, E0.max_triples, E0.hook, epochs=(E1, E2))
    assert s.processor_for(E0).max_triples == 1024
    assert s.processor_for(E2).max_triples == 2048
    assert s.processor_for(E2) is s.processor_for(E2)  # built once per epoch


def _changed(number: int, **fields) -> list[dict]:
    """The vector's epochs 1 and 2, with fields of epoch `number` changed."""
    out = [dict(raw) for raw in EPOCHS["epochs"][1:]]
    out[number - 1].update(fields)
    return [{k: v for k, v in raw.items() if v is not None} for raw in out]


@pytest.mark.parametrize(
    ("epochs", "field", "words"),
    [
        pytest.param(_changed(1, max_triples=0, epoch_hash=None), "epochs[0]", "max_triples 0", id="max-triples"),
        pytest.param(_changed(1, hook="", epoch_hash=None), "epochs[0]", "hook", id="empty-hook"),
        pytest.param(_changed(2, threshold=1, epoch_hash=None), "epochs[1]", "threshold 1", id="threshold"),
        pytest.param(_changed(1, from_cycle=7), "epochs[0]", "epoch_hash", id="changed-after-signing"),
        pytest.param(_changed(1, colour="red"), "epochs[0]", "colour", id="unknown-field"),
        pytest.param(_changed(1, threshold="3"), "epochs[0]", "threshold", id="threshold-string"),
        pytest.param(_changed(1, prev_epoch_hash="00"), "epochs[0]", "prev_epoch_hash", id="short-prev-hash"),
        pytest.param(_changed(1, chain_id="other", epoch_hash=None), "epochs[0]", "chain_id", id="other-chain-id"),
        pytest.param(_changed(1, tick_ms=50, epoch_hash=None), "epochs[0]", "tick_ms", id="other-tick-ms"),
        pytest.param(_changed(1, signatures=[]), "epochs (epoch 1)", "signed by 0 peer(s) of epoch 0", id="unsigned"),
        pytest.param(
            _changed(1, signatures=EPOCHS["epochs"][1]["signatures"][:2]),
            "epochs (epoch 1)",
            "signed by 2",
            id="two-sigs",
        ),
        pytest.param(EPOCHS["epochs"][2:], "epochs (epoch 2)", "does not follow a valid epoch", id="no-epoch-1"),
    ],
)
def test_settings_refuse_a_bad_epoch(tmp_path, epochs, field, words):
    with pytest.raises(SettingsError) as info:
        ChainSettings.from_toml(_write(tmp_path, _settings_toml(epochs)))
    assert info.value.field == field
    message = str(info.value).replace(str(tmp_path), "")  # the path holds the test's name
    assert f": {field}: " in message
    assert words in message


def _table(epoch: Epoch) -> dict:
    return {k: v for k, v in epoch.to_json().items() if k not in ("chain_id", "tick_ms")}


def test_settings_refuse_forked_epochs(tmp_path):
    epochs = [EPOCHS["epochs"][1], _table(_other_epoch_1())]
    with pytest.raises(SettingsError) as info:
        ChainSettings.from_toml(_write(tmp_path, _settings_toml(epochs)))
    message = str(info.value).replace(str(tmp_path), "")
    assert info.value.field == "epochs"
    assert "two different valid statements for epoch 1" in message
    assert "forked" in message


def test_settings_refuse_forked_epochs_saying_so_when_later_epochs_follow(tmp_path):
    """The cause is the fork at epoch 1, not epoch 2 (which is refused only because the chain stops there)."""
    epochs = [*EPOCHS["epochs"][1:], _table(_other_epoch_1())]
    with pytest.raises(SettingsError) as info:
        ChainSettings.from_toml(_write(tmp_path, _settings_toml(epochs)))
    message = str(info.value).replace(str(tmp_path), "")  # the path holds the test's name
    assert info.value.field == "epochs", message
    assert "two different valid statements for epoch 1" in message

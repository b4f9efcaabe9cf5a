"""Unit tests of the pure core: settings, quorum collection, keys, receipts and hooks."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from knhk_stream.protocol.decode import Delta, Triple, encode_json
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.hooks import CANONICAL, Hook, HookError, canonical, encode_actions, load_hook
from knhk_stream.protocol.quorum import (
    Equivocation,
    QuorumCollector,
    Vote,
    VoteStatus,
    check_threshold,
    key_from_seed,
    load_private_key,
    parse_public_key,
    public_key_bytes,
    save_private_key,
    sign,
    verify_signature,
)
from knhk_stream.protocol.receipts import APPLIED, RECEIPT_SIZE, REJECTED, DeltaProcessor, Receipt, rejected_a_hash
from knhk_stream.protocol.settings import ChainSettings, Peer, SettingsError

SEEDS = {f"peer-{c}": bytes([i + 1]) * 32 for i, c in enumerate("abcd")}
KEYS = {pid: key_from_seed(seed) for pid, seed in SEEDS.items()}
PUBS = {pid: public_key_bytes(k) for pid, k in KEYS.items()}

# y = 2 is not the y-coordinate of any point of edwards25519 ((y^2-1)/(d y^2+1) is not a square).
NOT_A_POINT = (2).to_bytes(32, "little").hex()


def _peers_toml(peers: dict[str, bytes] = PUBS) -> str:
    return "".join(f'\n[[peers]]\nid = "{pid}"\npublic_key = "{pub.hex()}"\n' for pid, pub in peers.items())


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chain.toml"
    path.write_text(text, "utf-8")
    return path


# -- settings -------------------------------------------------------------------------------


def test_settings_valid_file_defaults(tmp_path):
    s = ChainSettings.from_toml(_write(tmp_path, _peers_toml()))
    assert s.threshold == 3
    assert s.chain_id == "knhk"
    assert s.tick_ms == 125
    assert s.max_triples == 1024
    assert s.hook == CANONICAL
    assert s.hook_entrypoint is None
    assert s.public_keys == PUBS
    assert [p.id for p in s.peers] == list(PUBS)
    assert s.start_offset(0) == 0
    assert s.load_hook().name == CANONICAL


def test_settings_all_fields(tmp_path):
    text = (
        'chain_id = "orders-eu"\ntick_ms = 50\nmax_triples = 10\nhook = "upper@2"\n'
        'hook_entrypoint = "tests.support.hooks_example:upper"\nthreshold = 4\n'
        "[start_offset]\n0 = 100\n3 = 7\n" + _peers_toml()
    )
    s = ChainSettings.from_toml(_write(tmp_path, text))
    assert (s.chain_id, s.tick_ms, s.max_triples, s.threshold) == ("orders-eu", 50, 10, 4)
    assert s.start_offset(0) == 100
    assert s.start_offset(3) == 7
    assert s.start_offset(1) == 0
    hook = s.load_hook()
    assert hook.name == "upper@2"
    assert hook.hook_id == H(b"upper@2")


@pytest.mark.parametrize(("n", "threshold"), [(1, 1), (4, 3), (7, 5), (10, 7)])
def test_settings_default_threshold(tmp_path, n, threshold):
    peers = {f"p{i}": public_key_bytes(key_from_seed(bytes([100 + i]) * 32)) for i in range(n)}
    assert ChainSettings.from_toml(_write(tmp_path, _peers_toml(peers))).threshold == threshold


def _error(tmp_path: Path, text: str) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        ChainSettings.from_toml(_write(tmp_path, text))
    return info.value


@pytest.mark.parametrize("threshold", [0, 1, 2, 5, -1])
def test_settings_wrong_threshold(tmp_path, threshold):
    err = _error(tmp_path, f"threshold = {threshold}\n" + _peers_toml())
    assert err.field == "threshold"
    assert "threshold" in str(err)
    assert "3 to 4" in str(err)  # says what would work for 4 peers


@pytest.mark.parametrize("literal", ['"3"', "3.0", "true"])
def test_settings_threshold_must_be_an_integer(tmp_path, literal):
    err = _error(tmp_path, f"threshold = {literal}\n" + _peers_toml())
    assert err.field == "threshold"
    assert "integer" in str(err)


def test_settings_valid_thresholds_accepted(tmp_path):
    for t in (3, 4):
        assert ChainSettings.from_toml(_write(tmp_path, f"threshold = {t}\n" + _peers_toml())).threshold == t


def test_settings_duplicate_peer_id(tmp_path):
    text = _peers_toml() + f'\n[[peers]]\nid = "peer-b"\npublic_key = "{"ab" * 32}"\n'
    err = _error(tmp_path, text)
    assert err.field == "peers[4].id"
    assert "peers[4].id" in str(err)
    assert "duplicate" in str(err)
    assert "peer-b" in str(err)


def test_settings_reused_key(tmp_path):
    text = _peers_toml() + f'\n[[peers]]\nid = "peer-e"\npublic_key = "{PUBS["peer-a"].hex()}"\n'
    err = _error(tmp_path, text)
    assert err.field == "peers[4].public_key"


@pytest.mark.parametrize(
    ("key", "words"),
    [
        pytest.param("zz" * 32, "not hex", id="not-hex"),
        pytest.param("ab" * 31, "32 bytes", id="too-short"),
        pytest.param("ab" * 33, "32 bytes", id="too-long"),
        pytest.param("", "32 bytes", id="empty"),
    ],
)
def test_settings_bad_public_key(tmp_path, key, words):
    peers = _peers_toml({"peer-a": PUBS["peer-a"], "peer-b": PUBS["peer-b"]})
    text = peers + f'\n[[peers]]\nid = "peer-x"\npublic_key = "{key}"\n'
    err = _error(tmp_path, text)
    assert err.field == "peers[2].public_key"
    assert "peers[2].public_key" in str(err)
    assert words in str(err)
    assert "peer-x" in str(err)


def test_settings_public_key_not_a_string(tmp_path):
    err = _error(tmp_path, '[[peers]]\nid = "peer-a"\npublic_key = 12\n')
    assert err.field == "peers[0].public_key"


def test_settings_public_key_not_a_point(tmp_path):
    text = _peers_toml({"peer-a": PUBS["peer-a"]}) + f'\n[[peers]]\nid = "peer-x"\npublic_key = "{NOT_A_POINT}"\n'
    err = _error(tmp_path, text)
    assert err.field == "peers[1].public_key"


def test_parse_public_key_accepts_real_keys():
    for pub in PUBS.values():
        assert parse_public_key(pub.hex()) == pub
        assert parse_public_key(pub.hex().upper()) == pub


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param('hook = "other@1"\n', "hook", id="unknown-hook"),
        pytest.param('hook = "canonical"\n', "hook", id="hook-without-version"),
        pytest.param("hook = 1\n", "hook", id="hook-not-a-string"),
        pytest.param(
            'hook = "x@1"\nhook_entrypoint = "tests.support.hooks_example:nope"\n', "hook_entrypoint", id="no-function"
        ),
        pytest.param(
            'hook = "x@1"\nhook_entrypoint = "no_such_module_knhk:f"\n', "hook_entrypoint", id="no-module"
        ),
        pytest.param('hook = "x@1"\nhook_entrypoint = "tests.support.hooks_example"\n', "hook_entrypoint", id="no-colon"),
        pytest.param("tick_ms = 0\n", "tick_ms", id="tick-zero"),
        pytest.param('tick_ms = "125"\n', "tick_ms", id="tick-string"),
        pytest.param("max_triples = -1\n", "max_triples", id="max-triples-negative"),
        pytest.param("colour = 3\n", "colour", id="unknown-field"),
        pytest.param("thresold = 3\n", "thresold", id="misspelt-field"),
        pytest.param('chain_id = ""\n', "chain_id", id="empty-chain-id"),
        pytest.param(f'chain_id = "{"x" * 65}"\n', "chain_id", id="long-chain-id"),
        pytest.param(f'chain_id = "{"é" * 33}"\n', "chain_id", id="chain-id-66-utf8-bytes"),
        pytest.param("chain_id = 7\n", "chain_id", id="chain-id-not-a-string"),
        pytest.param("[start_offset]\nx = 1\n", "start_offset.x", id="start-offset-shard"),
        pytest.param("[start_offset]\n0 = -5\n", "start_offset.0", id="start-offset-negative"),
        pytest.param("start_offset = 3\n", "start_offset", id="start-offset-not-a-table"),
    ],
)
def test_settings_field_errors(tmp_path, text, field):
    err = _error(tmp_path, text + _peers_toml())
    assert err.field == field
    assert f": {field}: " in str(err)
    assert str(tmp_path / "chain.toml") in str(err)  # names the file too


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("", "peers", id="no-peers"),
        pytest.param("peers = []\n", "peers", id="empty-peers"),
        pytest.param("peers = [1]\n", "peers[0]", id="peer-not-a-table"),
        pytest.param(f'[[peers]]\npublic_key = "{PUBS["peer-a"].hex()}"\n', "peers[0].id", id="peer-no-id"),
        pytest.param(f'[[peers]]\nid = ""\npublic_key = "{PUBS["peer-a"].hex()}"\n', "peers[0].id", id="empty-id"),
        pytest.param(
            f'[[peers]]\nid = "{"p" * 65}"\npublic_key = "{PUBS["peer-a"].hex()}"\n', "peers[0].id", id="long-id"
        ),
    ],
)
def test_settings_peer_errors(tmp_path, text, field):
    err = _error(tmp_path, text)
    assert err.field == field


def test_settings_start_offset_non_ascii_digit(tmp_path):
    err = _error(tmp_path, '[start_offset]\n"²" = 5\n' + _peers_toml())
    assert err.field == "start_offset.²"


def test_settings_chain_id_limits(tmp_path):
    for cid in ("x", "x" * 64, "é" * 32):
        assert ChainSettings.from_toml(_write(tmp_path, f'chain_id = "{cid}"\n' + _peers_toml())).chain_id == cid


def test_settings_file_errors(tmp_path):
    with pytest.raises(SettingsError) as info:
        ChainSettings.from_toml(tmp_path / "missing.toml")
    assert info.value.field == "file"
    err = _error(tmp_path, "this is = = not toml")
    assert err.field == "file"
    assert "TOML" in str(err)


def _settings(**kw) -> ChainSettings:
    peers = tuple(Peer(pid, pub) for pid, pub in PUBS.items())
    return ChainSettings(peers=peers, threshold=kw.pop("threshold", 3), **kw)


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "chain_id": 'we"ird\\id ü',
                "tick_ms": 7,
                "max_triples": 3,
                "hook": "upper@1",
                "hook_entrypoint": "tests.support.hooks_example:upper",
                "threshold": 4,
                "start_offsets": {0: 5, 12: 900},
            },
            id="everything",
        ),
    ],
)
def test_settings_to_toml_round_trip(tmp_path, kw):
    s = _settings(**kw)
    text = s.to_toml()
    tomllib.loads(text)
    again = ChainSettings.from_toml(_write(tmp_path, text))
    assert again == s
    assert again.to_toml() == text


def test_settings_to_toml_round_trip_astral_chain_id(tmp_path):
    s = _settings(chain_id="chain-\U0001f600")
    again = ChainSettings.from_toml(_write(tmp_path, s.to_toml()))
    assert again == s


# -- quorum collector -----------------------------------------------------------------------


def _entry(cycle: int = 10, root: bytes = b"r", shard: int = 0, prev: bytes = ZERO_HASH) -> Entry:
    return Entry("knhk", shard, cycle, H(root), 3, 100, 110, prev)


def _vote(pid: str, entry: Entry, key=None) -> Vote:
    return Vote(entry, pid, sign(key or KEYS[pid], entry.entry_hash), 1)


def test_collector_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        QuorumCollector(PUBS, 2)
    with pytest.raises(ValueError, match="threshold"):
        QuorumCollector(PUBS, 5)


def test_check_threshold_bounds():
    check_threshold(3, 4)
    check_threshold(4, 4)
    check_threshold(1, 1)
    for t, n in ((2, 4), (5, 4), (0, 1), (3, 6)):
        with pytest.raises(ValueError):
            check_threshold(t, n)


def test_collector_quorum_exactly_once():
    c = QuorumCollector(PUBS, 3)
    e = _entry()
    assert c.quorum(0, 10) is None
    assert c.add(_vote("peer-a", e)) is VoteStatus.COUNTED
    assert c.add(_vote("peer-b", e)) is VoteStatus.COUNTED
    assert c.quorum(0, 10) is None
    assert c.add(_vote("peer-c", e)) is VoteStatus.QUORUM
    assert c.add(_vote("peer-d", e)) is VoteStatus.COUNTED
    entry, votes = c.quorum(0, 10)
    assert entry == e
    assert [v.peer_id for v in votes] == ["peer-a", "peer-b", "peer-c", "peer-d"]
    assert all(verify_signature(PUBS[v.peer_id], e.entry_hash, v.signature) for v in votes)
    assert not c.stuck(0, 10)
    assert c.equivocations == []


def test_collector_rounds_are_separate():
    c = QuorumCollector(PUBS, 3)
    e10, e11, other_shard = _entry(10), _entry(11), _entry(10, shard=1)
    for pid in ("peer-a", "peer-b"):
        assert c.add(_vote(pid, e10)) is VoteStatus.COUNTED
        assert c.add(_vote(pid, e11)) is VoteStatus.COUNTED
        assert c.add(_vote(pid, other_shard)) is VoteStatus.COUNTED
    assert c.add(_vote("peer-c", e11)) is VoteStatus.QUORUM
    assert c.quorum(0, 10) is None
    assert c.quorum(1, 10) is None
    assert c.quorum(0, 11)[0] == e11
    assert c.equivocations == []


def test_collector_ignores_unknown_bad_and_repeated():
    c = QuorumCollector(PUBS, 3)
    e = _entry()
    stranger = key_from_seed(b"\x77" * 32)
    assert c.add(_vote("peer-x", e, stranger)) is VoteStatus.UNKNOWN_PEER
    # A known peer id with somebody else's signature, a garbage signature, a signature over another entry.
    assert c.add(_vote("peer-a", e, stranger)) is VoteStatus.BAD_SIGNATURE
    assert c.add(Vote(e, "peer-a", bytes(64))) is VoteStatus.BAD_SIGNATURE
    assert c.add(Vote(e, "peer-a", b"short")) is VoteStatus.BAD_SIGNATURE
    assert c.add(Vote(e, "peer-a", sign(KEYS["peer-a"], _entry(root=b"other").entry_hash))) is (
        VoteStatus.BAD_SIGNATURE
    )
    assert c.add(_vote("peer-a", e)) is VoteStatus.COUNTED
    assert c.add(_vote("peer-a", e)) is VoteStatus.REPEATED
    assert c.add(_vote("peer-a", e)) is VoteStatus.REPEATED
    assert c.add(_vote("peer-b", e)) is VoteStatus.COUNTED
    assert c.add(_vote("peer-b", e)) is VoteStatus.REPEATED
    assert c.quorum(0, 10) is None
    assert set(c.votes(0, 10)[e.entry_hash]) == {"peer-a", "peer-b"}
    assert c.add(_vote("peer-c", e)) is VoteStatus.QUORUM
    assert c.equivocations == []


def test_collector_equivocation_kept_as_evidence():
    c = QuorumCollector(PUBS, 3)
    good, evil = _entry(root=b"good"), _entry(root=b"evil")
    first = _vote("peer-a", good)
    second = _vote("peer-a", evil)
    assert c.add(first) is VoteStatus.COUNTED
    assert c.add(second) is VoteStatus.EQUIVOCATION
    assert c.equivocations == [Equivocation("peer-a", 0, 10, first, second)]
    # The second vote is not counted for its entry hash.
    assert evil.entry_hash not in c.votes(0, 10)
    assert c.add(_vote("peer-b", evil)) is VoteStatus.COUNTED
    assert c.add(_vote("peer-c", evil)) is VoteStatus.COUNTED  # would be QUORUM had peer-a counted
    assert c.quorum(0, 10) is None
    assert set(c.votes(0, 10)[evil.entry_hash]) == {"peer-b", "peer-c"}
    # Seeing the same equivocation again does not duplicate the evidence.
    assert c.add(second) is VoteStatus.EQUIVOCATION
    assert len(c.equivocations) == 1
    # A forged second vote is no evidence.
    assert c.add(Vote(_entry(root=b"third"), "peer-a", bytes(64))) is VoteStatus.BAD_SIGNATURE
    assert len(c.equivocations) == 1
    assert c.add(_vote("peer-d", evil)) is VoteStatus.QUORUM


def test_collector_stuck_when_two_dissent():
    c = QuorumCollector(PUBS, 3)
    h1, h2 = _entry(root=b"1"), _entry(root=b"2")
    c.add(_vote("peer-a", h1))
    assert not c.stuck(0, 10)
    c.add(_vote("peer-b", h1))
    c.add(_vote("peer-c", h2))
    assert not c.stuck(0, 10)  # peer-d can still bring h1 to 3
    c.add(_vote("peer-d", h2))
    assert c.stuck(0, 10)
    assert c.quorum(0, 10) is None


def test_collector_stuck_with_three_different_hashes():
    c = QuorumCollector(PUBS, 3)
    c.add(_vote("peer-a", _entry(root=b"1")))
    c.add(_vote("peer-b", _entry(root=b"2")))
    assert not c.stuck(0, 10)
    c.add(_vote("peer-c", _entry(root=b"3")))
    assert c.stuck(0, 10)


def test_collector_not_stuck_without_votes():
    c = QuorumCollector(PUBS, 3)
    assert not c.stuck(0, 10)
    c.add(_vote("peer-x", _entry(), key_from_seed(b"\x77" * 32)))
    assert not c.stuck(0, 10)


def test_collector_not_stuck_after_a_forged_vote():
    c = QuorumCollector(PUBS, 3)
    assert c.add(Vote(_entry(), "peer-a", bytes(64))) is VoteStatus.BAD_SIGNATURE
    assert not c.stuck(0, 10)


def test_collector_forget_until():
    c = QuorumCollector(PUBS, 3)
    for cycle in (8, 9, 10):
        for pid in ("peer-a", "peer-b", "peer-c"):
            c.add(_vote(pid, _entry(cycle)))
        c.add(_vote("peer-a", _entry(cycle, shard=1)))
    c.forget_until(0, 9)
    assert c.quorum(0, 8) is None
    assert c.quorum(0, 9) is None
    assert c.votes(0, 9) == {}
    assert c.quorum(0, 10) is not None
    assert c.votes(1, 8) != {}  # other shards untouched


# -- keys -----------------------------------------------------------------------------------


def test_save_private_key_mode_and_round_trip(tmp_path):
    path = tmp_path / "peer.pem"
    key = key_from_seed(b"\x42" * 32)
    old = os.umask(0)
    try:
        save_private_key(key, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(key)
    assert public_key_bytes(load_private_key(str(path))) == public_key_bytes(key)


def test_save_private_key_refuses_to_overwrite(tmp_path):
    path = tmp_path / "peer.pem"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        save_private_key(key_from_seed(b"\x01" * 32), path)
    assert path.read_bytes() == b"precious"
    path.chmod(0o644)
    save_private_key(key_from_seed(b"\x01" * 32), path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(path)) == PUBS["peer-a"]


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda h: h, id="bare"),
        pytest.param(lambda h: h + "\n", id="newline"),
        pytest.param(lambda h: f"  {h}  \n", id="spaces"),
        pytest.param(lambda h: h.upper(), id="upper-case"),
    ],
)
def test_load_private_key_hex_seed(tmp_path, layout):
    path = tmp_path / "seed.hex"
    path.write_text(layout(SEEDS["peer-c"].hex()))
    assert public_key_bytes(load_private_key(path)) == PUBS["peer-c"]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        pytest.param(b"not a key at all", "neither a PEM private key nor a hex seed", id="text"),
        pytest.param(b"\xff\xfe\x00garbage", "neither a PEM private key nor a hex seed", id="binary"),
        pytest.param(b"", "32 bytes", id="empty"),
        pytest.param(b"ab" * 31, "32 bytes", id="short-seed"),
        pytest.param(b"ab" * 33, "32 bytes", id="long-seed"),
    ],
)
def test_load_private_key_garbage(tmp_path, data, words):
    path = tmp_path / "key"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=words) as info:
        load_private_key(path)
    assert str(path) in str(info.value)


def test_load_private_key_rejects_other_key_types(tmp_path):
    path = tmp_path / "ec.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        load_private_key(path)


def test_load_private_key_broken_pem(tmp_path):
    path = tmp_path / "broken.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError):
        load_private_key(path)


def test_signatures_bind_key_and_entry():
    e = _entry().entry_hash
    sig = sign(KEYS["peer-a"], e)
    assert len(sig) == 64
    assert verify_signature(PUBS["peer-a"], e, sig)
    assert not verify_signature(PUBS["peer-b"], e, sig)
    assert not verify_signature(PUBS["peer-a"], H(b"x"), sig)
    assert not verify_signature(PUBS["peer-a"], e, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify_signature(b"short", e, sig)
    # A signature over the bare entry hash (no domain) is not a vote.
    assert not verify_signature(PUBS["peer-a"], e, KEYS["peer-a"].sign(e))


# -- receipts -------------------------------------------------------------------------------


def test_receipt_round_trip():
    r = Receipt(2**32 - 1, 2**64 - 1, 7, 123, REJECTED, 0, H(b"hook"), H(b"delta"), rejected_a_hash("empty"))
    data = r.to_bytes()
    assert len(data) == RECEIPT_SIZE == 123
    assert data[0] == 1
    assert Receipt.from_bytes(data) == r
    assert data[1:5] == b"\xff" * 4
    assert data[13] == 7


def test_receipt_from_bytes_errors():
    good = Receipt(1, 2, 3, 4, APPLIED, 5, H(b"a"), H(b"b"), H(b"c")).to_bytes()
    with pytest.raises(ValueError, match="123 bytes"):
        Receipt.from_bytes(good[:-1])
    with pytest.raises(ValueError, match="123 bytes"):
        Receipt.from_bytes(good + b"\x00")
    with pytest.raises(ValueError, match="version"):
        Receipt.from_bytes(b"\x02" + good[1:])


def test_processor_receipt_layout():
    proc = DeltaProcessor(load_hook(CANONICAL))
    value = encode_json(Delta((Triple("urn:s", "urn:p", "o"),), ()))
    r = Receipt.from_bytes(proc.receipt(9, 1234, 6, 555, value))
    assert (r.shard, r.cycle, r.tick, r.offset, r.status, r.lanes) == (9, 1234, 6, 555, APPLIED, 1)
    assert r.hook_id == H(b"canonical@1")
    assert r.delta_hash == H(value)
    assert r.a_hash == H(encode_actions([(1, "urn:s", "urn:p", "o", "")]))


# -- hooks ----------------------------------------------------------------------------------

DELTA = Delta(
    (Triple("urn:b", "urn:p", "x"), Triple("urn:a", "urn:p", "y", "urn:g"), Triple("urn:b", "urn:p", "x", "")),
    (Triple("urn:c", "urn:p", "z"),),
)


@pytest.mark.parametrize(
    ("name", "entrypoint", "words"),
    [
        pytest.param("canonical", None, "name@version", id="no-version"),
        pytest.param("bad name@1", None, "name@version", id="space"),
        pytest.param("a@b@c", None, "name@version", id="two-ats"),
        pytest.param("", None, "name@version", id="empty"),
        pytest.param("canonical@2", None, "unknown hook", id="unknown-version"),
        pytest.param("upper@1", None, "unknown hook", id="user-hook-without-entrypoint"),
        pytest.param("upper@1", "tests.support.hooks_example", "module:function", id="no-colon"),
        pytest.param("upper@1", ":upper", "module:function", id="no-module"),
        pytest.param("upper@1", "tests.support.hooks_example:", "module:function", id="no-function"),
        pytest.param("upper@1", "no_such_module_knhk:upper", "cannot import", id="missing-module"),
        pytest.param("upper@1", "tests.support.hooks_example:nope", "not a function", id="missing-function"),
        pytest.param("upper@1", "tests.support.hooks_example:NOT_CALLABLE", "not a function", id="not-callable"),
    ],
)
def test_load_hook_errors(name, entrypoint, words):
    with pytest.raises(ValueError, match=words):
        load_hook(name, entrypoint)


def test_canonical_hook():
    hook = load_hook(CANONICAL)
    assert hook.name == CANONICAL
    assert hook.hook_id == H(b"canonical@1")
    actions = canonical(DELTA)
    assert actions == [
        (1, "urn:a", "urn:p", "y", "urn:g"),
        (1, "urn:b", "urn:p", "x", ""),
        (2, "urn:c", "urn:p", "z", ""),
    ]
    lanes, encoded = hook.actions(DELTA)
    assert lanes == 3
    assert encoded == encode_actions(actions)


def test_canonical_sorts_by_utf8_bytes():
    # U+FFFD sorts before U+1F600 both as code points and as UTF-8 bytes (unlike UTF-16 order).
    delta = Delta((Triple("\U0001f600", "p", "o"), Triple("\ufffd", "p", "o"), Triple("z", "p", "o")), ())
    assert [a[1] for a in canonical(delta)] == ["z", "\ufffd", "\U0001f600"]


def test_encode_actions_bytes():
    assert encode_actions([(1, "s", "p", "ü", None)]) == (
        b"\x01" + b"\x00\x00\x00\x01s" + b"\x00\x00\x00\x01p" + b"\x00\x00\x00\x02\xc3\xbc" + b"\x00\x00\x00\x00"
    )
    assert encode_actions([(2, "s", "p", "o", "g")])[:1] == b"\x02"
    assert encode_actions([]) == b""
    assert encode_actions([[1, "s", "p", "o", ""]]) == encode_actions([(1, "s", "p", "o", "")])


@pytest.mark.parametrize(
    "action",
    [
        pytest.param((0, "s", "p", "o", ""), id="op-0"),
        pytest.param((3, "s", "p", "o", ""), id="op-3"),
        pytest.param((True, "s", "p", "o", ""), id="op-bool"),
        pytest.param((1.0, "s", "p", "o", ""), id="op-float"),
        pytest.param((1, "s", "p", "o"), id="four-fields"),
        pytest.param((1, "s", b"p", "o", ""), id="bytes-term"),
        pytest.param((1, "s", "p", 3, ""), id="int-term"),
        pytest.param("1spo", id="string"),
    ],
)
def test_encode_actions_rejects(action):
    with pytest.raises(HookError):
        encode_actions([action])


def test_user_hook_upper():
    hook = load_hook("upper@1", "tests.support.hooks_example:upper")
    assert isinstance(hook, Hook)
    assert hook.name == "upper@1"
    assert hook.hook_id == H(b"upper@1")
    lanes, encoded = hook.actions(DELTA)
    assert lanes == 4  # no sorting, no de-duplication: that is the hook's business
    assert encoded == encode_actions(
        [
            (1, "urn:b", "urn:p", "X", ""),
            (1, "urn:a", "urn:p", "Y", "urn:g"),
            (1, "urn:b", "urn:p", "X", ""),
            (2, "urn:c", "urn:p", "z", ""),
        ]
    )
    out = DeltaProcessor(hook).outcome(encode_json(DELTA))
    assert (out.status, out.lanes, out.code) == (APPLIED, 4, None)
    assert out.a_hash == H(encoded)


@pytest.mark.parametrize("fn", ["boom", "not_a_list", "bad_action"])
def test_user_hook_errors(fn):
    hook = load_hook("user@1", f"tests.support.hooks_example:{fn}")
    with pytest.raises(HookError):
        hook.actions(DELTA)
    value = encode_json(DELTA)
    out = DeltaProcessor(hook).outcome(value)
    assert (out.status, out.lanes, out.code) == (REJECTED, 0, "hook_error")
    assert out.a_hash == H(b"rejected:hook_error")
    assert out.delta_hash == H(value)
    assert out.reason
    # Same receipt however the exception is worded.
    assert DeltaProcessor(hook).receipt(1, 2, 3, 4, value) == DeltaProcessor(hook).receipt(1, 2, 3, 4, value)


def test_user_hook_with_surrogate_term_is_hook_error():
    hook = Hook("sur@1", lambda d: [(1, "\ud800", "p", "o", "")])
    with pytest.raises(HookError):
        hook.actions(DELTA)
    assert DeltaProcessor(hook).outcome(encode_json(DELTA)).code == "hook_error"


def test_decode_rejection_takes_precedence_over_hook():
    hook = load_hook("user@1", "tests.support.hooks_example:boom")
    out = DeltaProcessor(hook).outcome(b"{}")
    assert out.code == "empty"
    assert out.a_hash == H(b"rejected:empty")

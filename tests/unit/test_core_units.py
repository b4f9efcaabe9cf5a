"""Unit tests of the pure core: settings, quorum collection, a peer rejoining after a dissent, keys, receipts
and hooks."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from knhk_stream.protocol.consensus import Consensus
from knhk_stream.protocol.decode import Delta, Triple, encode_json
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.engine import PeerEngine, ResumePoint
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.epochs import Epoch, build_chain, genesis_epoch
from knhk_stream.protocol.hooks import CANONICAL, Hook, HookError, canonical, encode_actions, load_hook
from knhk_stream.protocol.keys import L
from knhk_stream.protocol.quorum import (
    WINDOW,
    Equivocation,
    QuorumCollector,
    Vote,
    VoteStatus,
    check_quorum,
    check_threshold,
    key_from_seed,
    load_private_key,
    parse_public_key,
    public_key_bytes,
    save_private_key,
    sign,
    verify_signature,
    verify_vote,
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
        pytest.param('hook = "x@1"\nhook_entrypoint = "no_such_module_knhk:f"\n', "hook_entrypoint", id="no-module"),
        pytest.param(
            'hook = "x@1"\nhook_entrypoint = "tests.support.hooks_example"\n', "hook_entrypoint", id="no-colon"
        ),
        pytest.param("tick_ms = 0\n", "tick_ms", id="tick-zero"),
        pytest.param('tick_ms = "125"\n', "tick_ms", id="tick-string"),
        pytest.param("max_triples = -1\n", "max_triples", id="max-triples-negative"),
        pytest.param("colour = 3\n", "colour", id="unknown-field"),
        pytest.param("thresold = 3\n", "thresold", id="misspelt-field"),
        pytest.param('chain_id = ""\n', "chain_id", id="empty-chain-id"),
        pytest.param(f'chain_id = "{"x" * 65}"\n', "chain_id", id="long-chain-id"),
        pytest.param(f'chain_id = "{"é" * 33}"\n', "chain_id", id="chain-id-66-utf8-bytes"),
        pytest.param("chain_id = 7\n", "chain_id", id="chain-id-not-a-string"),
        # Protocol "Chain settings": chain_id is 1..64 bytes of UTF-8 without {, } or / (it is in keys).
        pytest.param('chain_id = "a/b"\n', "chain_id", id="chain-id-slash"),
        pytest.param('chain_id = "{knhk}"\n', "chain_id", id="chain-id-braces"),
        pytest.param('chain_id = "knhk}"\n', "chain_id", id="chain-id-closing-brace"),
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


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"chain_id": "chain\x7f"}, id="chain-id"),
        pytest.param({"peers": (Peer("peer\x7f", PUBS["peer-a"]),), "threshold": 1}, id="peer-id"),
    ],
)
def test_settings_to_toml_round_trip_delete_character(tmp_path, kw):
    """U+007F is a valid id character, but TOML must escape it in a basic string."""
    s = _settings(**kw) if "peers" not in kw else ChainSettings(**kw)
    again = ChainSettings.from_toml(_write(tmp_path, s.to_toml()))
    assert again == s


# -- quorum collector -----------------------------------------------------------------------

GENESIS = genesis_epoch("knhk", 125, 3, CANONICAL, 1024, [Peer(pid, pub) for pid, pub in PUBS.items()])
ONE_EPOCH = build_chain(GENESIS, [])
ROTATED_D = key_from_seed(b"\x0d" * 32)
STRANGER = key_from_seed(b"\x77" * 32)
EPOCH1_FROM = 100  # epoch 1 (peer-d rotated its key) starts at this cycle


def _epoch1() -> Epoch:
    peers = tuple(Peer(pid, public_key_bytes(ROTATED_D) if pid == "peer-d" else pub) for pid, pub in PUBS.items())
    e = Epoch("knhk", 125, 1, EPOCH1_FROM, 3, CANONICAL, 1024, peers, GENESIS.epoch_hash)
    for pid in ("peer-a", "peer-b", "peer-c"):
        e = e.signed_by(pid, KEYS[pid])
    return e.signed_by("peer-d", ROTATED_D)


EPOCH1 = _epoch1()
TWO_EPOCHS = build_chain(GENESIS, [EPOCH1])
KEYS_OF = {0: KEYS, 1: {**KEYS, "peer-d": ROTATED_D}}


def test_two_epochs_chain():
    assert [e.number for e in TWO_EPOCHS.epochs] == [0, 1]
    assert TWO_EPOCHS.for_cycle(EPOCH1_FROM - 1) == GENESIS
    assert TWO_EPOCHS.for_cycle(EPOCH1_FROM) == EPOCH1


def _entry(cycle: int = 10, root: bytes = b"r", shard: int = 0, prev: bytes = ZERO_HASH) -> Entry:
    return Entry("knhk", shard, cycle, H(root), 3, 100, 110, prev)


def _vote(pid: str, entry: Entry, key=None, chain=ONE_EPOCH, epoch: int | None = None) -> Vote:
    """`pid`'s vote for `entry`, signed under the epoch of its cycle (or labelled another `epoch`)."""
    e = chain.for_cycle(entry.cycle)
    sig = sign(key or KEYS_OF[e.number][pid], e.epoch_hash, entry.entry_hash)
    return Vote(entry, pid, sig, 1, e.number if epoch is None else epoch)


def _collector(chain=ONE_EPOCH) -> QuorumCollector:
    return QuorumCollector(chain.for_cycle)


def _add(c: QuorumCollector, vote: Vote, head: bytes = ZERO_HASH, horizon: int | None = 10) -> VoteStatus:
    return c.add(vote, head, horizon)


def test_check_threshold_bounds():
    check_threshold(3, 4)
    check_threshold(4, 4)
    check_threshold(1, 1)
    for t, n in ((2, 4), (5, 4), (0, 1), (3, 6)):
        with pytest.raises(ValueError):
            check_threshold(t, n)


def test_collector_counted_and_quorum_exactly_once():
    c = _collector()
    e = _entry()
    assert c.quorum_after(0, ZERO_HASH, None) is None
    assert _add(c, _vote("peer-a", e)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-b", e)) is VoteStatus.COUNTED
    assert c.quorum_after(0, ZERO_HASH, None) is None
    assert _add(c, _vote("peer-c", e)) is VoteStatus.QUORUM
    assert _add(c, _vote("peer-d", e)) is VoteStatus.BEYOND_QUORUM  # not needed: neither verified nor counted
    entry, votes = c.quorum_after(0, ZERO_HASH, None)
    assert entry == e
    assert [v.peer_id for v in votes] == ["peer-a", "peer-b", "peer-c"]
    assert all(verify_vote(PUBS[v.peer_id], GENESIS.epoch_hash, e.entry_hash, v.signature) for v in votes)
    assert check_quorum(e.entry_hash, [(v.peer_id, v.signature) for v in votes], GENESIS).valid
    assert c.stuck_after(0, ZERO_HASH) is None
    assert c.equivocations == []
    assert set(c.successors(0, ZERO_HASH)) == {e.entry_hash}


def test_check_quorum_counts_pairs_the_caller_verified_without_checking_them_again():
    e = _entry()
    votes = [(v.peer_id, v.signature) for v in (_vote(p, e) for p in ("peer-a", "peer-b"))]
    forged = ("peer-c", bytes(64))
    assert not check_quorum(e.entry_hash, [*votes, forged], GENESIS).valid
    assert check_quorum(e.entry_hash, [*votes, forged], GENESIS, verified={forged}).valid  # taken as verified
    known = check_quorum(e.entry_hash, [*votes, ("peer-d", bytes(64))], GENESIS, verified=set(votes))
    assert not known.valid and "peer-d" in known.problems[0]  # what is not in `verified` is still checked


def test_collector_beyond_quorum_is_checked_once_it_could_be_evidence():
    """A vote after the quorum is not verified; should its peer sign another successor of the same
    entry, the vote kept aside is verified then, and the two are equivocation as before."""
    c = _collector()
    e, fork = _entry(), _entry(root=b"fork")
    for pid in ("peer-a", "peer-b", "peer-c"):
        _add(c, _vote(pid, e))
    assert _add(c, _vote("peer-d", e)) is VoteStatus.BEYOND_QUORUM
    assert _add(c, _vote("peer-d", e)) is VoteStatus.REPEATED
    assert _add(c, _vote("peer-d", fork)) is VoteStatus.EQUIVOCATION
    [ev] = c.take_equivocations()
    assert (ev.peer_id, ev.first.entry_hash, ev.second.entry_hash) == ("peer-d", e.entry_hash, fork.entry_hash)


def test_collector_a_forged_vote_beyond_quorum_is_no_evidence():
    """A forged vote kept aside after the quorum is dropped when checked: the peer's real vote counts."""
    c = _collector()
    e, other = _entry(), _entry(root=b"other")
    for pid in ("peer-a", "peer-b", "peer-c"):
        _add(c, _vote(pid, e))
    assert _add(c, Vote(e, "peer-d", bytes(64), 1, 0)) is VoteStatus.BEYOND_QUORUM
    assert _add(c, _vote("peer-d", other)) is VoteStatus.COUNTED
    assert c.take_equivocations() == []
    assert set(c.successors(0, ZERO_HASH)[other.entry_hash]) == {"peer-d"}


def test_collector_verified_votes_skip_the_signature_check():
    """`verified` is for this peer's own votes read back as signed: a caller that lies is believed, so the
    node passes it only for bytes it produced itself (PeerNode.vote_record)."""
    c = _collector()
    e = _entry()
    assert c.add(Vote(e, "peer-a", bytes(64), 1, 0), ZERO_HASH, 10) is VoteStatus.BAD_SIGNATURE
    assert c.add(_vote("peer-a", e), ZERO_HASH, 10, verified=True) is VoteStatus.COUNTED


def test_collector_repeated_vote_counts_once():
    c = _collector()
    e = _entry()
    assert _add(c, _vote("peer-a", e)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-a", e)) is VoteStatus.REPEATED
    assert _add(c, _vote("peer-a", e)) is VoteStatus.REPEATED
    assert _add(c, _vote("peer-b", e)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-b", e)) is VoteStatus.REPEATED
    assert set(c.successors(0, ZERO_HASH)[e.entry_hash]) == {"peer-a", "peer-b"}
    assert c.quorum_after(0, ZERO_HASH, None) is None
    assert _add(c, _vote("peer-c", e)) is VoteStatus.QUORUM
    assert c.equivocations == []


def test_collector_unknown_peer():
    c = _collector()
    e = _entry()
    assert _add(c, _vote("peer-x", e, STRANGER)) is VoteStatus.UNKNOWN_PEER
    assert _add(c, Vote(e, "", bytes(64))) is VoteStatus.UNKNOWN_PEER
    assert c.successors(0, ZERO_HASH) == {}
    assert c.stuck_after(0, ZERO_HASH) is None


def test_collector_bad_signatures_count_for_nothing():
    c = _collector()
    e = _entry()
    good = sign(KEYS["peer-a"], GENESIS.epoch_hash, e.entry_hash)
    s_plus_l = good[:32] + (int.from_bytes(good[32:], "little") + L).to_bytes(32, "little")
    forged = [
        sign(STRANGER, GENESIS.epoch_hash, e.entry_hash),  # somebody else's key
        bytes(64),
        b"short",
        good[:-1] + bytes([good[-1] ^ 1]),
        s_plus_l,  # the same signature with S + L: only S < L refuses it
        sign(KEYS["peer-a"], GENESIS.epoch_hash, _entry(root=b"other").entry_hash),  # another entry
        sign(KEYS["peer-a"], EPOCH1.epoch_hash, e.entry_hash),  # another epoch
        KEYS["peer-a"].sign(b"knhk-vote/1" + e.entry_hash),  # a version 1 vote
        KEYS["peer-a"].sign(e.entry_hash),  # no domain
    ]
    for sig in forged:
        assert _add(c, Vote(e, "peer-a", sig, 1, 0)) is VoteStatus.BAD_SIGNATURE
    assert c.successors(0, ZERO_HASH) == {}
    assert c.equivocations == []
    # None of them took peer-a's place: its real vote still counts, and a forged one for
    # another successor is no evidence of equivocation.
    assert _add(c, Vote(e, "peer-a", good, 1, 0)) is VoteStatus.COUNTED
    assert _add(c, Vote(_entry(root=b"third"), "peer-a", bytes(64), 1, 0)) is VoteStatus.BAD_SIGNATURE
    assert c.equivocations == []


def test_collector_wrong_epoch():
    c = _collector(TWO_EPOCHS)
    late, early = _entry(EPOCH1_FROM + 5), _entry(EPOCH1_FROM - 1, root=b"early")
    # The record names another epoch than the one of its cycle (whatever it signed).
    assert _add(c, _vote("peer-a", late, chain=TWO_EPOCHS, epoch=0), horizon=None) is VoteStatus.WRONG_EPOCH
    assert _add(c, _vote("peer-a", early, chain=TWO_EPOCHS, epoch=1), horizon=None) is VoteStatus.WRONG_EPOCH
    # Signed under epoch 0 but labelled as the epoch of its cycle: a bad signature.
    under0 = sign(KEYS["peer-b"], GENESIS.epoch_hash, late.entry_hash)
    assert _add(c, Vote(late, "peer-b", under0, 1, 1), horizon=None) is VoteStatus.BAD_SIGNATURE
    # peer-d's retired key does not count in epoch 1; its new key does.
    assert _add(c, _vote("peer-d", late, KEYS["peer-d"], TWO_EPOCHS), horizon=None) is VoteStatus.BAD_SIGNATURE
    assert _add(c, _vote("peer-d", late, chain=TWO_EPOCHS), horizon=None) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-a", late, chain=TWO_EPOCHS), horizon=None) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-b", late, chain=TWO_EPOCHS), horizon=None) is VoteStatus.QUORUM
    assert _add(c, _vote("peer-a", early, chain=TWO_EPOCHS), horizon=None) is VoteStatus.COUNTED
    entry, votes = c.quorum_after(0, ZERO_HASH, EPOCH1_FROM)
    assert entry == late
    assert [v.epoch for v in votes] == [1, 1, 1]
    assert check_quorum(late.entry_hash, [(v.peer_id, v.signature) for v in votes], EPOCH1).valid
    assert not check_quorum(late.entry_hash, [(v.peer_id, v.signature) for v in votes], GENESIS).valid


def test_collector_unlinked_votes_are_dropped_and_taken_when_they_fit():
    c = _collector()
    first = _entry(10)
    second = _entry(11, root=b"2", prev=first.entry_hash)
    nowhere = _entry(11, root=b"3", prev=H(b"nowhere"))
    assert _add(c, _vote("peer-a", nowhere)) is VoteStatus.UNLINKED
    assert _add(c, _vote("peer-a", second)) is VoteStatus.UNLINKED  # its predecessor is not held yet
    assert c.successors(0, first.entry_hash) == {}
    # A forged vote for the predecessor does not make it held.
    assert _add(c, Vote(first, "peer-b", bytes(64), 1, 0)) is VoteStatus.BAD_SIGNATURE
    assert _add(c, _vote("peer-a", second)) is VoteStatus.UNLINKED
    assert _add(c, _vote("peer-b", first)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-a", second)) is VoteStatus.COUNTED  # now it fits
    assert set(c.successors(0, first.entry_hash)[second.entry_hash]) == {"peer-a"}
    # Linking to the committed head (not zeros any more).
    head = H(b"head")
    assert _add(c, _vote("peer-c", _entry(12, prev=head))) is VoteStatus.UNLINKED
    assert _add(c, _vote("peer-c", _entry(12, prev=head)), head=head) is VoteStatus.COUNTED


def test_collector_out_of_window():
    c = _collector()
    edge, beyond = _entry(10 + WINDOW), _entry(11 + WINDOW, root=b"beyond")
    assert WINDOW == 64
    assert _add(c, _vote("peer-a", beyond), horizon=10) is VoteStatus.OUT_OF_WINDOW
    assert _add(c, _vote("peer-a", edge), horizon=10) is VoteStatus.COUNTED
    # Dropped, not held: what follows it does not link, and a wider horizon takes it later.
    after = _entry(12 + WINDOW, prev=beyond.entry_hash)
    assert _add(c, _vote("peer-b", beyond), horizon=10) is VoteStatus.OUT_OF_WINDOW
    assert _add(c, _vote("peer-c", after), horizon=20) is VoteStatus.UNLINKED
    assert _add(c, _vote("peer-b", beyond), horizon=20) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-c", after), horizon=20) is VoteStatus.COUNTED


def test_collector_equivocation_two_successors_whatever_their_cycles():
    c = _collector()
    good, evil = _entry(10, root=b"good"), _entry(12, root=b"evil")  # both follow the genesis zeros
    first, second = _vote("peer-a", good), _vote("peer-a", evil)
    assert _add(c, first) is VoteStatus.COUNTED
    assert _add(c, second) is VoteStatus.EQUIVOCATION
    assert c.equivocations == [Equivocation("peer-a", 0, ZERO_HASH, 0, first, second)]
    assert c.equivocations[0].cycle == 12
    # Both votes are evidence (both verify), but only the first counts.
    for v in (first, second):
        assert verify_vote(PUBS["peer-a"], GENESIS.epoch_hash, v.entry_hash, v.signature)
    assert "peer-a" not in c.successors(0, ZERO_HASH).get(evil.entry_hash, {})
    assert _add(c, _vote("peer-b", evil)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-c", evil)) is VoteStatus.COUNTED  # would be QUORUM had peer-a counted
    assert c.quorum_after(0, ZERO_HASH, None) is None
    # Seen again: no second piece of evidence. A forged third vote is no evidence at all.
    assert _add(c, second) is VoteStatus.EQUIVOCATION
    assert _add(c, Vote(_entry(11, root=b"third"), "peer-a", bytes(64), 1, 0)) is VoteStatus.BAD_SIGNATURE
    assert len(c.equivocations) == 1
    # A third valid successor is more evidence.
    third = _vote("peer-a", _entry(11, root=b"third"))
    assert _add(c, third) is VoteStatus.EQUIVOCATION
    assert [q.second for q in c.equivocations] == [second, third]
    assert _add(c, _vote("peer-d", evil)) is VoteStatus.QUORUM


def test_collector_equivocation_in_the_same_cycle():
    c = _collector()
    assert _add(c, _vote("peer-b", _entry(10, root=b"x"))) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-b", _entry(10, root=b"y"))) is VoteStatus.EQUIVOCATION
    assert [(q.peer_id, q.shard, q.epoch) for q in c.equivocations] == [("peer-b", 0, 0)]


def test_collector_no_equivocation_across_shards_or_epochs():
    c = _collector(TWO_EPOCHS)
    assert _add(c, _vote("peer-a", _entry(10), chain=TWO_EPOCHS)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-a", _entry(10, shard=1), chain=TWO_EPOCHS)) is VoteStatus.COUNTED
    # The same predecessor in another epoch is another statement (protocol: "in one epoch").
    late = _entry(EPOCH1_FROM, root=b"late")
    assert _add(c, _vote("peer-a", late, chain=TWO_EPOCHS), horizon=None) is VoteStatus.COUNTED
    assert c.equivocations == []


def test_collector_revoting_on_another_prev_is_not_equivocation():
    """peer-d dissented at cycle 10; its re-signed vote for 11 chained from the committed entry counts."""
    c = _collector()
    honest10, own10 = _entry(10, root=b"10"), _entry(10, root=b"d's 10")
    honest11 = _entry(11, root=b"11", prev=honest10.entry_hash)
    own11 = _entry(11, root=b"11", prev=own10.entry_hash)
    for pid in ("peer-a", "peer-b", "peer-c"):
        assert _add(c, _vote(pid, honest10)) in (VoteStatus.COUNTED, VoteStatus.QUORUM)
    assert _add(c, _vote("peer-d", own10)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-d", own11)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-a", honest11)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-b", honest11)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-d", honest11)) is VoteStatus.QUORUM  # re-signed after the dissent
    assert c.equivocations == []
    entry, votes = c.quorum_after(0, honest10.entry_hash, 10)
    assert entry == honest11
    assert [v.peer_id for v in votes] == ["peer-a", "peer-b", "peer-d"]


def test_collector_quorum_after():
    c = _collector()
    e10 = _entry(10)
    e11 = _entry(11, prev=e10.entry_hash)
    for pid in ("peer-a", "peer-b", "peer-c"):
        _add(c, _vote(pid, e10))
    for pid in ("peer-a", "peer-b"):
        _add(c, _vote(pid, e11))
    assert c.quorum_after(0, ZERO_HASH, None)[0] == e10
    assert c.quorum_after(0, ZERO_HASH, 9)[0] == e10
    assert c.quorum_after(0, ZERO_HASH, 10) is None  # nothing after cycle 10 follows the zeros
    assert c.quorum_after(1, ZERO_HASH, None) is None  # another shard
    assert c.quorum_after(0, e10.entry_hash, 10) is None  # two votes, threshold 3
    assert _add(c, _vote("peer-d", e11)) is VoteStatus.QUORUM
    entry, votes = c.quorum_after(0, e10.entry_hash, 10)
    assert entry == e11
    assert [v.peer_id for v in votes] == ["peer-a", "peer-b", "peer-d"]


def test_collector_stuck_when_two_dissent():
    c = _collector()
    h1, h2 = _entry(root=b"1"), _entry(root=b"2")
    _add(c, _vote("peer-a", h1))
    assert c.stuck_after(0, ZERO_HASH) is None
    _add(c, _vote("peer-b", h1))
    _add(c, _vote("peer-c", h2))
    assert c.stuck_after(0, ZERO_HASH) is None  # peer-d can still bring h1 to 3
    _add(c, _vote("peer-d", h2))
    assert c.stuck_after(0, ZERO_HASH) == 10
    assert c.quorum_after(0, ZERO_HASH, None) is None


def test_collector_stuck_with_three_different_successors():
    c = _collector()
    _add(c, _vote("peer-a", _entry(10, root=b"1")))
    _add(c, _vote("peer-b", _entry(11, root=b"2")))
    assert c.stuck_after(0, ZERO_HASH) is None
    _add(c, _vote("peer-c", _entry(12, root=b"3")))
    assert c.stuck_after(0, ZERO_HASH) == 10  # the first cycle that can no longer commit


def test_collector_not_stuck_without_votes_or_after_forged_ones():
    c = _collector()
    assert c.stuck_after(0, ZERO_HASH) is None
    _add(c, _vote("peer-x", _entry(), STRANGER))
    assert c.stuck_after(0, ZERO_HASH) is None
    assert _add(c, Vote(_entry(root=b"1"), "peer-a", bytes(64), 1, 0)) is VoteStatus.BAD_SIGNATURE
    assert _add(c, Vote(_entry(root=b"2"), "peer-b", bytes(64), 1, 0)) is VoteStatus.BAD_SIGNATURE
    _add(c, _vote("peer-c", _entry(root=b"3")))
    assert c.stuck_after(0, ZERO_HASH) is None


def test_collector_not_stuck_when_an_equivocator_still_counts_once():
    c = _collector()
    x, y = _entry(root=b"x"), _entry(root=b"y")
    _add(c, _vote("peer-a", x))
    assert _add(c, _vote("peer-a", y)) is VoteStatus.EQUIVOCATION
    _add(c, _vote("peer-b", y))
    _add(c, _vote("peer-c", x))
    assert c.stuck_after(0, ZERO_HASH) is None  # peer-d can bring x to 3
    assert _add(c, _vote("peer-d", x)) is VoteStatus.QUORUM


def test_collector_prune():
    c = _collector()
    x10, d10 = _entry(10, root=b"x"), _entry(10, root=b"d")
    x11, d11 = _entry(11, prev=x10.entry_hash), _entry(11, prev=d10.entry_hash)
    x12 = _entry(12, prev=x11.entry_hash)
    for pid in ("peer-a", "peer-b", "peer-c"):
        _add(c, _vote(pid, x10))
    _add(c, _vote("peer-d", d10))
    for pid in ("peer-a", "peer-b"):
        assert _add(c, _vote(pid, x11)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-d", d11)) is VoteStatus.COUNTED
    assert _add(c, _vote("peer-a", x12)) is VoteStatus.COUNTED
    other_shard = _entry(10, shard=1)
    _add(c, _vote("peer-a", other_shard))
    c.prune(0, 10, x10.entry_hash)
    assert c.successors(0, ZERO_HASH) == {}
    assert c.successors(0, d10.entry_hash) == {}
    assert set(c.successors(0, x10.entry_hash)[x11.entry_hash]) == {"peer-a", "peer-b"}
    assert set(c.successors(0, x11.entry_hash)[x12.entry_hash]) == {"peer-a"}
    assert set(c.successors(1, ZERO_HASH)[other_shard.entry_hash]) == {"peer-a"}  # other shards untouched
    # What hung on the dropped branch no longer links; what follows the head still does.
    assert _add(c, _vote("peer-d", _entry(12, root=b"d", prev=d11.entry_hash)), head=x10.entry_hash) is (
        VoteStatus.UNLINKED
    )
    assert _add(c, _vote("peer-c", x11), head=x10.entry_hash) is VoteStatus.QUORUM
    assert _add(c, _vote("peer-b", x12), head=x10.entry_hash) is VoteStatus.COUNTED
    # A later head drops everything up to it.
    c.prune(0, 12, x12.entry_hash)
    assert c.successors(0, x10.entry_hash) == {}
    assert c.successors(0, x11.entry_hash) == {}


# -- peer engine: rejoin after a dissent ----------------------------------------------------

ENGINE_SETTINGS = ChainSettings(peers=GENESIS.peers, threshold=3)
ROTATION_FROM = 12  # for the engine tests with two epochs


def _records(cycles: range, tamper: dict[int, bytes] | None = None) -> list[tuple[int, int, bool, bytes]]:
    """Two JSON deltas per cycle (offset, timestamp, marker, value); `tamper` replaces values by offset."""
    out = []
    for cycle in cycles:
        for tick in (1, 5):
            offset = 2 * cycle + (tick > 1)
            value = json.dumps({"additions": [{"s": f"urn:s{offset}", "p": "urn:p", "o": str(offset)}]}).encode()
            out.append((offset, (cycle * 8 + tick) * ENGINE_SETTINGS.tick_ms, False, (tamper or {}).get(offset, value)))
    return out


def _engines(settings: ChainSettings = ENGINE_SETTINGS, keys=None) -> dict[str, PeerEngine]:
    out = {}
    for pid in PUBS:
        out[pid] = PeerEngine(settings, pid, (keys or {}).get(pid, KEYS[pid]))
        out[pid].assign(0, ResumePoint(0))
    return out


def _feed(engine: PeerEngine, records) -> dict[int, Vote]:
    votes = {}
    for r in records:
        v = engine.feed(0, *r)
        if v is not None:
            votes[v.entry.cycle] = v
    return votes


TAMPERED = {2 * 11: json.dumps({"additions": [{"s": "urn:s", "p": "urn:p", "o": "misread"}]}).encode()}


def _commit_all(consensus: Consensus, engines: dict[str, PeerEngine]) -> list[tuple[Entry, list[Vote], dict]]:
    """Commit whatever is ready, telling every engine; returns (entry, votes, statuses of re-signed votes)."""
    out = []
    while (ready := consensus.next_ready(0)) is not None:
        consensus.set_head(0, ready.entry.cycle, ready.entry.entry_hash)
        statuses = {}
        for pid, engine in engines.items():
            for v in engine.on_committed(0, ready.entry.cycle, ready.entry.entry_hash):
                statuses[(pid, v.entry.cycle)] = consensus.add(v)
        out.append((ready.entry, ready.votes, statuses))
    return out


def test_engine_votes_agree_without_dissent():
    engines = _engines()
    votes = {pid: _feed(e, _records(range(10, 14))) for pid, e in engines.items()}
    assert {pid: sorted(v) for pid, v in votes.items()} == {pid: [10, 11, 12] for pid in PUBS}
    for cycle in (10, 11, 12):
        assert len({votes[pid][cycle].entry_hash for pid in PUBS}) == 1
    assert votes["peer-a"][10].entry.prev_entry_hash == ZERO_HASH
    assert votes["peer-a"][11].entry.prev_entry_hash == votes["peer-a"][10].entry_hash
    consensus = Consensus(ENGINE_SETTINGS.epoch_for)
    for pid in PUBS:
        for v in votes[pid].values():
            # the fourth peer's votes come after the quorum: not needed, so not verified
            assert consensus.add(v) in (VoteStatus.COUNTED, VoteStatus.QUORUM, VoteStatus.BEYOND_QUORUM)
    assert [e.cycle for e, _, _ in _commit_all(consensus, engines)] == [10, 11, 12]
    assert all(e.dissents(0) == 0 for e in engines.values())


def test_engine_rejoin_resigns_later_votes_and_they_count():
    engines = _engines()
    honest = _feed(engines["peer-a"], _records(range(10, 15)))
    b_votes = _feed(engines["peer-b"], _records(range(10, 15)))
    assert {c: v.entry for c, v in b_votes.items()} == {c: v.entry for c, v in honest.items()}
    c_votes = _feed(engines["peer-c"], _records(range(10, 15)))
    own = _feed(engines["peer-d"], _records(range(10, 15), TAMPERED))
    assert sorted(own) == [10, 11, 12, 13]
    # peer-d misread a record of cycle 11: its votes for 11 and (chained from it) 12 and 13 differ.
    assert own[10].entry_hash == honest[10].entry_hash
    assert all(own[c].entry_hash != honest[c].entry_hash for c in (11, 12, 13))
    assert own[12].entry.root == honest[12].entry.root  # only the chaining differs after 11
    assert own[12].entry.prev_entry_hash == own[11].entry_hash

    consensus = Consensus(ENGINE_SETTINGS.epoch_for)
    for v in [*honest.values(), *b_votes.values(), *own.values(), c_votes[10], c_votes[11]]:
        # peer-c's later votes are lost; its vote for 10 comes after 10's quorum (not needed, not verified)
        assert consensus.add(v) in (VoteStatus.COUNTED, VoteStatus.QUORUM, VoteStatus.BEYOND_QUORUM)
    assert consensus.add(honest[10]) is VoteStatus.REPEATED
    commits = _commit_all(consensus, engines)
    assert [e.entry_hash for e, _, _ in commits] == [honest[c].entry_hash for c in (10, 11, 12, 13)]
    assert engines["peer-d"].dissents(0) == 1
    assert all(engines[pid].dissents(0) == 0 for pid in ("peer-a", "peer-b", "peer-c"))
    # After 11 committed, peer-d re-signed 12 and 13 chained from the committed entry, and they
    # made the quorums of 12 and 13 with peer-a and peer-b (peer-c's votes never came).
    by_cycle = {e.cycle: (votes, statuses) for e, votes, statuses in commits}
    assert by_cycle[11][1] == {("peer-d", 12): VoteStatus.QUORUM, ("peer-d", 13): VoteStatus.QUORUM}
    assert [v.peer_id for v in by_cycle[12][0]] == ["peer-a", "peer-b", "peer-d"]
    assert [v.peer_id for v in by_cycle[13][0]] == ["peer-a", "peer-b", "peer-d"]
    resigned = {v.entry.cycle: v for v in by_cycle[12][0] + by_cycle[13][0] if v.peer_id == "peer-d"}
    assert resigned[12].entry == honest[12].entry
    assert resigned[12].entry.prev_entry_hash == honest[11].entry_hash
    assert verify_vote(PUBS["peer-d"], GENESIS.epoch_hash, honest[13].entry_hash, resigned[13].signature)
    assert consensus.collector.equivocations == []  # re-voting on another prev_entry_hash is not equivocation
    # And the next beat follows the committed chain.
    after = {pid: _feed(e, _records(range(15, 16))) for pid, e in engines.items()}
    assert len({after[pid][14].entry_hash for pid in PUBS}) == 1
    assert after["peer-d"][14].entry.prev_entry_hash == honest[13].entry_hash


def test_engine_rejoin_when_the_commit_comes_before_the_next_beat():
    engines = _engines()
    honest = _feed(engines["peer-a"], _records(range(10, 13)))
    own = _feed(engines["peer-d"], _records(range(10, 13), TAMPERED))
    assert sorted(own) == [10, 11]
    assert own[11].entry_hash != honest[11].entry_hash
    d = engines["peer-d"]
    assert d.on_committed(0, 10, honest[10].entry_hash) == []
    assert d.on_committed(0, 11, honest[11].entry_hash) == []  # nothing later to re-sign
    assert d.dissents(0) == 1
    later_honest = _feed(engines["peer-a"], _records(range(13, 15)))
    later_own = _feed(d, _records(range(13, 15)))
    assert later_own[12].entry == later_honest[12].entry
    assert later_own[12].entry.prev_entry_hash == honest[11].entry_hash
    assert later_own[13].entry_hash == later_honest[13].entry_hash


def _behind() -> tuple[PeerEngine, dict[int, Vote], dict[int, Vote]]:
    """peer-d learns that 11 committed (another entry than its own) before it closes its beat 11."""
    engines = _engines()
    honest = _feed(engines["peer-a"], _records(range(10, 15)))
    d = engines["peer-d"]
    records = _records(range(10, 15), TAMPERED)
    own = _feed(d, records[:4])  # beats 10 and 11 fed: only 10 is closed
    assert sorted(own) == [10]
    assert d.on_committed(0, 10, honest[10].entry_hash) == []
    assert d.on_committed(0, 11, honest[11].entry_hash) == []
    own.update(_feed(d, records[4:]))
    return d, honest, own


def test_engine_behind_the_committed_chain_follows_it():
    _, honest, own = _behind()
    assert own[11].entry_hash != honest[11].entry_hash  # its own (dissenting) beat 11
    assert own[12].entry == honest[12].entry  # chained from the committed 11
    assert own[13].entry_hash == honest[13].entry_hash


def test_engine_behind_the_committed_chain_records_the_dissent():
    """Protocol "Votes and quorum": when a committed entry differs from the peer's own vote for
    that cycle, the peer records its dissent, whether the vote was cast before or after it learnt
    of the commit."""
    d, honest, own = _behind()
    assert own[11].entry.cycle == 11
    assert own[11].entry_hash != honest[11].entry_hash
    assert d.dissents(0) == 1


def test_engine_with_old_and_new_key_signs_each_epoch_with_its_key():
    e1 = Epoch("knhk", 125, 1, ROTATION_FROM, 3, CANONICAL, 1024, EPOCH1.peers, GENESIS.epoch_hash)
    for pid in ("peer-a", "peer-b", "peer-c"):
        e1 = e1.signed_by(pid, KEYS[pid])
    e1 = e1.signed_by("peer-d", ROTATED_D)
    settings = ENGINE_SETTINGS.with_epochs([e1])
    assert [e.number for e in settings.epoch_chain.epochs] == [0, 1]
    engines = _engines(settings, {"peer-d": [KEYS["peer-d"], ROTATED_D]})
    votes = {pid: _feed(e, _records(range(10, 15))) for pid, e in engines.items()}
    d = votes["peer-d"]
    assert [d[c].epoch for c in (10, 11, 12, 13)] == [0, 0, 1, 1]
    assert verify_vote(PUBS["peer-d"], GENESIS.epoch_hash, d[11].entry_hash, d[11].signature)
    assert verify_vote(public_key_bytes(ROTATED_D), e1.epoch_hash, d[12].entry_hash, d[12].signature)
    consensus = Consensus(settings.epoch_for)
    for pid in ("peer-a", "peer-d", "peer-b"):  # peer-c is offline: peer-d counts in both epochs
        for v in votes[pid].values():
            assert consensus.add(v) in (VoteStatus.COUNTED, VoteStatus.QUORUM)
    commits = _commit_all(consensus, engines)
    assert [e.cycle for e, _, _ in commits] == [10, 11, 12, 13]
    assert all("peer-d" in [v.peer_id for v in votes] for _, votes, _ in commits)
    # With only its new key, peer-d casts no vote in epoch 0.
    only_new = PeerEngine(settings, "peer-d", ROTATED_D)
    only_new.assign(0, ResumePoint(0))
    assert sorted(_feed(only_new, _records(range(10, 15)))) == [12, 13]


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


def test_signatures_bind_key_epoch_and_entry():
    e = _entry().entry_hash
    epoch_hash = GENESIS.epoch_hash
    sig = sign(KEYS["peer-a"], epoch_hash, e)
    assert len(sig) == 64
    assert sig == KEYS["peer-a"].sign(b"knhk-vote/2" + epoch_hash + e)
    assert verify_vote(PUBS["peer-a"], epoch_hash, e, sig)
    assert not verify_vote(PUBS["peer-b"], epoch_hash, e, sig)
    assert not verify_vote(PUBS["peer-a"], epoch_hash, H(b"x"), sig)
    assert not verify_vote(PUBS["peer-a"], EPOCH1.epoch_hash, e, sig)
    assert not verify_vote(PUBS["peer-a"], epoch_hash, e, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify_vote(b"short", epoch_hash, e, sig)
    assert not verify_signature(PUBS["peer-a"], e, sig)
    # A signature over the bare entry hash (no domain, no epoch) is not a vote.
    assert not verify_vote(PUBS["peer-a"], epoch_hash, e, KEYS["peer-a"].sign(e))


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

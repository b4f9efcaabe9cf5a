"""An epoch signed after the fact with an earlier from_cycle shows as entries that no longer verify,
and is reported as backdated (protocol "Epochs")."""

from __future__ import annotations

from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.epochs import Epoch, Peer
from knhk_stream.protocol.keys import generate_key, public_key_bytes
from knhk_stream.protocol.quorum import backdated_problem, check_quorum, sign
from knhk_stream.protocol.settings import ChainSettings


def test_an_entry_committed_before_a_backdated_epoch_is_reported_as_backdated():
    keys = {p: generate_key() for p in ("peer-a", "peer-b", "peer-c", "peer-d")}
    settings = ChainSettings(tuple(Peer(p, public_key_bytes(k)) for p, k in keys.items()), 3)
    entry = Entry("knhk", 0, 50, H(b"root"), 1, 0, 0, ZERO_HASH)
    votes = [(p, sign(keys[p], settings.genesis.epoch_hash, entry.entry_hash)) for p in ("peer-a", "peer-b", "peer-c")]
    assert check_quorum(entry.entry_hash, votes, settings.epoch_for(50)).valid
    assert backdated_problem(settings.epoch_chain, 50, entry.entry_hash, votes) is None

    rotated = generate_key()
    peers = tuple(Peer(p, public_key_bytes(rotated if p == "peer-d" else k)) for p, k in keys.items())
    e1 = Epoch("knhk", 125, 1, 10, 3, "canonical@1", 1024, peers, settings.genesis.epoch_hash)  # from cycle 10 < 50
    for p in ("peer-a", "peer-b", "peer-c"):
        e1 = e1.signed_by(p, keys[p])
    e1 = e1.signed_by("peer-d", rotated)
    later = settings.with_epochs([e1])
    assert later.epoch_for(50).number == 1
    assert not check_quorum(entry.entry_hash, votes, later.epoch_for(50)).valid
    problem = backdated_problem(later.epoch_chain, 50, entry.entry_hash, votes)
    assert problem is not None and "epoch 1 is backdated" in problem and "starts at cycle 10" in problem

"""Protocol v2 epochs and rejoins against real peers: worker processes on the broker and Redis.

A key is rotated and a fifth peer joins through the `epoch` commands while
the other peers run on; every entry before and after the boundary verifies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from knhk_stream.cli.main import main
from knhk_stream.protocol.keys import generate_key, public_key_bytes, save_private_key
from knhk_stream.protocol.settings import ChainSettings
from tests.support.cluster import SHARDS, Cluster


@pytest.fixture()
def cluster(tmp_path, broker, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    yield c
    c.close()


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _next_settings(path: Path, settings: ChainSettings, replace_key: dict[str, bytes], add: dict[str, bytes],
                   threshold: int) -> Path:  # fmt: skip
    lines = [f"threshold = {threshold}"]
    peers = {p.id: p.public_key for p in settings.epoch_chain.newest.peers} | replace_key | add
    for pid, pub in sorted(peers.items()):
        lines += ["", "[[peers]]", f'id = "{pid}"', f'public_key = "{pub.hex()}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def _apply_epoch(cluster: Cluster, next_toml: Path, signers: list[tuple[str, Path]], in_seconds: int = 4) -> Path:
    """propose -> sign by each -> apply (Redis and a new settings file), all through the CLI."""
    chain = cluster.workdir / "chain.toml"
    statement = cluster.workdir / "epoch.json"
    code, out = _cli("epoch", "propose", "--settings", str(chain), "--next", str(next_toml),
                     "--in-seconds", str(in_seconds), "--out", str(statement), "--force")  # fmt: skip
    assert code == 0, out
    for peer_id, key in signers:
        code, out = _cli("epoch", "sign", str(statement), "--settings", str(chain), "--peer-id", peer_id,
                         "--key", str(key))  # fmt: skip
        assert code == 0, out
    code, out = _cli("epoch", "apply", str(statement), "--settings", str(chain), "--redis", cluster.redis_url,
                     "--prefix", cluster.prefix)  # fmt: skip
    assert code == 0, out
    cluster.settings = ChainSettings.from_toml(chain)  # the test's own checks verify with the new epoch too
    return statement


def _verify(cluster: Cluster) -> dict:
    code, out = _cli("chain", "verify", "--settings", str(cluster.workdir / "chain.toml"), "--redis",
                     cluster.redis_url, "--prefix", cluster.prefix, "--json")  # fmt: skip
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0, out
    return {r["shard"]: r for r in reports}


def _epochs_committed(cluster: Cluster) -> set[int]:
    return {ce.epoch for chain in cluster.chains().values() for ce in chain}


def test_key_rotation_mid_run_keeps_every_entry_verifiable(cluster):
    cluster.start_all()
    cluster.produce(400, rate=400)
    cluster.wait_all_committed()
    new_key = generate_key()
    new_pem = cluster.workdir / "peer-d-2.pem"
    save_private_key(new_key, new_pem)
    nxt = _next_settings(cluster.workdir / "next.toml", cluster.settings, {"peer-d": public_key_bytes(new_key)}, {}, 3)
    old = [(p, cluster.workdir / f"{p}.pem") for p in ("peer-a", "peer-b", "peer-c")]
    statement = _apply_epoch(cluster, nxt, [*old, ("peer-d", new_pem)])
    from_cycle = json.loads(statement.read_text())["from_cycle"]
    # peer-d alone restarts, holding its old and its new key across the boundary; the others run on
    cluster.stop("peer-d")
    cluster.start("peer-d", extra=("--key", str(new_pem)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 1 not in _epochs_committed(cluster):
        cluster.produce(100, rate=200)
    cluster.wait_all_committed()
    assert _epochs_committed(cluster) == {0, 1}
    for peer in ("peer-a", "peer-b", "peer-c"):
        assert "adopted epoch 1" in cluster.log(peer)
    cluster.stop_all()
    chains = cluster.chains()
    for chain in chains.values():
        for ce in chain:
            assert ce.epoch == (1 if ce.entry.cycle >= from_cycle else 0)
    after = [ce for chain in chains.values() for ce in chain if ce.epoch == 1]
    assert any("peer-d" in dict(ce.votes) for ce in after), "peer-d's new key signed nothing after the boundary"
    reports = _verify(cluster)
    assert all(r["ok"] for r in reports.values()) and len(reports) == SHARDS
    cluster.assert_chains_match_replay()


def test_a_fifth_peer_joins_and_the_threshold_rises_to_four(cluster):
    cluster.start_all()
    cluster.produce(300, rate=300)
    cluster.wait_all_committed()
    e_key = generate_key()
    e_pem = cluster.workdir / "peer-e.pem"
    save_private_key(e_key, e_pem)
    nxt = _next_settings(cluster.workdir / "next.toml", cluster.settings, {}, {"peer-e": public_key_bytes(e_key)}, 4)
    signers = [(p, cluster.workdir / f"{p}.pem") for p in ("peer-a", "peer-b", "peer-c", "peer-d")]
    _apply_epoch(cluster, nxt, [*signers, ("peer-e", e_pem)])
    cluster.start("peer-e", extra=("--key", str(e_pem)), settings=cluster.workdir / "chain.toml")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 1 not in _epochs_committed(cluster):
        cluster.produce(100, rate=200)
    cluster.wait_all_committed()
    cluster.stop_all()
    after = [ce for chain in cluster.chains().values() for ce in chain if ce.epoch == 1]
    assert after and all(len(ce.votes) >= 4 for ce in after)
    assert all(r["ok"] for r in _verify(cluster).values())


def test_a_peer_with_a_wrong_hook_for_a_while_rejoins_and_its_votes_count(cluster):
    import dataclasses

    faulty = dataclasses.replace(cluster.settings, hook_entrypoint="tests.support.hooks_example:upper")
    faulty_path = cluster.workdir / "faulty.toml"
    faulty_path.write_text(faulty.to_toml())
    for peer in ("peer-a", "peer-b", "peer-c"):
        cluster.start(peer)
    cluster.start("peer-d", settings=faulty_path)
    cluster.wait_joined("peer-a", "peer-b", "peer-c", "peer-d")
    cluster.produce(400, rate=400)
    cluster.wait_all_committed()
    cluster.stop("peer-d")
    cluster.start("peer-d")  # the hook fixed
    cluster.wait_joined("peer-d")
    before = {(s, ce.entry.cycle) for s, chain in cluster.chains().items() for ce in chain}
    cluster.produce(400, rate=400)
    cluster.wait_all_committed()
    time.sleep(2)
    cluster.stop_all()
    committed = {ce.entry_hash for chain in cluster.chains().values() for ce in chain}
    later = [
        v for v in cluster.votes()
        if v.peer_id == "peer-d" and (v.entry.shard, v.entry.cycle) not in before
        and any(ce.entry.cycle == v.entry.cycle for ce in cluster.chains()[v.entry.shard])
    ]  # fmt: skip
    assert later, "peer-d cast no vote after it was fixed"
    agreeing = [v for v in later if v.entry_hash in committed]
    assert len(agreeing) == len(later), f"{len(later) - len(agreeing)} of peer-d's later votes are off the chain"
    cluster.assert_chains_match_replay()

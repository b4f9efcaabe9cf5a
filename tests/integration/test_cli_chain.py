"""`knhk-stream keys generate`, `chain show` and `chain verify` as a user runs them."""

from __future__ import annotations

import json
import os
import stat

import redis
from click.testing import CliRunner

from knhk_stream.cli.main import main
from knhk_stream.protocol.quorum import load_private_key, public_key_bytes
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.store.lockchain import LockchainStore, root_key
from tests.integration.test_store import make_chain


def test_keys_generate_writes_0600_key_and_prints_public_key(tmp_path):
    out = tmp_path / "peer-a.pem"
    result = CliRunner().invoke(main, ["keys", "generate", "--peer-id", "peer-a", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    pub = result.stdout.strip().splitlines()[0]
    assert pub == public_key_bytes(load_private_key(out)).hex()
    again = CliRunner().invoke(main, ["keys", "generate", "--peer-id", "peer-a", "--out", str(out)])
    assert again.exit_code != 0 and "--force" in again.output


def test_chain_show_and_verify(tmp_path, redis_url, redis_prefix, settings, peer_keys):
    path = tmp_path / "chain.toml"
    path.write_text(settings.to_toml())
    assert ChainSettings.from_toml(path) == settings
    store = LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)
    chain = make_chain(settings, peer_keys, 30, shard=2)
    for ce in chain:
        store.append(ce)
    base = ["--settings", str(path), "--redis", redis_url, "--prefix", redis_prefix]
    runner = CliRunner()

    shown = runner.invoke(main, ["chain", "show", *base, "--json", "--limit", "0"])
    assert shown.exit_code == 0, shown.output
    lines = [json.loads(x) for x in shown.stdout.splitlines()]
    assert [x["entry_hash"] for x in lines] == [ce.entry_hash.hex() for ce in chain]

    table = runner.invoke(main, ["chain", "show", *base, "--limit", "3"])
    assert table.exit_code == 0 and str(chain[-1].entry.cycle) in table.stdout

    ok = runner.invoke(main, ["chain", "verify", *base])
    assert ok.exit_code == 0, ok.output
    assert "shard 2: OK  30 entries" in ok.stdout

    redis.Redis.from_url(redis_url).hset(root_key(redis_prefix, "knhk", 2, chain[7].entry.cycle), "root", "00" * 32)
    bad = runner.invoke(main, ["chain", "verify", *base, "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert not report["ok"] and report["problems"][0]["cycle"] == chain[7].entry.cycle


def test_bad_settings_give_one_clear_line(tmp_path):
    path = tmp_path / "chain.toml"
    path.write_text('threshold = 9\n[[peers]]\nid = "a"\npublic_key = "zz"\n')
    result = CliRunner().invoke(main, ["chain", "verify", "--settings", str(path)])
    assert result.exit_code == 1
    assert "peers[0].public_key" in result.output and "Traceback" not in result.output


def test_chain_show_says_what_limit_dropped_and_verify_json_says_when_there_is_no_chain(
    tmp_path, redis_url, redis_prefix, settings, peer_keys
):
    path = tmp_path / "chain.toml"
    path.write_text(settings.to_toml())
    store = LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)
    for ce in make_chain(settings, peer_keys, 12, shard=1):
        store.append(ce)
    base = ["--settings", str(path), "--redis", redis_url, "--prefix", redis_prefix]
    shown = CliRunner().invoke(main, ["chain", "show", *base, "--limit", "5", "--json"])
    assert shown.exit_code == 0
    assert len(shown.stdout.splitlines()) == 5
    assert "shard 1: the last 5 of 12 entries (--limit 5; 0 for all)" in shown.stderr
    empty = CliRunner().invoke(main, ["chain", "verify", *base[:4], "--prefix", redis_prefix + "-none", "--json"])
    assert empty.exit_code == 1
    assert json.loads(empty.stdout) == {"chain_id": settings.chain_id, "prefix": redis_prefix + "-none", "ok": False,
                                        "problem": "no chain under this prefix in Redis"}  # fmt: skip

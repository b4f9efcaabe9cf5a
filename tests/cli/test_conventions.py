"""Issue 16, "Conventions": one exit-code table, one JSON shape, help that names every variable.

The tables and rules are in docs/cli.md ("Exit codes", "JSON output"); these
tests hold the commands to them, on the real Redis and broker.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from knhk_stream.cli import common
from knhk_stream.cli.main import main
from knhk_stream.store.lockchain import LockchainStore, set_stall
from tests.cli.conftest import knhk
from tests.integration.test_store import make_chain

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def commands(group: click.Group = main, path: tuple[str, ...] = ()):
    """(command path, command) of every command, subcommands included."""
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


@pytest.fixture()
def chain(tmp_path: Path, redis_url: str, redis_prefix: str, settings, peer_keys) -> list[str]:
    """A committed chain of 5 entries on shard 2 in Redis; the options that name it."""
    (tmp_path / "chain.toml").write_text(settings.to_toml())
    store = LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)
    for ce in make_chain(settings, peer_keys, 5, shard=2):
        store.append(ce)
    return ["--settings", str(tmp_path / "chain.toml"), "--redis", redis_url, "--prefix", redis_prefix]


# -- 8. exit codes ------------------------------------------------------------------------------


def test_the_exit_code_table_is_the_one_the_code_uses():
    text = DOCS.read_text("utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = [int(m) for m in re.findall(r"^\| \*\*(\d+)\*\* \|", text, re.M)]
    used = [common.EXIT_OK, common.EXIT_ERROR, common.EXIT_USAGE, common.EXIT_ATTENTION, common.EXIT_NOT_YET]
    assert documented == used == [0, 1, 2, 3, 75]
    per_command = re.search(r"^\| command \| 0 \| 1 \| 2 \| 3 \| 75 \|$", text, re.M)
    assert per_command, "the per-command table has one column per code"
    rows = {m.split("|")[1].strip() for m in re.findall(r"^\| `[^|]+` \|.*$", text, re.M)}
    for path, _cmd in commands():
        name = " ".join(path)
        assert any(name in row for row in rows), f"`{name}` is missing from the exit-code table"


@pytest.mark.parametrize(
    "args",
    [
        ("prove", "--bogus"),
        ("audit", "--settings", "x.toml"),  # neither --shard nor --all-shards
        ("produce",),  # neither FILE nor --synthetic
        ("roots", "tail"),  # no --settings
        ("verify-proof", "no-such-file.json", "--settings", "x.toml"),
        ("chain", "show", "--limit", "many", "--settings", "x.toml"),
    ],
)
def test_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == common.EXIT_USAGE, result.output
    assert "Usage:" in result.output or "Error:" in result.output


def test_errors_are_one_error_line_with_exit_1(chain):
    ran = knhk("chain", "show", *chain[:2], "--redis", "redis://127.0.0.1:1/0", "--json")
    assert ran.rc == common.EXIT_ERROR and ran.out == "" and ran.seconds < 5
    assert ran.err_lines == [ran.err_lines[0]] and ran.err_lines[0].startswith("Error: cannot reach Redis")


def test_status_exits_3_on_a_stall_also_with_json(chain, redis_url, redis_prefix, settings):
    set_stall(LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix), 2, 104, "no quorum", 1)
    for extra in ((), ("--json",)):
        result = invoke("status", *chain, "--no-kafka", *extra)
        assert result.exit_code == common.EXIT_ATTENTION, result.output
    lines = [json.loads(x) for x in invoke("status", *chain, "--no-kafka", "--json").stdout.splitlines()]
    assert [int(x["stalled"]["cycle"]) for x in lines if x["shard"] == 2] == [104]


# -- 9. one JSON shape ----------------------------------------------------------------------------


def json_lines(stdout: str) -> list[dict]:
    """Every line of stdout is one JSON object (JSON Lines), nothing else."""
    out = []
    for line in stdout.splitlines():
        value = json.loads(line)
        assert isinstance(value, dict), line
        out.append(value)
    return out


def test_every_json_output_is_json_lines(chain, broker, tmp_path: Path):
    kafka = ["--bootstrap", broker.bootstrap, "--topic-prefix", f"js{uuid.uuid4().hex[:10]}"]
    applied = invoke("topics", "apply", *kafka, "--json")
    assert applied.exit_code == 0 and len(json_lines(applied.stdout)) == 1
    assert len(json_lines(invoke("chain", "show", *chain, "--json").stdout)) == 5
    assert len(json_lines(invoke("chain", "verify", *chain, "--json").stdout)) == 1
    status = invoke("status", *chain, *kafka, "--json")
    assert status.exit_code == 0, status.output
    assert [x["shard"] for x in json_lines(status.stdout)] == [0, 1, 2, 3]
    audit = invoke("audit", *chain, *kafka, "--shard", "2", "--json")  # a made-up chain: FAILED, still JSON
    assert audit.exit_code == 1 and [x["status"] for x in json_lines(audit.stdout)] == ["FAILED"]
    bundle = tmp_path / "bad.json"
    bundle.write_text("{not json")
    proof = invoke("verify-proof", str(bundle), *chain[:2], "--json")
    assert proof.exit_code == 1 and json_lines(proof.stdout)[0]["failed_step"] == "bundle"
    roots = knhk("roots", "tail", *chain[:2], *kafka, "--from-beginning", "--json", "-e", timeout=60)
    assert roots.rc == 0 and json_lines(roots.out) == []
    missing = knhk("status", *chain, "--bootstrap", "127.0.0.1:9", "--json")
    assert missing.rc == 1 and missing.out == ""  # an error: the Error line on stderr, no half JSON


# -- 10. help and names ---------------------------------------------------------------------------


def test_every_option_that_reads_a_variable_says_so_in_help():
    for path, cmd in commands():
        text = invoke(*path, "--help").output
        flat = " ".join(text.split())
        for param in cmd.params:
            if isinstance(param, click.Option) and param.envvar:
                names = [param.envvar] if isinstance(param.envvar, str) else param.envvar
                assert names[0] in flat, f"`{' '.join(path)} --help` does not name {names[0]} ({param.opts[0]})"


def test_one_name_for_at_most_n_and_the_kafka_spelling_of_bootstrap():
    for path, cmd in commands():
        for param in cmd.params:
            if not isinstance(param, click.Option):
                continue
            assert param.opts[0] != "--max", f"`{' '.join(path)}`: 'at most N' is --limit"
            if "--bootstrap" in param.opts:
                assert "--bootstrap-server" in param.opts, f"`{' '.join(path)}` lacks --bootstrap-server"


def test_help_says_where_dash_means_stdin():
    for path in (("produce",), ("verify-proof",), ("chain", "import")):
        assert "- for stdin" in " ".join(invoke(*path, "--help").output.split()).replace("`", ""), path
    assert "- for stdout" in " ".join(invoke("produce", "--help").output.split())


def test_roots_tail_stops_at_the_end_or_after_a_timeout(broker, tmp_path: Path, settings):
    (tmp_path / "chain.toml").write_text(settings.to_toml())
    prefix = f"rt{uuid.uuid4().hex[:10]}"
    base = ["roots", "tail", "--settings", str(tmp_path / "chain.toml"), "--bootstrap-server", broker.bootstrap,
            "--topic-prefix", prefix]  # fmt: skip
    assert invoke("topics", "apply", "--bootstrap", broker.bootstrap, "--topic-prefix", prefix).exit_code == 0
    at_end = knhk(*base, "--from-beginning", "--exit-at-end", "--max", "5", timeout=60)  # --max: the old name
    assert at_end.rc == 0 and at_end.seconds < 15, (at_end.rc, at_end.seconds, at_end.err)
    assert "0 roots shown" in at_end.err and "(at the end of the topic)" in at_end.err
    timed = knhk(*base, "--timeout", "1", timeout=60)
    assert timed.rc == common.EXIT_NOT_YET and timed.seconds < 15, (timed.rc, timed.seconds, timed.err)
    assert "(no root for 1 s)" in timed.err


# -- 12. small ones -------------------------------------------------------------------------------


def test_an_unknown_key_in_peers_is_named_as_unknown(tmp_path: Path, settings):
    text = settings.to_toml().replace("public_key =", "publickey =", 1)
    (tmp_path / "chain.toml").write_text(text)
    result = invoke("chain", "verify", "--settings", str(tmp_path / "chain.toml"))
    assert result.exit_code == 1
    assert "peers[0].publickey: unknown key" in result.output and "not hex" not in result.output

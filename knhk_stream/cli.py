"""The `knhk-stream` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
import redis

from . import __version__
from .settings import ChainSettings, SettingsError

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one clear line (exit status 1), not a traceback."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SettingsError as e:
            raise click.ClickException(str(e)) from None
        except redis.ConnectionError as e:
            raise click.ClickException(
                f"cannot reach Redis: {e}. Start Redis or pass --redis URL (or set KNHK_REDIS)."
            ) from None

    return run


settings_option = click.option(
    "--settings", "settings_path", envvar="KNHK_SETTINGS", required=True,
    type=click.Path(dir_okay=False, path_type=Path), help="Chain settings TOML (env KNHK_SETTINGS).",
)  # fmt: skip
redis_option = click.option(
    "--redis", "redis_url", envvar=["KNHK_REDIS", "REDIS_URL"], default=DEFAULT_REDIS, show_default=True,
    help="Redis URL: redis://[user:password@]host:port/db, rediss:// for TLS (env KNHK_REDIS).",
)  # fmt: skip
prefix_option = click.option(
    "--prefix",
    envvar="KNHK_PREFIX",
    default="knhk",
    show_default=True,
    help="Redis key prefix (env KNHK_PREFIX).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="knhk-stream")
def main() -> None:
    """knhk-stream: a quorum-signed, hash-chained audit log of Kafka deltas (the lockchain)."""


# -- keys ---------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Peer signing keys (Ed25519)."""


@keys.command("generate")
@click.option("--peer-id", required=True, help="The peer id this key signs for (1..64 bytes).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Private key file to create (PKCS#8 PEM, mode 0600).")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def keys_generate(peer_id: str, out: Path, force: bool) -> None:
    """Create a private key file and print the public key and its [[peers]] entry."""
    from .quorum import generate_key, public_key_bytes, save_private_key

    if not 1 <= len(peer_id.encode("utf-8")) <= 64:
        raise click.BadParameter("must be 1 to 64 UTF-8 bytes", param_hint="--peer-id")
    key = generate_key()
    try:
        save_private_key(key, out, overwrite=force)
    except FileExistsError:
        raise click.ClickException(f"{out} exists; pass --force to replace it (the old key is lost)") from None
    pub = public_key_bytes(key).hex()
    click.echo(pub)
    click.echo(f"# add to the chain settings of every peer:\n[[peers]]\nid = {json.dumps(peer_id)}\n"
               f'public_key = "{pub}"', err=True)  # fmt: skip


# -- chain --------------------------------------------------------------------------------


@main.group()
def chain() -> None:
    """Read and verify the committed lockchain in Redis."""


def _store(settings: ChainSettings, redis_url: str, prefix: str):
    from .store import LockchainStore

    return LockchainStore.from_url(redis_url, settings.chain_id, prefix, socket_connect_timeout=5)


def _shards(store, shard: tuple[int, ...]) -> list[int]:
    return list(shard) if shard else store.shards()


shard_option = click.option("--shard", type=int, multiple=True, help="Shard(s); default: every shard with a head.")
range_options = [
    click.option("--from", "from_cycle", type=int, help="First cycle (inclusive)."),
    click.option("--to", "to_cycle", type=int, help="Last cycle (inclusive)."),
]


def _with_range(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(range_options):
        fn = opt(fn)
    return fn


@chain.command("show")
@settings_option
@redis_option
@prefix_option
@shard_option
@_with_range
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many entries per shard.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one entry per line.")
@_fail_cleanly
def chain_show(settings_path, redis_url, prefix, shard, from_cycle, to_cycle, limit, as_json) -> None:
    """Print committed entries (newest last)."""
    settings = ChainSettings.from_toml(settings_path)
    store = _store(settings, redis_url, prefix)
    rows = []
    for s in _shards(store, shard):
        entries = store.range(s, from_cycle, to_cycle)
        rows += entries[-limit:] if limit > 0 else entries
    if as_json:
        for ce in rows:
            click.echo(json.dumps(ce.to_json(), separators=(",", ":")))
        return
    if not rows:
        click.echo("no committed entries")
        return
    click.echo(f"{'shard':>5} {'cycle':>12} {'receipts':>8} {'offsets':>23}  {'root':16}  {'entry':16}  votes  by")
    for ce in rows:
        e = ce.entry
        click.echo(
            f"{e.shard:>5} {e.cycle:>12} {e.receipt_count:>8} {f'{e.first_offset}..{e.last_offset}':>23}  "
            f"{e.root.hex()[:16]}  {ce.entry_hash.hex()[:16]}  {len(ce.votes):>5}  {ce.committed_by}"
        )


@chain.command("verify")
@settings_option
@redis_option
@prefix_option
@shard_option
@_with_range
@click.option("--json", "as_json", is_flag=True, help="One JSON report per shard.")
@_fail_cleanly
def chain_verify(settings_path, redis_url, prefix, shard, from_cycle, to_cycle, as_json) -> None:
    """Verify hashes, links, quorum signatures, the cycles set and the head; exit 0 only if all hold."""
    from .store import verify_range

    settings = ChainSettings.from_toml(settings_path)
    store = _store(settings, redis_url, prefix)
    shards = _shards(store, shard)
    reports = [verify_range(store, settings, s, from_cycle, to_cycle) for s in shards]
    if as_json:
        for r in reports:
            click.echo(json.dumps(r.to_json()))
    else:
        if not reports:
            click.echo(f"no chain {settings.chain_id!r} under prefix {prefix!r} in Redis")
        for r in reports:
            state = "OK" if r.ok else "FAILED"
            click.echo(f"shard {r.shard}: {state}  {r.entries} entries, cycles {r.first_cycle}..{r.last_cycle}")
            for p in r.problems[:20]:
                click.echo(f"  {p}")
            if len(r.problems) > 20:
                click.echo(f"  ... and {len(r.problems) - 20} more problems")
    if not reports or not all(r.ok for r in reports):
        sys.exit(1)


# Commands that need the Kafka runtime live in their own modules.
from . import cli_audit, cli_produce, cli_roots, cli_run  # noqa: E402

main.add_command(cli_produce.topics)
main.add_command(cli_produce.produce)
for _cmd in (cli_run.worker, cli_run.status, cli_run.dev, cli_run.demo, *cli_audit.COMMANDS, *cli_roots.COMMANDS):
    main.add_command(_cmd)
for _cmd in cli_audit.CHAIN_COMMANDS:
    chain.add_command(_cmd)

"""`knhk-stream chain`: read, verify, export and import the committed lockchain in Redis."""

from __future__ import annotations

import json
import sys

import click

from knhk_stream.cli.common import fail_cleanly, open_store, range_options, shard_option, shards_of, store_options
from knhk_stream.protocol.settings import ChainSettings


@click.group()
def chain() -> None:
    """Read and verify the committed lockchain in Redis."""


@chain.command("show")
@store_options
@shard_option
@range_options
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many entries per shard.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one entry per line.")
@fail_cleanly
def chain_show(settings_path, redis_url, prefix, shard, from_cycle, to_cycle, limit, as_json) -> None:
    """Print committed entries (newest last)."""
    settings = ChainSettings.from_toml(settings_path)
    store = open_store(settings, redis_url, prefix)
    rows = []
    for s in shards_of(store, shard):
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
@store_options
@shard_option
@range_options
@click.option("--json", "as_json", is_flag=True, help="One JSON report per shard.")
@fail_cleanly
def chain_verify(settings_path, redis_url, prefix, shard, from_cycle, to_cycle, as_json) -> None:
    """Verify hashes, links, quorum signatures, the cycles set and the head; exit 0 only if all hold."""
    from knhk_stream.store.lockchain import verify_range

    settings = ChainSettings.from_toml(settings_path)
    store = open_store(settings, redis_url, prefix)
    shards = shards_of(store, shard)
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

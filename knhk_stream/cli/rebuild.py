"""`knhk-stream chain rebuild`: restore the Redis chain from the roots topic after Redis lost data."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from knhk_stream.cli.common import (
    client_config,
    fail_cleanly,
    kafka_options,
    open_store,
    require_kafka,
    resolve_topics,
    store_options,
)
from knhk_stream.protocol.settings import ChainSettings


@click.command("rebuild")
@store_options
@kafka_options
@click.option("--shard", type=int, multiple=True, help="Shard(s); default: every partition of the roots topic.")
@click.option("--dry-run", is_flag=True, help="Verify and count what would be restored; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@fail_cleanly
def rebuild(
    settings_path: Path,
    redis_url: str,
    prefix: str,
    bootstrap: str,
    topic_prefix: str | None,
    declarations: Path | None,
    kafka_config: tuple[str, ...],
    shard: tuple[int, ...],
    dry_run: bool,
    quiet: bool,
) -> None:
    """Restore each shard's chain in Redis from the roots topic (every entry's quorum verified).

    For a Redis that lost data: a restart without persistence, a flushed
    database, an old backup. Appends only what Redis lacks, from genesis by the
    links; refuses (exit 1) to write over a chain that conflicts with the roots
    topic, and says which shard and cycle.
    """
    from knhk_stream.errors import LockchainError
    from knhk_stream.kafka.history import read_roots
    from knhk_stream.store.rebuild import linked_chain, rebuild_shard

    settings = ChainSettings.from_toml(settings_path)
    topics = resolve_topics(declarations, topic_prefix)
    config, log = client_config(kafka_config)
    counts = require_kafka(bootstrap, config, log, " (chain rebuild reads the roots topic)")
    if topics.roots.name not in counts:
        raise click.ClickException(f"topic {topics.roots.name!r} does not exist at {bootstrap} (check --topic-prefix)")
    shards = list(shard) or list(range(counts[topics.roots.name]))
    store = open_store(settings, redis_url, prefix)
    history = read_roots(bootstrap, topics.roots.name, settings, shards, config)
    for f in history.findings:
        click.echo(f"ignored: {f}", err=True)
    failed = False
    for s in shards:
        chain = linked_chain(history.entries(s))
        for f in chain.findings:
            click.echo(f"shard {s}: {f}", err=True)
        try:
            with click.progressbar(length=len(chain.entries), label=f"shard {s}", file=sys.stderr,
                                   hidden=quiet) as bar:  # fmt: skip
                result = rebuild_shard(store, s, chain.entries, dry_run, bar.update)
        except LockchainError as e:
            click.echo(f"shard {s}: REFUSED: {e}")
            failed = True
            continue
        verb = "would restore" if dry_run else "restored"
        span = f" (cycles {result.first_cycle}..{result.last_cycle})" if result.appended else ""
        click.echo(f"shard {s}: {verb} {result.appended} entries{span}; {result.already} already in Redis")
    if failed:
        sys.exit(1)

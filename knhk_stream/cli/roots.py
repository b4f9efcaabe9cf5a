"""`knhk-stream roots tail`: follow the committed roots, each verified before it is shown."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import click

from knhk_stream.cli.common import (
    bootstrap_option,
    declarations_option,
    fail_cleanly,
    kafka_config_option,
    parse_kafka_config,
    resolve_topics,
    settings_option,
    setup_logging,
    topic_prefix_option,
)
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.runtime.node import Record


@click.group()
def roots() -> None:
    """Read the committed roots topic."""


@roots.command("tail")
@settings_option
@bootstrap_option
@topic_prefix_option
@declarations_option
@kafka_config_option
@click.option(
    "--group-id",
    envvar="KNHK_ROOTS_GROUP_ID",
    help="Consumer group to read in; members of one group split the shards and resume where it stopped "
    "(default: a fresh group per run, which takes no shards from anyone).",
)
@click.option(
    "--from-beginning",
    is_flag=True,
    help="Start at the first root (default: at the end), where the group has no committed offset.",
)
@click.option("--max", "max_roots", type=click.IntRange(min=1), help="Stop after this many roots.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one root per line.")
@click.option("--log-level", default="error", show_default=True, envvar="KNHK_LOG_LEVEL")
@fail_cleanly
def tail(
    settings_path: Path,
    bootstrap: str,
    topic_prefix: str | None,
    declarations: Path | None,
    kafka_config: tuple[str, ...],
    group_id: str | None,
    from_beginning: bool,
    max_roots: int | None,
    as_json: bool,
    log_level: str,
) -> None:
    """Print committed roots as peers publish them, in cycle order per shard.

    Each root is checked first: its entry hash, chain id, shard and key, its
    quorum signatures under the chain settings, and its link to the root before
    it. Duplicates are dropped; a record that fails a check is not printed but
    reported on stderr, and the exit status is then 1.
    """
    from knhk_stream.kafka.roots import InvalidRoot, RootsReader

    setup_logging(log_level)
    settings = ChainSettings.from_toml(settings_path)
    try:
        topics = resolve_topics(declarations, topic_prefix)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot load the topic declarations: {e}") from None

    def report(_record: Record, problem: InvalidRoot) -> None:
        click.echo(f"INVALID {problem}", err=True)

    try:
        reader = RootsReader(
            settings,
            bootstrap,
            group_id=group_id or f"knhk.roots.tail.{uuid.uuid4().hex[:12]}",
            topic=topics.roots.name,
            start="beginning" if from_beginning else "end",
            kafka_config=parse_kafka_config(kafka_config),
            on_invalid=report,
        )
    except (ConnectionError, LookupError) as e:
        raise click.ClickException(str(e)) from None
    shown = 0
    try:
        for ce in reader:
            threshold = settings.epoch_for(ce.entry.cycle).threshold
            click.echo(json.dumps(ce.to_json(), separators=(",", ":")) if as_json else _line(ce, threshold))
            shown += 1
            if max_roots is not None and shown >= max_roots:
                break
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
    s = reader.stats
    click.echo(f"{shown} roots shown, {s['duplicates']} duplicates dropped, {s['invalid']} invalid records", err=True)
    if s["invalid"]:
        sys.exit(1)


def _line(ce: CommittedEntry, threshold: int) -> str:
    e = ce.entry
    at = datetime.fromtimestamp(ce.committed_at_ms / 1000, UTC).isoformat(timespec="milliseconds")
    return (
        f"shard {e.shard} cycle {e.cycle}  {e.receipt_count} receipts  offsets {e.first_offset}..{e.last_offset}  "
        f"root {e.root.hex()[:16]}  entry {ce.entry_hash.hex()[:16]}  votes {len(ce.votes)}/{threshold}  "
        f"by {ce.committed_by} at {at}"
    )

"""`knhk-stream roots tail`: follow the committed roots, each verified before it is shown."""

from __future__ import annotations

import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import click

from knhk_stream.cli.common import (
    EXIT_ERROR,
    EXIT_NOT_YET,
    bootstrap_option,
    client_config,
    declarations_option,
    echo_json,
    fail_cleanly,
    kafka_config_option,
    require_kafka,
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
    "(default: a fresh group per run, which takes no shards from anyone; env KNHK_ROOTS_GROUP_ID).",
)
@click.option(
    "--from-beginning",
    is_flag=True,
    help="Start at the first root (default: at the end), where the group has no committed offset.",
)
@click.option(
    "--limit", "--max", "limit", type=click.IntRange(min=1), metavar="N",
    help="Stop after N roots (--max is the old name).",
)  # fmt: skip
@click.option(
    "--exit-at-end", "-e", is_flag=True,
    help="Stop at the end of the topic (like kcat -e): once this member holds its shards and no root arrives "
    "for a second.",
)  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
    help="Stop when no root arrived for S seconds; exit 75 if none was shown at all.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one root per line.")
@click.option(
    "--log-level", default="error", show_default=True, envvar="KNHK_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="debug also shows the Kafka client's own lines (env KNHK_LOG_LEVEL).",
)  # fmt: skip
@fail_cleanly
def tail(
    settings_path: Path,
    bootstrap: str,
    topic_prefix: str | None,
    declarations: Path | None,
    kafka_config: tuple[str, ...],
    group_id: str | None,
    from_beginning: bool,
    limit: int | None,
    exit_at_end: bool,
    timeout: float | None,
    as_json: bool,
    log_level: str,
) -> None:
    """Print committed roots as peers publish them, in cycle order per shard.

    Each root is checked first: its entry hash, chain id, shard and key, its
    quorum signatures under the chain settings, and its link to the root before
    it. Duplicates are dropped; a record that fails a check is not printed but
    reported on stderr, and the exit status is then 1. Runs until Ctrl-C,
    --limit, --exit-at-end or --timeout.
    """
    from knhk_stream.kafka.roots import InvalidRoot, RootsReader

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: the reader commits and leaves its group

    signal.signal(signal.SIGTERM, on_term)
    setup_logging(log_level)
    settings = ChainSettings.from_toml(settings_path)
    topics = resolve_topics(declarations, topic_prefix)
    config, log = client_config(kafka_config)
    require_kafka(bootstrap, config, log)

    def report(_record: Record, problem: InvalidRoot) -> None:
        click.echo(f"INVALID {problem}", err=True)

    try:
        reader = RootsReader(
            settings,
            bootstrap,
            group_id=group_id or f"knhk.roots.tail.{uuid.uuid4().hex[:12]}",
            topic=topics.roots.name,
            start="beginning" if from_beginning else "end",
            kafka_config=config,
            on_invalid=report,
        )
    except (ConnectionError, LookupError) as e:
        raise click.ClickException(str(e)) from None
    shown = 0
    idle_since = time.monotonic()
    why = "interrupted"
    try:
        while True:
            ce = reader.poll(0.25)
            now = time.monotonic()
            if ce is None:
                if exit_at_end and reader.assignment and now - idle_since >= 1.0:
                    why = "at the end of the topic"
                    break
                if timeout is not None and now - idle_since >= timeout:
                    why = f"no root for {timeout:g} s"
                    break
                continue
            idle_since = now
            threshold = settings.epoch_for(ce.entry.cycle).threshold
            if as_json:
                echo_json(ce.to_json())
            else:
                click.echo(_line(ce, threshold))
            shown += 1
            if limit is not None and shown >= limit:
                why = f"--limit {limit} reached"
                break
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
    s = reader.stats
    click.echo(
        f"{shown} roots shown, {s['duplicates']} duplicates dropped, {s['invalid']} invalid records ({why})", err=True
    )
    if s["invalid"]:
        sys.exit(EXIT_ERROR)
    if timeout is not None and not shown and why.startswith("no root"):
        sys.exit(EXIT_NOT_YET)


def _line(ce: CommittedEntry, threshold: int) -> str:
    e = ce.entry
    at = datetime.fromtimestamp(ce.committed_at_ms / 1000, UTC).isoformat(timespec="milliseconds")
    return (
        f"shard {e.shard} cycle {e.cycle}  {e.receipt_count} receipts  offsets {e.first_offset}..{e.last_offset}  "
        f"root {e.root.hex()[:16]}  entry {ce.entry_hash.hex()[:16]}  votes {len(ce.votes)}/{threshold}  "
        f"by {ce.committed_by} at {at}"
    )

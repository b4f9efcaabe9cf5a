"""`knhk-stream chain`: read, verify, export and import the committed lockchain in Redis."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from knhk_stream.cli.common import (
    client_config,
    declarations_option,
    delta_log,
    fail_cleanly,
    kafka_config_option,
    kafka_options,
    open_store,
    range_options,
    resolve_topics,
    shard_option,
    shards_of,
    store_options,
    topic_prefix_option,
)
from knhk_stream.protocol.settings import ChainSettings


@click.group()
def chain() -> None:
    """Read and verify the committed lockchain in Redis."""


@chain.command("show")
@store_options
@shard_option
@range_options
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many entries per shard.")
@click.option(
    "--rejected",
    is_flag=True,
    help="Add each entry's rejected receipts per code. Redis holds only the beats' roots, so this replays the "
    "shown entries' records from Kafka (--bootstrap): one read of their offsets per shard.",
)
@kafka_options
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one entry per line.")
@fail_cleanly
def chain_show(
    settings_path,
    redis_url,
    prefix,
    shard,
    from_cycle,
    to_cycle,
    limit,
    rejected,
    bootstrap,
    topic_prefix,
    declarations,
    kafka_config,
    as_json,
) -> None:
    """Print committed entries (newest last)."""
    settings = ChainSettings.from_toml(settings_path)
    store = open_store(settings, redis_url, prefix)
    log = delta_log(bootstrap, topic_prefix, declarations, kafka_config) if rejected else None
    rows = []
    codes: dict[tuple[int, int], dict[str, int]] = {}
    for s in shards_of(store, shard):
        entries = store.range(s, from_cycle, to_cycle)
        kept = entries[-limit:] if limit > 0 else entries
        if len(kept) < len(entries):
            click.echo(f"shard {s}: the last {len(kept)} of {len(entries)} entries (--limit {limit}; 0 for all)",
                       err=True)  # fmt: skip
        if log is not None:
            from knhk_stream.audit.core import rejections

            codes.update({(s, c): k for c, k in rejections(settings, log, s, kept).items()})
        rows += kept
    if as_json:
        for ce in rows:
            obj = ce.to_json()
            if log is not None:
                obj["rejected"] = codes.get((ce.entry.shard, ce.entry.cycle), {})
            click.echo(json.dumps(obj, separators=(",", ":")))
        return
    if not rows:
        click.echo("no committed entries")
        return
    extra = "  rejected" if log is not None else ""
    click.echo(f"{'shard':>5} {'cycle':>12} {'receipts':>8} {'offsets':>23}  {'root':16}  {'entry':16}  votes  "
               f"{'by':<12}{extra}")  # fmt: skip
    for ce in rows:
        e = ce.entry
        line = (
            f"{e.shard:>5} {e.cycle:>12} {e.receipt_count:>8} {f'{e.first_offset}..{e.last_offset}':>23}  "
            f"{e.root.hex()[:16]}  {ce.entry_hash.hex()[:16]}  {len(ce.votes):>5}  {ce.committed_by:<12}"
        )
        if log is not None:
            got = codes.get((e.shard, e.cycle), {})
            line += "  " + (", ".join(f"{code} {k:,}" for code, k in sorted(got.items())) or "none")
        click.echo(line.rstrip())


@chain.command("verify")
@store_options
@shard_option
@range_options
@click.option(
    "--bootstrap",
    "--bootstrap-server",
    "bootstrap",
    default=None,
    metavar="H:P",
    help="Also check Redis against the roots topic on this Kafka: a valid root missing from Redis (truncation, "
    "deletion), another entry at its cycle (a fork), or a shard with roots and no chain fails. Without it, only "
    "Redis is read (no environment variable turns this on).",
)
@topic_prefix_option
@declarations_option
@kafka_config_option
@click.option(
    "--pin",
    "pin_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Keep the newest verified head per shard in FILE (created on first use) and fail, naming shard and "
    "cycle, when the chain no longer contains a pinned head.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON report per shard.")
@fail_cleanly
def chain_verify(
    settings_path,
    redis_url,
    prefix,
    shard,
    from_cycle,
    to_cycle,
    bootstrap,
    topic_prefix,
    declarations,
    kafka_config,
    pin_path,
    as_json,
) -> None:
    """Verify hashes, links, quorum signatures, the cycles set and the head; exit 0 only if all hold.

    A chain cut short still verifies on its own: --bootstrap compares it with the
    roots topic (the second copy of every committed entry), --pin with the heads
    verified before (protocol "Verification").
    """
    from knhk_stream.store.lockchain import Pin, VerifyReport, load_pins, pin_problems, save_pins, verify_range

    settings = ChainSettings.from_toml(settings_path)
    store = open_store(settings, redis_url, prefix)
    pins = load_pins(pin_path, settings.chain_id, prefix) if pin_path is not None else {}
    roots = None
    if bootstrap is not None:
        from knhk_stream.kafka.roots import cross_check

        config, _log = client_config(kafka_config)
        topic = resolve_topics(declarations, topic_prefix).roots.name
        roots = cross_check(store, settings, bootstrap, topic, config, list(shard) or None, from_cycle, to_cycle)
    wanted = set(shard)
    shards = set(shards_of(store, shard))
    shards |= {s for s in pins if not wanted or s in wanted}
    shards |= set(roots.shards) if roots is not None else set()
    reports: list[VerifyReport] = []
    for s in sorted(shards):
        r = verify_range(store, settings, s, from_cycle, to_cycle)
        if roots is not None:
            r.problems.extend(roots.problems.get(s, []))
        if s in pins:
            r.problems.extend(pin_problems(store, s, pins[s]))
        reports.append(r)
    if pin_path is not None:
        for r in reports:
            reaches_head = r.head is not None and (to_cycle is None or r.head.cycle <= to_cycle)
            old = pins.get(r.shard)
            if r.ok and reaches_head and r.head is not None and (old is None or r.head.cycle > old.cycle):
                pins[r.shard] = Pin(r.head.cycle, r.head.entry_hash)
        save_pins(pin_path, settings.chain_id, prefix, pins)
    if as_json:
        if not reports:
            click.echo(json.dumps({"chain_id": settings.chain_id, "prefix": prefix, "ok": False,
                                   "problem": "no chain under this prefix in Redis"}))  # fmt: skip
        for r in reports:
            out = r.to_json()
            if roots is not None:
                out["roots"] = {"topic": roots.topic, "valid": roots.valid, "invalid": roots.invalid,
                                "newest_cycle": roots.newest.get(r.shard)}  # fmt: skip
            click.echo(json.dumps(out))
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
        if roots is not None:
            click.echo(f"roots topic {roots.topic}: {roots.records} records read, {roots.valid} valid roots checked "
                       f"against Redis, {roots.invalid} not valid (ignored)")  # fmt: skip
        if pin_path is not None:
            click.echo(f"pins: {pin_path} ({len(pins)} shards pinned)")
    if not reports or not all(r.ok for r in reports):
        sys.exit(1)

"""Auditor commands: `prove`, `verify-proof`, `audit`, and `chain export` / `chain import`.

Exit status (docs/cli.md): 0 all good; 1 something is wrong (a failed check, a
difference, a refused import, nothing to prove at that offset); 3 Kafka no longer
holds records that are needed (retention); 75 not committed yet, try again later.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from knhk_stream.cli.common import (
    EXIT_ATTENTION,
    EXIT_ERROR,
    EXIT_NOT_YET,
    ExitWith,
    delta_log,
    echo_json,
    fail_cleanly,
    kafka_options,
    open_store,
    range_options,
    resolve_topics,
    settings_option,
    shard_option,
    shards_of,
    store_options,
)
from knhk_stream.protocol.jsontext import loads_json
from knhk_stream.protocol.settings import ChainSettings

if TYPE_CHECKING:
    from knhk_stream.audit.core import AuditReport, DeltaLog
    from knhk_stream.store import LockchainStore


def _audit_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Each as one clear line: records gone (retention) exit 3; AuditError, refused imports and nothing to
    prove exit 1 (`prove` itself exits 75 when the beat is not committed yet)."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from knhk_stream.errors import AuditError, ChainImportError, LockchainError, ProofUnavailable, RecordsGone

        try:
            return fn(*args, **kwargs)
        except RecordsGone as e:
            raise ExitWith(str(e), EXIT_ATTENTION) from None
        except ProofUnavailable as e:
            raise ExitWith(str(e), EXIT_ERROR) from None
        except ChainImportError as e:
            raise ExitWith(f"import refused, nothing was written: {e}", 1) from None
        except (AuditError, LockchainError) as e:
            raise ExitWith(str(e), 1) from None

    return run


# -- prove / verify-proof -----------------------------------------------------------------


@click.command()
@store_options
@kafka_options
@click.option("--shard", type=int, multiple=True, help="The shard (partition of the deltas topic); with --id: "
              "the shard(s) to search (repeatable; default every shard with a chain).")  # fmt: skip
@click.option("--offset", type=int, help="The delta's offset in that partition (from `produce --report`).")
@click.option("--id", "delta_id", metavar="ID", help="Find the delta by its `id` field, not --offset (see below).")
@range_options
@click.option("--hash-only", is_flag=True, help="Put only the value's hash (delta_hash) in the bundle, not the value.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the bundle here (default: stdout).")
@click.option(
    "--wait", type=click.FloatRange(min=0), default=0, metavar="S",
    help="While the delta is not committed yet (exit 75), try again for up to S seconds.",
)  # fmt: skip
@fail_cleanly
@_audit_errors
def prove(
    settings_path,
    redis_url,
    prefix,
    bootstrap,
    topic_prefix,
    declarations,
    kafka_config,
    shard,
    offset,
    delta_id,
    from_cycle,
    to_cycle,
    hash_only,
    out,
    wait,
) -> None:
    """Write a self-contained JSON proof that one delta is in the committed chain.

    Name the delta by --shard S --offset O (`produce --report` prints both), or
    by --id ID. The beat is found in Redis by binary search and replayed from
    Kafka; the bundle is checked before it is written. Exit 75 when the beat is
    not committed yet (try again later; --wait S does, for up to S seconds), 1
    when there is nothing to prove there (a tick marker, no such record), 3 when
    Kafka no longer holds the record.

    --id searches the committed beats of the shard(s) in the cycle range
    --from/--to (default: the whole chain) in cycle order: it reads every record
    of those beats from Kafka once and decodes it, so it costs as much as
    `audit` over that range; narrow it with --shard and --from/--to. Not found
    up to the head exits 75 (its beat may not be committed yet); not found
    before --to exits 1. A value that does not decode has no id to find: prove
    it by --offset.
    """
    from knhk_stream.audit.core import build_bundle

    if (offset is None) == (delta_id is None):
        raise click.UsageError("give --offset O (with --shard S) or --id ID")
    if offset is not None and len(shard) != 1:
        raise click.UsageError("--offset needs exactly one --shard S")
    if offset is not None and (from_cycle is not None or to_cycle is not None):
        raise click.UsageError("--from/--to only narrow the search of --id")
    settings = ChainSettings.from_toml(settings_path)
    store = open_store(settings, redis_url, prefix)
    log = delta_log(bootstrap, topic_prefix, declarations, kafka_config)

    def find() -> tuple[int, int]:
        if offset is not None:
            _committed_yet(store, settings, shard[0], offset)
            return shard[0], offset
        return _find_id(store, log, shards_of(store, shard), delta_id, from_cycle, to_cycle)

    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            where = find()
            break
        except ExitWith as e:
            if e.exit_code != EXIT_NOT_YET or time.monotonic() >= deadline:
                raise
            if not said:
                said = True
                click.echo(f"not committed yet; trying again for up to {wait:g} s (--wait)", err=True)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    bundle = build_bundle(store, settings, log, where[0], where[1], hash_only)
    text = json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, "utf-8")
    click.echo(
        f"proof of offset {where[1]} of shard {where[0]} (cycle {bundle['cycle']}, leaf {bundle['leaf_index']} of "
        f"{bundle['tree_size']}) {f'written to {out}' if out else 'written'}; check it with `knhk-stream verify-proof`",
        err=True,
    )


def _committed_yet(store: LockchainStore, settings: ChainSettings, shard: int, offset: int) -> None:
    """Exit 75 (try again later) when no committed beat reaches `offset` yet."""
    head = store.head(shard)
    ce = store.get(shard, head.cycle) if head is not None else None
    if ce is None:
        raise ExitWith(
            f"shard {shard} of chain {settings.chain_id!r} has no committed entry under Redis prefix "
            f"{store.prefix!r} yet: try again once peers commit (see `knhk-stream status`), or check "
            "--prefix/--settings",
            EXIT_NOT_YET,
        )
    if offset > ce.entry.last_offset:
        raise ExitWith(
            f"offset {offset} of shard {shard} is not committed yet (or not written yet): the committed head is "
            f"cycle {ce.entry.cycle} (offsets {ce.entry.first_offset}..{ce.entry.last_offset}). Its beat is still "
            f"open or waiting for a quorum; try again once it closes (a beat is {8 * settings.tick_ms} ms), or see "
            "`knhk-stream status`",
            EXIT_NOT_YET,
        )


def _find_id(
    store: LockchainStore,
    log: DeltaLog,
    shards: list[int],
    delta_id: str,
    from_cycle: int | None,
    to_cycle: int | None,
) -> tuple[int, int]:
    """(shard, offset) of the first delta with this id in the committed beats searched (see `prove --help`)."""
    from knhk_stream.protocol.decode import Delta, decode_delta

    found: list[tuple[int, int]] = []
    read = 0
    searched = []
    for s in shards:
        cycles = store.cycles(s, from_cycle, to_cycle)
        first = store.get(s, cycles[0]) if cycles else None
        last = store.get(s, cycles[-1]) if cycles else None
        if first is None or last is None:
            continue
        searched.append(f"shard {s} cycles {cycles[0]}..{cycles[-1]}")
        end = last.entry.last_offset
        for r in log.read(s, first.entry.first_offset, end):
            if r.offset > end:
                break
            read += 1
            if not r.marker:
                d = decode_delta(r.value, max_triples=1 << 62)
                if isinstance(d, Delta) and d.id == delta_id:
                    found.append((s, r.offset))
        if found:
            break
    scope = "; ".join(searched) or "no committed beats"
    if not found:
        open_ended = to_cycle is None  # searched up to the heads: a later beat may still hold it
        raise ExitWith(
            f"no delta with id {delta_id!r} in the committed beats searched ({scope}; {read} records read)"
            + (
                ": its beat may not be committed yet (try again, or --wait S; see `knhk-stream status`), or no "
                "delta has this id (check it, or narrow --shard, --from and --to)"
                if open_ended
                else ": widen --from/--to or --shard"
            ),
            EXIT_NOT_YET if open_ended else EXIT_ERROR,
        )
    others = ", ".join(f"offset {o}" for _, o in found[1:])
    click.echo(
        f"id {delta_id!r} found at shard {found[0][0]} offset {found[0][1]} ({read} records read)"
        + (f"; it is also at {others} of that shard (sent twice?): prove those with --offset" if others else ""),
        err=True,
    )
    return found[0]


@click.command("verify-proof")
@click.argument("bundle", type=click.File("r", encoding="utf-8"))
@settings_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@fail_cleanly
def verify_proof(bundle: IO[str], settings_path: Path, as_json: bool) -> None:
    """Check a proof bundle (a file, or - for stdin) offline: no Kafka, no Redis, only the chain settings.

    record -> delta_hash -> receipt -> audit path -> root -> entry hash -> quorum.
    Prints each step; exit 1 naming the step that failed.
    """
    from knhk_stream.protocol.proof import BundleCheck, StepResult, verify_bundle

    settings = ChainSettings.from_toml(settings_path)
    try:
        data = loads_json(bundle.read())
    except ValueError as e:
        msg = f"{bundle.name} is not JSON: {e}"
        check = BundleCheck(False, "bundle", f"step bundle failed: {msg}", [StepResult("bundle", False, msg)])
    else:
        check = verify_bundle(data, settings)
    if as_json:
        echo_json(check.to_json())
    else:
        for step in check.steps:
            click.echo(f"{step.name:<11} {'OK' if step.ok else 'FAILED':<6} {step.message}")
        click.echo(f"proof OK: {check.message}" if check.ok else f"proof FAILED at step {check.failed_step}")
    if not check.ok:
        sys.exit(EXIT_ERROR)


# -- audit --------------------------------------------------------------------------------


@click.command()
@store_options
@kafka_options
@click.option("--shard", type=int, multiple=True, help="Shard to audit (repeatable).")
@click.option("--all-shards", is_flag=True, help="Audit every shard that has a chain in Redis.")
@range_options
@click.option("--json", "as_json", is_flag=True, help="One JSON report per shard instead of the table.")
@fail_cleanly
@_audit_errors
def audit(
    settings_path,
    redis_url,
    prefix,
    bootstrap,
    topic_prefix,
    declarations,
    kafka_config,
    shard,
    all_shards,
    from_cycle,
    to_cycle,
    as_json,
) -> None:
    """Verify the chain, then replay its beats from Kafka and compare every root, count and offset.

    Exit 0 when everything matches, 1 at the first difference or chain problem,
    3 when Kafka no longer holds some beats' records (retention).
    """
    from knhk_stream.audit.core import audit_shard, cross_check_roots

    if bool(shard) == all_shards:
        raise click.UsageError("give --shard S (repeatable) or --all-shards")
    settings = ChainSettings.from_toml(settings_path)
    store = open_store(settings, redis_url, prefix)
    log = delta_log(bootstrap, topic_prefix, declarations, kafka_config)
    # The roots topic against Redis (truncation, deletion, forks); its end offsets are noted before Redis is read.
    roots_topic = resolve_topics(declarations, topic_prefix).roots.name
    roots = cross_check_roots(store, settings, log, roots_topic, list(shard) or None, from_cycle, to_cycle)
    shards = list(shard) if shard else sorted(set(store.shards()) | set(roots.shards))
    if not shards:
        raise ExitWith(f"no chain {settings.chain_id!r} under Redis prefix {prefix!r}: nothing to audit", EXIT_ERROR)
    reports = []
    for s in shards:
        total = store.count(s, from_cycle, to_cycle)
        with click.progressbar(length=total, label=f"shard {s}", file=sys.stderr, show_pos=True) as bar:
            reports.append(audit_shard(store, settings, log, s, from_cycle, to_cycle, progress=bar.update, roots=roots))
    if as_json:
        for r in reports:
            echo_json(r.to_json())
    else:
        click.echo(_table(reports))
    if any(r.status == "FAILED" for r in reports):
        sys.exit(EXIT_ERROR)
    if any(r.status == "INCOMPLETE" for r in reports):
        sys.exit(EXIT_ATTENTION)


def _table(reports: list[AuditReport]) -> str:
    lines = [f"{'shard':>5}  {'status':<10} {'entries':>8} {'replayed':>8} {'receipts':>9} {'records':>9}  "
             f"{'cycles':<27} {'seconds':>7}"]  # fmt: skip
    for r in reports:
        cycles = f"{r.first_cycle}..{r.last_cycle}" if r.first_cycle is not None else "-"
        lines.append(
            f"{r.shard:>5}  {r.status:<10} {r.entries:>8} {r.replayed:>8} {r.receipts:>9} {r.records:>9}  "
            f"{cycles:<27} {r.seconds:>7.2f}"
        )
    for r in reports:
        for p in r.problems():
            lines.append(f"shard {r.shard}: {p}")
    if all(r.ok for r in reports):
        lines.append("audit OK: every chain verifies and every replayed beat matches its committed entry")
    return "\n".join(lines)


# -- chain export / import ----------------------------------------------------------------


@click.command("export")
@store_options
@shard_option
@range_options
@click.option("--out", type=click.File("w", encoding="utf-8"), default="-", help="JSON Lines file (default: stdout).")
@fail_cleanly
@_audit_errors
def export(settings_path, redis_url, prefix, shard, from_cycle, to_cycle, out) -> None:
    """Write the committed chain as JSON Lines: one entry with its votes per line, in cycle order."""
    from knhk_stream.audit.core import export_chain

    settings = ChainSettings.from_toml(settings_path)
    counts = export_chain(open_store(settings, redis_url, prefix), out, list(shard) or None, from_cycle, to_cycle)
    out.flush()
    summary = ", ".join(f"shard {s}: {n}" for s, n in counts.items()) or "no shards"
    click.echo(f"exported {sum(counts.values())} entries ({summary})", err=True)


@click.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@store_options
@click.option("--dry-run", is_flag=True, help="Verify everything, write nothing.")
@fail_cleanly
@_audit_errors
def import_(file, settings_path, redis_url, prefix, dry_run) -> None:
    """Verify a JSON Lines chain (FILE, or - for stdin: hashes, links, quorum signatures, chain id), then append it.

    Refuses, writing nothing, any line that is tampered with or that would fork
    the chain in Redis or leave a hole; identical entries already present are skipped.
    """
    from knhk_stream.audit.core import import_chain

    settings = ChainSettings.from_toml(settings_path)
    result = import_chain(open_store(settings, redis_url, prefix), settings, file, dry_run=dry_run)
    verb = "would append" if dry_run else "appended"
    for s in sorted(result.appended):
        click.echo(f"shard {s}: {verb} {result.appended[s]}, {result.skipped[s]} already present")
    click.echo(f"{'dry run: ' if dry_run else ''}{result.total_appended} entries {verb}, all verified")

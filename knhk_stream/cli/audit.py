"""Auditor commands: `prove`, `verify-proof`, `audit`, and `chain export` / `chain import`.

Exit status: 0 all good; 1 something is wrong (a failed check, a difference,
a refused import); 2 no proof can be made for that offset (yet); 3 the audit
could not replay everything because Kafka no longer holds some records.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from knhk_stream.cli.common import (
    ExitWith,
    fail_cleanly,
    kafka_options,
    open_store,
    parse_kafka_config,
    range_options,
    resolve_topics,
    settings_option,
    shard_option,
    store_options,
)
from knhk_stream.protocol.settings import ChainSettings

if TYPE_CHECKING:
    from knhk_stream.audit.core import AuditReport, DeltaLog


def _audit_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """AuditError and refused imports exit 1, ProofUnavailable exits 2, each as one clear line."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from knhk_stream.errors import AuditError, ChainImportError, LockchainError, ProofUnavailable

        try:
            return fn(*args, **kwargs)
        except ProofUnavailable as e:
            raise ExitWith(str(e), 2) from None
        except ChainImportError as e:
            raise ExitWith(f"import refused, nothing was written: {e}", 1) from None
        except (AuditError, LockchainError) as e:
            raise ExitWith(str(e), 1) from None

    return run


def _log(
    bootstrap: str, topic_prefix: str | None, declarations: Path | None, kafka_config: tuple[str, ...]
) -> DeltaLog:
    from knhk_stream.audit.core import DeltaLog

    topics = resolve_topics(declarations, topic_prefix)
    return DeltaLog(bootstrap, topics.deltas.name, parse_kafka_config(kafka_config))


# -- prove / verify-proof -----------------------------------------------------------------


@click.command()
@store_options
@kafka_options
@click.option("--shard", type=int, required=True, help="The shard (partition of the deltas topic).")
@click.option("--offset", type=int, required=True, help="The delta's offset in that partition.")
@click.option("--hash-only", is_flag=True, help="Put only the value's hash (delta_hash) in the bundle, not the value.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the bundle here (default: stdout).")
@fail_cleanly
@_audit_errors
def prove(
    settings_path, redis_url, prefix, bootstrap, topic_prefix, declarations, kafka_config, shard, offset, hash_only, out
) -> None:
    """Write a self-contained JSON proof that the delta at OFFSET is in the committed chain.

    The beat is found in Redis by binary search and replayed from Kafka; the
    bundle is checked before it is written. Exit 2 when there is nothing to
    prove (yet): the beat is not committed, the record is a tick marker, or
    Kafka no longer holds the record.
    """
    from knhk_stream.audit.core import build_bundle

    settings = ChainSettings.from_toml(settings_path)
    log = _log(bootstrap, topic_prefix, declarations, kafka_config)
    bundle = build_bundle(open_store(settings, redis_url, prefix), settings, log, shard, offset, hash_only)
    text = json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, "utf-8")
    where = f"written to {out}" if out else "written"
    click.echo(
        f"proof of offset {offset} of shard {shard} (cycle {bundle['cycle']}, receipt {bundle['leaf_index'] + 1} "
        f"of {bundle['tree_size']}) {where}; check it with `knhk-stream verify-proof`",
        err=True,
    )


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
        data = json.load(bundle)
    except ValueError as e:
        msg = f"{bundle.name} is not JSON: {e}"
        check = BundleCheck(False, "bundle", f"step bundle failed: {msg}", [StepResult("bundle", False, msg)])
    else:
        check = verify_bundle(data, settings)
    if as_json:
        click.echo(json.dumps(check.to_json(), indent=2))
    else:
        for step in check.steps:
            click.echo(f"{step.name:<11} {'OK' if step.ok else 'FAILED':<6} {step.message}")
        click.echo(f"proof OK: {check.message}" if check.ok else f"proof FAILED at step {check.failed_step}")
    if not check.ok:
        sys.exit(1)


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
    from knhk_stream.audit.core import audit_shard

    if bool(shard) == all_shards:
        raise click.UsageError("give --shard S (repeatable) or --all-shards")
    settings = ChainSettings.from_toml(settings_path)
    store = open_store(settings, redis_url, prefix)
    log = _log(bootstrap, topic_prefix, declarations, kafka_config)
    shards = list(shard) if shard else store.shards()
    if not shards:
        raise ExitWith(f"no chain {settings.chain_id!r} under Redis prefix {prefix!r}: nothing to audit", 1)
    reports = []
    for s in shards:
        total = store.count(s, from_cycle, to_cycle)
        with click.progressbar(length=total, label=f"shard {s}", file=sys.stderr, show_pos=True) as bar:
            reports.append(audit_shard(store, settings, log, s, from_cycle, to_cycle, progress=bar.update))
    if as_json:
        for r in reports:
            click.echo(json.dumps(r.to_json()))
    else:
        click.echo(_table(reports))
    if any(r.status == "FAILED" for r in reports):
        sys.exit(1)
    if any(r.status == "INCOMPLETE" for r in reports):
        sys.exit(3)


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
    """Verify a JSON Lines chain (hashes, links, quorum signatures, chain id), then append it.

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

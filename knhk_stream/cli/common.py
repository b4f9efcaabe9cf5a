"""What every command module shares: options, error handling, logging, opening the store.

Command modules import this module and nothing else of the CLI. Kafka and Redis
are imported inside functions, so that `knhk-stream verify-proof` works on a
plain install without the Kafka extra.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from knhk_stream.errors import KnhkError, MissingExtra
from knhk_stream.kafka.topics import Topics, load_topics
from knhk_stream.protocol.settings import ChainSettings

if TYPE_CHECKING:
    from knhk_stream.audit.core import DeltaLog
    from knhk_stream.kafka.admin import ClientLog
    from knhk_stream.store import LockchainStore

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
F = Callable[..., Any]

# The exit codes of every command (docs/cli.md, "Exit codes"; tests/cli/test_conventions.py).
EXIT_OK = 0  # did what was asked, found nothing wrong
EXIT_ERROR = 1  # one `Error:` line on stderr (unreachable service, bad input, a failed check)
EXIT_USAGE = 2  # the option parser refused the command line (click's own code)
EXIT_ATTENTION = 3  # done, but found a condition to act on: a stall, equivocation, records gone by retention
EXIT_NOT_YET = 75  # not yet, try again later (EX_TEMPFAIL of sysexits.h): e.g. the beat is not committed yet

KAFKA_TIMEOUT_ENV = "KNHK_KAFKA_TIMEOUT"


def kafka_timeout() -> float:
    """How long a one-shot command waits for Kafka to answer before it gives up (env KNHK_KAFKA_TIMEOUT, 5 s)."""
    raw = os.environ.get(KAFKA_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else 5.0
    except ValueError:
        raise click.ClickException(f"{KAFKA_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return value if value > 0 else 5.0


def echo_json(obj: Any) -> None:
    """One JSON value on one line of stdout: the one --json shape (JSON Lines), docs/cli.md "JSON output"."""
    click.echo(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


class ExitWith(click.ClickException):
    """A one-line error with a chosen exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail_cleanly(fn: F) -> F:
    """Turn the errors a user can fix into one clear line (exit status 1), not a traceback."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.ConnectionError as e:
            raise click.ClickException(
                f"cannot reach Redis: {str(e).rstrip('.')}. Start Redis or pass --redis URL (or set KNHK_REDIS)."
            ) from None
        except KnhkError as e:
            raise click.ClickException(str(e)) from None
        except ModuleNotFoundError as e:
            if e.name == "confluent_kafka":
                raise click.ClickException(
                    str(MissingExtra(f"`{click.get_current_context().command_path}`", "kafka"))
                ) from None
            raise
        except Exception as e:
            kafka = sys.modules.get("confluent_kafka")
            if kafka is not None and isinstance(e, kafka.KafkaException):
                err = e.args[0] if e.args else e
                raise click.ClickException(f"Kafka: {err.str() if hasattr(err, 'str') else err}") from None
            raise

    return run


def options(*opts: Callable[[F], F]) -> Callable[[F], F]:
    """Stack several click options as one decorator, in the order given."""

    def apply(fn: F) -> F:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


settings_option = click.option(
    "--settings", "settings_path", envvar="KNHK_SETTINGS", required=True,
    type=click.Path(dir_okay=False, path_type=Path), help="Chain settings TOML (env KNHK_SETTINGS).",
)  # fmt: skip
redis_option = click.option(
    "--redis", "redis_url", envvar=["KNHK_REDIS", "REDIS_URL"], default=DEFAULT_REDIS, show_default=True,
    help="Redis URL: redis://[user:password@]host:port/db, rediss:// for TLS (env KNHK_REDIS).",
)  # fmt: skip
prefix_option = click.option(
    "--prefix", envvar="KNHK_PREFIX", default="knhk", show_default=True, help="Redis key prefix (env KNHK_PREFIX)."
)
bootstrap_option = click.option(
    "--bootstrap",
    "--bootstrap-server",
    "bootstrap",
    envvar="KNHK_BOOTSTRAP",
    default=DEFAULT_BOOTSTRAP,
    show_default=True,
    help="Kafka bootstrap servers (env KNHK_BOOTSTRAP).",
)
kafka_config_option = click.option(
    "--kafka-config",
    "kafka_config",
    multiple=True,
    envvar="KNHK_KAFKA_CONFIG",
    metavar="KEY=VALUE",
    help="Any librdkafka setting, e.g. security.protocol=SASL_SSL (repeatable; env KNHK_KAFKA_CONFIG).",
)
topic_prefix_option = click.option(
    "--topic-prefix",
    envvar="KNHK_TOPIC_PREFIX",
    default=None,
    metavar="P",
    help="Use P.deltas, P.votes, P.roots instead of the declared names (env KNHK_TOPIC_PREFIX).",
)
declarations_option = click.option(
    "--declarations",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="KNHK_TOPICS",
    help="Topic declarations TOML (default: the packaged topics/knhk.toml; env KNHK_TOPICS).",
)
kafka_options = options(bootstrap_option, topic_prefix_option, declarations_option, kafka_config_option)
store_options = options(settings_option, redis_option, prefix_option)
shard_option = click.option("--shard", type=int, multiple=True, help="Shard(s); default: every shard with a head.")
range_options = options(
    click.option("--from", "from_cycle", type=int, help="First cycle (inclusive)."),
    click.option("--to", "to_cycle", type=int, help="Last cycle (inclusive)."),
)


def parse_kafka_config(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--kafka-config")
        out[key.strip()] = value.strip()
    return out


def resolve_topics(declarations: Path | None, topic_prefix: str | None) -> Topics:
    try:
        topics = load_topics(declarations)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot load the topic declarations: {e}") from None
    return topics.renamed(topic_prefix) if topic_prefix else topics


def client_config(kafka_config: tuple[str, ...]) -> tuple[dict[str, Any], ClientLog]:
    """The --kafka-config settings plus a logger that routes librdkafka's log through ours.

    Every Kafka client a command makes gets these, so that an unreachable broker
    does not flood stderr: the client's lines go, deduplicated, to the logger
    `knhk_stream.kafka.client` at DEBUG (`--log-level debug` shows them), and the
    command quotes the last one in its own one-line error.
    """
    from knhk_stream.kafka.admin import ClientLog

    log = ClientLog()
    return {**parse_kafka_config(kafka_config), **log.config()}, log


def require_kafka(bootstrap: str, config: dict[str, Any], log: ClientLog, advice: str = "") -> dict[str, int]:
    """Partition counts of the visible topics, or one `Error:` line (exit 1) once Kafka did not answer in time."""
    from knhk_stream.errors import TopicsError
    from knhk_stream.kafka.admin import Admin, partition_counts

    try:
        return partition_counts(Admin(bootstrap, config, log), kafka_timeout())
    except TopicsError as e:
        raise click.ClickException(f"{e}{advice}") from None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def open_store(settings: ChainSettings, redis_url: str, prefix: str) -> LockchainStore:
    from knhk_stream.store import LockchainStore

    return LockchainStore.from_url(redis_url, settings.chain_id, prefix, socket_connect_timeout=5)


def shards_of(store: LockchainStore, shard: tuple[int, ...]) -> list[int]:
    return list(shard) if shard else store.shards()


def delta_log(
    bootstrap: str, topic_prefix: str | None, declarations: Path | None, kafka_config: tuple[str, ...]
) -> DeltaLog:
    """The deltas topic to replay from, once Kafka answered and the topic exists (else one line, exit 1)."""
    from knhk_stream.audit.core import DeltaLog  # the Kafka extra: imported only when used

    topics = resolve_topics(declarations, topic_prefix)
    config, log = client_config(kafka_config)
    if not require_kafka(bootstrap, config, log).get(topics.deltas.name):
        raise ExitWith(
            f"topic {topics.deltas.name!r} does not exist at {bootstrap}: is this the chain's Kafka, and are "
            "--topic-prefix / --declarations those of the peers?",
            EXIT_ERROR,
        )
    return DeltaLog(bootstrap, topics.deltas.name, config)

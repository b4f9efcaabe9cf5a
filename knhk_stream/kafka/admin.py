"""Creating and checking the declared topics (`knhk-stream topics apply`, the demo, `dev`, tests).

Written for Kafka and for Tansu (the embedded broker), which differ in ways that
matter here: metadata is always requested *without* naming topics (Tansu
auto-creates a named topic with 4 partitions), partitions are never added
(Tansu has no CreatePartitions, and adding them would re-map shards anyway), and
configs are changed only with IncrementalAlterConfigs (Tansu lacks the legacy
AlterConfigs). Tansu's DescribeConfigs reports only the keys set at creation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from knhk_stream.errors import TopicsError
from knhk_stream.kafka.topics import Topics, TopicSpec

__all__ = [
    "LOG_APPEND_TIME",
    "TIMESTAMP_TYPE",
    "Admin",
    "ClientLog",
    "TopicResult",
    "TopicsError",
    "apply_topics",
    "check_peer_topics",
    "create_topics",
    "kafka_unreachable",
    "log_append_time_problem",
    "partition_counts",
    "require_log_append_time",
    "topic_configs",
]

CREATED, OK, MISSING, DISAGREES = "created", "ok", "missing", "disagrees"


@dataclass
class TopicResult:
    """What `apply_topics` found or did for one declared topic."""

    name: str
    role: str
    status: str  # created | ok | missing | disagrees
    partitions_declared: int
    partitions_found: int | None
    errors: list[str] = field(default_factory=list)  # the topic cannot be used as declared
    warnings: list[str] = field(default_factory=list)  # config differs or could not be checked
    fixed: list[str] = field(default_factory=list)  # config values set with --fix-config

    @property
    def ok(self) -> bool:
        return self.status in (CREATED, OK)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "status": self.status,
            "partitions_declared": self.partitions_declared,
            "partitions_found": self.partitions_found,
            "errors": self.errors,
            "warnings": self.warnings,
            "fixed": self.fixed,
        }


class ClientLog(logging.Handler):
    """librdkafka's log through the tool's own logging: deduplicated, at DEBUG unless asked, the last error kept.

    Without a logger, librdkafka prints every line to stderr itself (an unreachable
    broker gives one `%3|...|FAIL|` line every 50 ms per client). With this handler
    each distinct line goes to the logger `knhk_stream.kafka.client` once per
    `interval_s` seconds, with the count of repeats it stood for, at `level`
    (DEBUG: shown only with --log-level debug). The last warning or error (e.g.
    "Connection refused", "SASL authentication error") is kept, so that the
    tool's own one-line errors can quote it (`hint`).
    """

    LOGGER = "knhk_stream.kafka.client"

    def __init__(self, level: int = logging.DEBUG, interval_s: float = 30.0) -> None:
        super().__init__(logging.DEBUG)
        self.last: str | None = None
        self.out_level = level
        self.interval_s = interval_s
        self.out = logging.getLogger(self.LOGGER)
        self._seen: dict[tuple[int, str], list[float]] = {}  # (level, text) -> [last shown, repeats since]

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        text = message.split("]: ", 1)[-1]  # drop "FAIL [rdkafka#producer-1] [thrd:...]: "
        if record.levelno >= logging.WARNING:
            self.last = text
        now = time.monotonic()
        key = (record.levelno, text)
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            seen[1] += 1
            return
        repeats = f" (repeated {seen[1]:.0f} times in {now - seen[0]:.0f} s)" if seen and seen[1] else ""
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = [now, 0]
        self.out.log(self.out_level, "librdkafka %s: %s%s", record.levelname.lower(), message, repeats)

    def config(self) -> dict[str, Any]:
        """Client settings that route its log here (logs arrive on poll/consume/flush)."""
        logger = logging.Logger("knhk_stream.kafka")  # unregistered: one per client, not kept forever
        logger.addHandler(self)
        return {"logger": logger}

    def hint(self) -> str:
        return f" (last client log: {self.last})" if self.last else ""


class Admin:
    """An AdminClient with its bootstrap address and log, for error messages that say what failed.

    A bad --kafka-config key becomes a TopicsError the user can act on. `log`: the
    ClientLog to route the client's log to (default: one of its own).
    """

    def __init__(
        self, bootstrap: str, kafka_config: Mapping[str, Any] | None = None, log: ClientLog | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.log = log or ClientLog()
        try:
            self.client = AdminClient({"bootstrap.servers": bootstrap, **(kafka_config or {}), **self.log.config()})
        except KafkaException as e:
            raise TopicsError(f"invalid Kafka client configuration: {e.args[0].str()}; check --kafka-config") from None

    def hint(self) -> str:
        self.client.poll(0)  # deliver queued log lines
        return self.log.hint()

    def last_log(self) -> str | None:
        """The client's last warning or error line (e.g. "Connection refused"), if any."""
        self.client.poll(0)
        return self.log.last


def kafka_unreachable(bootstrap: str, seconds: float, why: str) -> str:
    """The one line every command gives when Kafka does not answer; `why`: the client's last complaint."""
    return (
        f"cannot reach Kafka at {bootstrap} after {seconds:g} s ({why}). Is the broker running? "
        "Check --bootstrap (env KNHK_BOOTSTRAP) and, for SASL/TLS, --kafka-config"
    )


def partition_counts(admin: Admin, timeout: float = 10.0) -> dict[str, int]:
    """Partition count of every visible topic, asked without naming topics (see module doc)."""
    try:
        metadata = admin.client.list_topics(timeout=timeout)
    except KafkaException as e:
        raise TopicsError(kafka_unreachable(admin.bootstrap, timeout, admin.last_log() or e.args[0].str())) from None
    return {
        name: len(meta.partitions)
        for name, meta in metadata.topics.items()
        if meta.error is None or meta.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART
    }


def check_peer_topics(admin: Admin, topics: Topics, timeout: float = 10.0) -> int:
    """The shard count, once the deltas, votes and roots topics exist with one partition per shard each.

    What a worker checks before it joins its consumer group; TopicsError (one line, with the fix) otherwise.
    """
    counts = partition_counts(admin, timeout)
    missing = [t.name for t in (topics.deltas, topics.votes, topics.roots) if not counts.get(t.name)]
    if missing:
        raise TopicsError(
            f"topic(s) {', '.join(map(repr, missing))} do not exist at {admin.bootstrap}: create them with "
            "`knhk-stream topics apply` (with the same --topic-prefix / --declarations), or check --topic-prefix"
        )
    shards = counts[topics.deltas.name]
    wrong = [f"{t.name!r} has {counts[t.name]}" for t in (topics.votes, topics.roots) if counts[t.name] != shards]
    if wrong:
        raise TopicsError(
            f"the votes and roots topics need one partition per shard, as many as the deltas topic "
            f"{topics.deltas.name!r} has ({shards}): {'; '.join(wrong)}"
        )
    return shards


def _partition_problem(spec: TopicSpec, found: int) -> str:
    if found > spec.partitions:
        fix = (
            f"Kafka cannot shrink partitions. Fix: declare {found} partitions (--partitions {found}, "
            "for all three topics), or delete the topic (its records are lost) and apply again"
        )
    else:
        fix = (
            "Kafka cannot shrink partitions and this tool does not add any (that would move shards "
            f"between partitions; Tansu cannot at all). Fix: declare {found} partitions (--partitions {found}, "
            "for all three topics), or delete the topic (its records are lost) and apply again"
        )
    return (
        f"topic {spec.name!r} disagrees with the declarations: it has {found} partitions, "
        f"{spec.partitions} are declared. {fix}, or use new topic names with --topic-prefix."
    )


def _create(admin: Admin, specs: list[TopicSpec], timeout: float) -> set[str]:
    """Create `specs`; returns the names that already existed (created meanwhile by someone else)."""
    new = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, config=dict(s.config)) for s in specs]
    existed: set[str] = set()
    for name, future in admin.client.create_topics(new, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                existed.add(name)
            else:
                raise TopicsError(f"creating topic {name!r} failed: {e.args[0].str()}{admin.hint()}") from None
    return existed


def _await_visible(admin: Admin, names: set[str], timeout: float) -> dict[str, int]:
    """Poll metadata until every topic in `names` has partitions; their counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = partition_counts(admin, max(1.0, deadline - time.monotonic()))
        pending = sorted(n for n in names if not counts.get(n))
        if not pending:
            return {n: counts[n] for n in names}
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not visible in metadata after {timeout}s: {', '.join(pending)}")
        time.sleep(0.05)


def _check_configs(
    admin: Admin, results: dict[str, TopicResult], specs: list[TopicSpec], fix: bool, timeout: float
) -> None:
    """Compare declared config values with the broker's; warn (or, with `fix`, set them)."""
    declared = [s for s in specs if s.config]
    if not declared:
        return
    resources = {s.name: ConfigResource(ResourceType.TOPIC, s.name) for s in declared}
    futures = admin.client.describe_configs(list(resources.values()), request_timeout=timeout)
    for spec in declared:
        result = results[spec.name]
        try:
            found = {k: v.value for k, v in futures[resources[spec.name]].result(timeout=timeout).items()}
        except Exception as e:  # unsupported, not authorized, ...: the partitions were checked; go on
            result.warnings.append(f"could not read the topic config ({e}); declared values not checked")
            continue
        wrong = {k: v for k, v in spec.config.items() if found.get(k) != v}
        if not wrong:
            continue
        for key, value in wrong.items():
            now = "not reported by the broker" if key not in found else f"is {found[key]!r} on the broker"
            hint = "" if fix else " (pass --fix-config to set it)"
            result.warnings.append(f"config {key} {now}, declared {value!r}{hint}")
        if fix:
            entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in wrong.items()]
            resource = ConfigResource(ResourceType.TOPIC, spec.name, incremental_configs=entries)
            try:
                future = admin.client.incremental_alter_configs([resource], request_timeout=timeout)[resource]
                future.result(timeout=timeout)
            except Exception as e:
                result.warnings.append(f"could not set {', '.join(wrong)}: {e}")
            else:
                result.fixed += [f"{k}={v}" for k, v in wrong.items()]


def apply_topics(
    bootstrap: str,
    topics: Topics | Iterable[TopicSpec],
    kafka_config: Mapping[str, str] | None = None,
    check_only: bool = False,
    fix_config: bool = False,
    *,
    strict: bool = True,
    timeout: float = 10.0,
) -> list[TopicResult]:
    """Create the missing topics and check the existing ones against their declarations.

    Idempotent. With `check_only` nothing is created or changed; with `fix_config`
    differing config values are set. With `strict` (for programs) a missing or
    disagreeing topic raises `TopicsError`; the CLI passes `strict=False` and
    reports the results itself.
    """
    specs = topics.all() if isinstance(topics, Topics) else list(topics)
    admin = Admin(bootstrap, kafka_config)
    counts = partition_counts(admin, timeout)
    created: set[str] = set()
    missing = [s for s in specs if not counts.get(s.name)]
    if missing and not check_only:
        existed = _create(admin, missing, timeout)
        created = {s.name for s in missing} - existed
        counts.update(_await_visible(admin, {s.name for s in missing}, timeout))
    results: dict[str, TopicResult] = {}
    for spec in specs:
        found = counts.get(spec.name)
        result = TopicResult(spec.name, spec.role, OK, spec.partitions, found)
        if not found:
            result.status = MISSING
            result.errors.append(f"topic {spec.name!r} does not exist; run `knhk-stream topics apply` to create it")
        elif found != spec.partitions:
            result.status = DISAGREES
            result.errors.append(_partition_problem(spec, found))
        elif spec.name in created:
            result.status = CREATED
        results[spec.name] = result
    existing = [s for s in specs if s.name not in created and results[s.name].partitions_found]
    _check_configs(admin, results, existing, fix_config and not check_only, timeout)
    out = list(results.values())
    if strict and not all(r.ok for r in out):
        raise TopicsError("; ".join(e for r in out for e in r.errors))
    return out


def create_topics(
    bootstrap: str,
    topics: Mapping[str, tuple[int, Mapping[str, object]]],
    *,
    timeout: float = 10.0,
    kafka_config: Mapping[str, str] | None = None,
) -> None:
    """Create topics ``{name: (partitions, config)}`` idempotently; wait for metadata.

    An existing topic is accepted if its partition count matches (its config is
    not changed); a mismatch raises `TopicsError` (a RuntimeError).
    """
    specs = [
        TopicSpec(name, "", parts, {k: str(v) for k, v in config.items()}) for name, (parts, config) in topics.items()
    ]
    apply_topics(bootstrap, specs, kafka_config, timeout=timeout)


# -- LogAppendTime (protocol "Beats") ---------------------------------------------------------

TIMESTAMP_TYPE = "message.timestamp.type"
LOG_APPEND_TIME = "LogAppendTime"


def log_append_time_problem(
    topic: str, found: Mapping[str, str | None] | BaseException | None, bootstrap: str = "BOOTSTRAP"
) -> str | None:
    """Why a worker must not run on the deltas topic `topic`, as one line with the fix; None if it may.

    `found` is what DescribeConfigs said of the topic: its configs (name -> value), the
    exception it raised, or None when the topic does not exist. Only LogAppendTime
    passes: the broker's clock, not a producer's, must drive the beats. A value the
    broker does not report (Tansu reports only keys set at creation) is no proof.
    """
    fix = (
        f"Fix: kafka-configs --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {topic} "
        f"--add-config {TIMESTAMP_TYPE}={LOG_APPEND_TIME} (or `knhk-stream topics apply --fix-config`), "
        "or, on a development broker whose producers are trusted, start the worker with --allow-producer-timestamps"
    )
    if found is None:
        return f"deltas topic {topic!r} does not exist; run `knhk-stream topics apply` to create it"
    if isinstance(found, BaseException):
        err = found.args[0] if isinstance(found, KafkaException) and found.args else found
        why = err.str() if isinstance(err, KafkaError) else str(err) or type(err).__name__
        return (
            f"cannot read {TIMESTAMP_TYPE} of deltas topic {topic!r} from {bootstrap} ({why}); a worker runs only "
            f"on a {LOG_APPEND_TIME} topic (protocol, Beats). Fix: check --bootstrap and --kafka-config (the client "
            "needs DescribeConfigs on the topic), or, on a development broker whose producers are trusted, start "
            "the worker with --allow-producer-timestamps"
        )
    value = found.get(TIMESTAMP_TYPE)
    if value == LOG_APPEND_TIME:
        return None
    now = f"does not report {TIMESTAMP_TYPE}" if value is None else f"has {TIMESTAMP_TYPE}={value}"
    return (
        f"deltas topic {topic!r} {now}, not {LOG_APPEND_TIME}: producers' clocks would drive the beats "
        f"(protocol, Beats). {fix}"
    )


def topic_configs(admin: Admin, topic: str, timeout: float = 10.0) -> dict[str, str | None] | BaseException | None:
    """The topic's configs as DescribeConfigs reports them, the exception it raised, or None: no such topic."""
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        entries = admin.client.describe_configs([resource], request_timeout=timeout)[resource].result(timeout=timeout)
    except KafkaException as e:
        if e.args and isinstance(e.args[0], KafkaError) and e.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return None
        return e
    except Exception as e:  # a timeout, a broker without DescribeConfigs, ...
        return e
    found = {name: entry.value for name, entry in entries.items()}
    if not found and topic not in partition_counts(admin, timeout):
        return None  # Tansu describes a missing topic as one without configs
    return found


def require_log_append_time(
    bootstrap: str,
    topic: str,
    kafka_config: Mapping[str, Any] | None = None,
    timeout: float = 10.0,
    admin: Admin | None = None,
) -> None:
    """Raise TopicsError (one line, with the fix) unless the deltas topic uses LogAppendTime."""
    admin = admin or Admin(bootstrap, kafka_config)
    found = topic_configs(admin, topic, timeout)
    problem = log_append_time_problem(topic, found, bootstrap)
    if problem:
        hint = admin.hint() if isinstance(found, BaseException) else ""
        raise TopicsError(problem + hint)

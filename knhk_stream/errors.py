"""Every error type of knhk-stream, under one base: `except KnhkError` catches them all."""

from __future__ import annotations

from typing import Any


class KnhkError(Exception):
    """Base of every error knhk-stream raises on purpose."""


class MissingExtra(KnhkError, ImportError):
    """An optional part was used without its extra installed; the message names the pip command."""

    def __init__(self, part: str, extra: str) -> None:
        self.extra = extra
        super().__init__(f"{part} needs the '{extra}' extra: pip install 'knhk-stream[{extra}]'")


class SettingsError(KnhkError, ValueError):
    """A chain settings problem, naming the field and saying what to change."""

    def __init__(self, field_name: str, message: str, source: str = "chain settings") -> None:
        self.field = field_name
        super().__init__(f"{source}: {field_name}: {message}")


class WireError(KnhkError, ValueError):
    """A record on a consensus topic that cannot be read or does not hold together."""


class HookError(KnhkError):
    """The hook raised or returned something that is not a list of actions."""


class AuditError(KnhkError):
    """Something is wrong in the chain or in Kafka that an auditor must look at (exit 1)."""


class ProofUnavailable(KnhkError):
    """No proof can be made for this offset (yet), and the message says why (exit 2)."""


class RecordsGone(ProofUnavailable):
    """Kafka no longer holds a record the replay needs (retention deleted it)."""

    def __init__(self, topic: str, shard: int, wanted: int, first_available: int | None) -> None:
        self.topic, self.shard, self.wanted, self.first_available = topic, shard, wanted, first_available
        where = (
            f"the first record it returns from there is at offset {first_available}"
            if first_available is not None
            else "it returns no record from there on"
        )
        super().__init__(
            f"Kafka no longer holds offset {wanted} of shard {shard} (topic {topic}): {where}. "
            "The records were deleted (retention), so the beat cannot be replayed from Kafka."
        )


class ChainImportError(KnhkError):
    """An import refused before anything was written; `line` is the 1-based line at fault."""

    def __init__(self, line: int | None, message: str) -> None:
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{message}")


class InvalidRoot(KnhkError, ValueError):
    """A roots-topic record that fails a check: never handed out; given to `on_invalid` or raised."""

    def __init__(self, kind: str, message: str, record: Any) -> None:
        self.kind = kind
        self.message = message
        self.record = record
        super().__init__(f"{kind}: {message} (partition {record.partition}, offset {record.offset})")


class TopicsError(KnhkError, RuntimeError):
    """The topics on the broker do not match the declarations (or cannot be read)."""


class TansuNotFoundError(KnhkError, RuntimeError):
    """No usable tansu executable could be located."""


class LockchainError(KnhkError):
    """An append that was refused; nothing was written."""


class ForkError(LockchainError):
    """The cycle already holds a different entry."""


class NotNextError(LockchainError):
    """The entry does not follow the head (its predecessor is missing or another)."""


class EpochError(KnhkError, ValueError):
    """An epoch statement that is malformed, or does not follow the epoch before it."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where  # e.g. "epochs[2]" when it came from a list of statements
        super().__init__(message)

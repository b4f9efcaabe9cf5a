"""knhk-stream: a quorum-signed, hash-chained audit log (the lockchain) for Kafka deltas.

Rooms: `protocol` (pure: every byte peers agree on), `store` (Redis),
`kafka` (topics, producer, roots reader, embedded broker), `runtime` (peers),
`audit` (replay, proofs, export), `integrations` (Faust), `cli`. The public
API below is imported lazily, so that a plain install (no Kafka extra) can
still verify proofs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from knhk_stream import _moved
from knhk_stream.errors import KnhkError, MissingExtra
from knhk_stream.protocol import PROTOCOL

__version__ = "0.2.0"

# public name -> (module, extra it needs or None)
_API: dict[str, tuple[str, str | None]] = {
    "ChainSettings": ("knhk_stream.protocol.settings", None),
    "Peer": ("knhk_stream.protocol.settings", None),
    "SettingsError": ("knhk_stream.errors", None),
    "Entry": ("knhk_stream.protocol.entry", None),
    "CommittedEntry": ("knhk_stream.protocol.committed", None),
    "Vote": ("knhk_stream.protocol.quorum", None),
    "check_quorum": ("knhk_stream.protocol.quorum", None),
    "load_private_key": ("knhk_stream.protocol.quorum", None),
    "generate_key": ("knhk_stream.protocol.quorum", None),
    "DeltaProcessor": ("knhk_stream.protocol.receipts", None),
    "PeerEngine": ("knhk_stream.protocol.engine", None),
    "Record": ("knhk_stream.runtime.node", None),
    "verify_bundle": ("knhk_stream.protocol.proof", None),
    "LockchainStore": ("knhk_stream.store", None),
    "verify_range": ("knhk_stream.store", None),
    "PeerNode": ("knhk_stream.runtime.node", None),
    "marker_out": ("knhk_stream.runtime.node", None),
    "root_out": ("knhk_stream.runtime.node", None),
    "vote_out": ("knhk_stream.runtime.node", None),
    "load_topics": ("knhk_stream.kafka.topics", None),
    "Topics": ("knhk_stream.kafka.topics", None),
    "RootsReader": ("knhk_stream.kafka.roots", "kafka"),
    "InvalidRoot": ("knhk_stream.errors", None),
    "DeltaProducer": ("knhk_stream.kafka.producer", "kafka"),
    "Worker": ("knhk_stream.runtime.worker", "kafka"),
    "records": ("knhk_stream.runtime.worker", "kafka"),
    "DeltaLog": ("knhk_stream.audit", "kafka"),
    "audit_shard": ("knhk_stream.audit", None),
    "build_bundle": ("knhk_stream.audit", None),
    "export_chain": ("knhk_stream.audit", None),
    "import_chain": ("knhk_stream.audit", None),
    "add_peer": ("knhk_stream.integrations.faust", "faust"),
}
_EXTRA_MODULES = {"kafka": "confluent_kafka", "faust": "faust", "otel": "opentelemetry"}

__all__ = ["PROTOCOL", "KnhkError", "MissingExtra", "__version__", *_API]


def __getattr__(name: str) -> Any:
    try:
        module, extra = _API[name]
    except KeyError:
        raise AttributeError(f"module 'knhk_stream' has no attribute {name!r}") from None
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if extra is not None and e.name == _EXTRA_MODULES[extra]:
            raise MissingExtra(f"knhk_stream.{name}", extra) from None
        raise
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports lazily
    from knhk_stream.audit import DeltaLog, audit_shard, build_bundle, export_chain, import_chain
    from knhk_stream.errors import InvalidRoot, SettingsError
    from knhk_stream.integrations.faust import add_peer
    from knhk_stream.kafka.producer import DeltaProducer
    from knhk_stream.kafka.roots import RootsReader
    from knhk_stream.kafka.topics import Topics, load_topics
    from knhk_stream.protocol.committed import CommittedEntry
    from knhk_stream.protocol.engine import PeerEngine
    from knhk_stream.protocol.entry import Entry
    from knhk_stream.protocol.proof import verify_bundle
    from knhk_stream.protocol.quorum import Vote, check_quorum, generate_key, load_private_key
    from knhk_stream.protocol.receipts import DeltaProcessor
    from knhk_stream.protocol.settings import ChainSettings, Peer
    from knhk_stream.runtime.node import PeerNode, Record, marker_out, root_out, vote_out
    from knhk_stream.runtime.worker import Worker, records
    from knhk_stream.store import LockchainStore, verify_range

_moved.install()

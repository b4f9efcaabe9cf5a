"""Auditors: read the deltas topic, replay beats, make proof bundles, export and import chains."""

from knhk_stream.audit.core import *  # noqa: F403
from knhk_stream.audit.core import DeltaLog, audit_shard, build_bundle, export_chain, import_chain

__all__ = ["DeltaLog", "audit_shard", "build_bundle", "export_chain", "import_chain"]

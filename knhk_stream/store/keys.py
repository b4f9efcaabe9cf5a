"""The Redis key layout (protocol "Redis"), defined here and nowhere else.

K = {prefix}:lockchain:{{chain_id}/{shard}}: the braces are a Redis Cluster hash
tag, so one shard's keys share a slot and the Lua append is atomic on a cluster
as on a single server. Under K: `root:{cycle:020}` (hash, one entry),
`cycles` (sorted set), `head` (hash), and what peers report: `peer:{peer_id}`
(checkpoint), `stall`, `evidence`, `published`, `published_ahead`, `health`. Epochs after 0 are under
{prefix}:epochs:{{chain_id}}.
"""

from __future__ import annotations

from typing import NamedTuple

from knhk_stream.protocol.encoding import cycle_key

__all__ = [
    "ShardKeys",
    "chain_key",
    "check_prefix",
    "cycle_of_entry_key",
    "epochs_key",
    "head_pattern",
    "root_key",
    "shard_keys",
    "shard_of_key",
]

ENTRY_PART = "root"  # K:root:{cycle:020}
CHECKPOINT_PART = "peer"  # K:peer:{peer_id}


class ShardKeys(NamedTuple):
    """Every key of one chain shard: K, and under it (each field's name is its key's last part) ..."""

    k: str
    cycles: str  # sorted set: member {cycle:020}, score cycle
    head: str  # hash: cycle, entry_hash of the newest entry
    stall: str  # hash: why the shard's committed chain stopped
    evidence: str  # hash: equivocation evidence, one field per peer and cycle
    published: str  # the cycle up to which every committed root is on the roots topic
    # hash: roots acknowledged on the roots topic beyond the published mark, whoever published them:
    # field = the cycle of the root before (20 digits, "-" for none), value = its cycle (20 digits)
    published_ahead: str
    health: str  # hash: each peer's report on the shard (halts, alarms, counts), field = peer id

    @classmethod
    def under(cls, k: str) -> ShardKeys:
        return cls(k, *(f"{k}:{part}" for part in cls._fields[1:]))

    def entry(self, cycle: int) -> str:
        """K:root:{cycle:020}, the hash of one committed entry."""
        return self.entry_prefix + cycle_key(cycle)

    @property
    def entry_prefix(self) -> str:
        return f"{self.k}:{ENTRY_PART}:"

    def checkpoint(self, peer_id: str) -> str:
        """A peer's progress on the shard (its resume point)."""
        return self.checkpoint_prefix + peer_id

    @property
    def checkpoint_prefix(self) -> str:
        return f"{self.k}:{CHECKPOINT_PART}:"


def check_prefix(prefix: str) -> str:
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"Redis prefix {prefix!r} must not contain braces (they mark the hash tag)")
    return prefix


def chain_key(prefix: str, chain_id: str, shard: int | str) -> str:
    """K, the key every key of one chain shard starts with (shard "*" makes a SCAN pattern)."""
    return f"{check_prefix(prefix)}:lockchain:{{{chain_id}/{shard}}}"


def shard_keys(prefix: str, chain_id: str, shard: int) -> ShardKeys:
    return ShardKeys.under(chain_key(prefix, chain_id, shard))


def root_key(prefix: str, chain_id: str, shard: int, cycle: int) -> str:
    return shard_keys(prefix, chain_id, shard).entry(cycle)


def epochs_key(prefix: str, chain_id: str) -> str:
    """{prefix}:epochs:{{chain_id}}: field the epoch number in decimal, value its JSON."""
    return f"{check_prefix(prefix)}:epochs:{{{chain_id}}}"


# -- reading keys found by SCAN -----------------------------------------------------------


def head_pattern(prefix: str, chain_id: str) -> str:
    """The heads of every shard of a chain (a glob, for SCAN)."""
    return ShardKeys.under(chain_key(prefix, chain_id, "*")).head


def shard_of_key(key: str) -> int:
    """The shard named in the hash tag of any key under K."""
    tag = key.split("{", 1)[1].split("}", 1)[0]
    return int(tag.rsplit("/", 1)[1])


def cycle_of_entry_key(key: str) -> int | None:
    """The cycle of a key that matched `entry_prefix + "*"`, None if its tail is not a cycle."""
    tail = key.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None

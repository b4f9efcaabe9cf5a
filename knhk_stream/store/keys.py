"""The Redis key layout (protocol "Redis"), defined here and nowhere else.

K = {prefix}:lockchain:{{chain_id}/{shard}}: the braces are a Redis Cluster hash
tag, so one shard's keys share a slot and the Lua append is atomic on a cluster
as on a single server. Under K: `root:{cycle:020}` (hash, one entry),
`cycles` (sorted set), `head` (hash), and what peers report: `peer:{peer_id}`
(checkpoint), `stall`, `evidence`, `published`. Epochs after 0 are under
{prefix}:epochs:{{chain_id}}.
"""

from __future__ import annotations

from knhk_stream.protocol.encoding import cycle_key

__all__ = [
    "chain_key",
    "check_prefix",
    "checkpoint_key",
    "checkpoint_prefix",
    "cycle_of_entry_key",
    "cycles_key",
    "entry_key",
    "entry_pattern",
    "entry_prefix",
    "epochs_key",
    "evidence_key",
    "head_key",
    "head_pattern",
    "published_key",
    "root_key",
    "shard_of_key",
    "stall_key",
]


def check_prefix(prefix: str) -> str:
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"Redis prefix {prefix!r} must not contain braces (they mark the hash tag)")
    return prefix


def chain_key(prefix: str, chain_id: str, shard: int | str) -> str:
    """K, the key every key of one chain shard starts with (shard "*" makes a SCAN pattern)."""
    return f"{check_prefix(prefix)}:lockchain:{{{chain_id}/{shard}}}"


def entry_prefix(k: str) -> str:
    return f"{k}:root:"


def entry_key(k: str, cycle: int) -> str:
    """`K:root:{cycle:020}`, the hash of one committed entry."""
    return entry_prefix(k) + cycle_key(cycle)


def root_key(prefix: str, chain_id: str, shard: int, cycle: int) -> str:
    return entry_key(chain_key(prefix, chain_id, shard), cycle)


def cycles_key(k: str) -> str:
    """`K:cycles`: member `{cycle:020}`, score cycle."""
    return f"{k}:cycles"


def head_key(k: str) -> str:
    """`K:head`: `cycle entry_hash` of the newest entry."""
    return f"{k}:head"


def checkpoint_prefix(k: str) -> str:
    return f"{k}:peer:"


def checkpoint_key(k: str, peer_id: str) -> str:
    """A peer's progress on the shard (its resume point)."""
    return checkpoint_prefix(k) + peer_id


def stall_key(k: str) -> str:
    return f"{k}:stall"


def evidence_key(k: str) -> str:
    return f"{k}:evidence"


def published_key(k: str) -> str:
    """The cycle up to which every committed root is on the roots topic."""
    return f"{k}:published"


def epochs_key(prefix: str, chain_id: str) -> str:
    """`{prefix}:epochs:{{chain_id}}`: field the epoch number in decimal, value its JSON."""
    return f"{check_prefix(prefix)}:epochs:{{{chain_id}}}"


# -- finding keys by SCAN -----------------------------------------------------------------


def entry_pattern(k: str) -> str:
    return entry_prefix(k) + "*"


def cycle_of_entry_key(key: str) -> int | None:
    """The cycle of a key matched by `entry_pattern`, None if its tail is not a cycle."""
    tail = key.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def head_pattern(prefix: str, chain_id: str) -> str:
    """The heads of every shard of a chain (a glob, for SCAN)."""
    return head_key(chain_key(prefix, chain_id, "*"))


def shard_of_key(key: str) -> int:
    """The shard named in the hash tag of any key under K."""
    tag = key.split("{", 1)[1].split("}", 1)[0]
    return int(tag.rsplit("/", 1)[1])

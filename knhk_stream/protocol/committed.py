"""A committed entry: the entry, its quorum votes, and who appended it when."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from knhk_stream.protocol.entry import ENTRY_FIELDS, ENTRY_INT_FIELDS, Entry
from knhk_stream.protocol.jsontext import loads_json
from knhk_stream.protocol.quorum import Vote

# The fields of a committed entry in protocol order: the Redis hash (protocol "Redis"), export lines.
STORED_FIELDS = (*ENTRY_FIELDS, "entry_hash", "epoch", "votes", "committed_by", "committed_at_ms")
STORED_INT_FIELDS = (*ENTRY_INT_FIELDS, "epoch", "committed_at_ms")


@dataclass(frozen=True)
class CommittedEntry:
    """An entry as committed: its fields, hash, quorum votes and who wrote it."""

    entry: Entry
    entry_hash: bytes
    votes: tuple[tuple[str, bytes], ...]
    committed_by: str  # informational: no signature covers it
    committed_at_ms: int  # informational
    epoch: int = 0  # number of the epoch of the entry's cycle (protocol v2)

    def to_redis(self) -> dict[str, str]:
        f = {k: str(v) for k, v in self.entry.to_fields().items()}
        f["entry_hash"] = self.entry_hash.hex()
        f["epoch"] = str(self.epoch)
        f["votes"] = votes_json(self.votes)
        f["committed_by"] = self.committed_by
        f["committed_at_ms"] = str(self.committed_at_ms)
        return f

    def to_json(self) -> dict[str, Any]:
        return {
            **self.entry.to_fields(),
            "entry_hash": self.entry_hash.hex(),
            "epoch": self.epoch,
            "votes": [{"peer_id": p, "signature": s.hex()} for p, s in self.votes],
            "committed_by": self.committed_by,
            "committed_at_ms": self.committed_at_ms,
        }

    @classmethod
    def from_mapping(cls, f: dict[str, Any]) -> CommittedEntry:
        """From a Redis hash or a JSON object; ValueError/KeyError on a bad field."""
        return cls(
            Entry.from_fields(f),
            bytes.fromhex(str(f["entry_hash"])),
            votes_from_json(f["votes"]),
            str(f["committed_by"]),
            int(f["committed_at_ms"]),
            int(f.get("epoch", 0)),
        )

    @classmethod
    def from_quorum(cls, entry: Entry, votes: Sequence[Vote], committed_by: str, at_ms: int) -> CommittedEntry:
        ordered = sorted(((v.peer_id, v.signature) for v in votes), key=lambda pv: pv[0])
        epoch = votes[0].epoch if votes else 0
        return cls(entry, entry.entry_hash, tuple(ordered), committed_by, at_ms, epoch)


def votes_from_json(votes: str | list[Any]) -> tuple[tuple[str, bytes], ...]:
    """`votes_json`'s text (or the list it holds) read back; ValueError when it is not that shape."""
    if isinstance(votes, str):
        votes = loads_json(votes)
    if not isinstance(votes, list):
        raise ValueError(f"votes must be a JSON array, not {type(votes).__name__}")
    try:
        return tuple((str(v["peer_id"]), bytes.fromhex(v["signature"])) for v in votes)
    except (KeyError, TypeError) as e:
        raise ValueError(f"each vote must be an object with peer_id and a hex signature ({e!r})") from None


def votes_json(votes: Sequence[tuple[str, bytes]]) -> str:
    """`[{"peer_id":…,"signature":hex}]` sorted by peer id, compact."""
    return json.dumps(
        [{"peer_id": p, "signature": s.hex()} for p, s in sorted(votes, key=lambda pv: pv[0])],
        separators=(",", ":"),
        ensure_ascii=False,
    )

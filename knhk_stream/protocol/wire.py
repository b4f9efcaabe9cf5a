"""Avro single-object records on the votes and roots topics.

Receivers recompute the entry hash from the fields and refuse a record whose
stated `entry_hash` differs, so a garbled record never reaches the quorum logic.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from functools import wraps
from importlib import resources
from typing import Any, TypeVar

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from knhk_stream.errors import WireError
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.decode import AVRO_MAGIC
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.epochs import U32_MAX
from knhk_stream.protocol.quorum import Vote

T = TypeVar("T")


class _Codec:
    def __init__(self, schema_file: str) -> None:
        text = resources.files("knhk_stream").joinpath("schemas", schema_file).read_text("utf-8")
        self.schema = parse_schema(json.loads(text))
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(self.schema), "CRC-64-AVRO"))
        self.prefix = AVRO_MAGIC + fp
        self.name = schema_file

    def encode(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self.prefix)
        fastavro.schemaless_writer(buf, self.schema, record)
        return buf.getvalue()

    def decode(self, value: bytes | None) -> dict[str, Any]:
        if not value or value[:10] != self.prefix:
            raise WireError(f"not a {self.name} record (wrong or missing Avro single-object header)")
        buf = io.BytesIO(value)
        buf.seek(10)
        try:
            rec = fastavro.schemaless_reader(buf, self.schema, None)
        except Exception as e:
            raise WireError(f"bad {self.name} record body: {type(e).__name__}") from None
        if buf.tell() != len(value):
            raise WireError(f"trailing bytes after a {self.name} record")
        return rec


VOTE = _Codec("vote.avsc")
ROOT = _Codec("committed_root.avsc")


def _entry(rec: dict[str, Any]) -> Entry:
    try:
        e = Entry(
            rec["chain_id"],
            rec["shard"],
            rec["cycle"],
            rec["root"],
            rec["receipt_count"],
            rec["first_offset"],
            rec["last_offset"],
            rec["prev_entry_hash"],
        )
    except (KeyError, TypeError) as e:
        raise WireError(f"entry fields missing: {e}") from None
    if min(e.shard, e.cycle, e.receipt_count, e.first_offset, e.last_offset) < 0:
        raise WireError("negative number in entry fields")
    if e.shard > U32_MAX:
        raise WireError(f"shard {e.shard} is out of range (u32)")
    if not 1 <= len(e.chain_id.encode("utf-8", "surrogatepass")) <= 64:
        raise WireError(f"chain_id of {len(e.chain_id)} characters is out of range (1..64 bytes)")
    if not 0 <= rec.get("epoch", 0) <= U32_MAX:
        raise WireError(f"epoch {rec.get('epoch')} is out of range (u32)")
    if e.entry_hash != rec["entry_hash"]:
        raise WireError(f"entry_hash {rec['entry_hash'].hex()} does not match the fields ({e.entry_hash.hex()})")
    return e


def _entry_fields(e: Entry) -> dict[str, Any]:
    return {
        "chain_id": e.chain_id,
        "shard": e.shard,
        "cycle": e.cycle,
        "root": e.root,
        "receipt_count": e.receipt_count,
        "first_offset": e.first_offset,
        "last_offset": e.last_offset,
        "prev_entry_hash": e.prev_entry_hash,
        "entry_hash": e.entry_hash,
    }


def _guarded(fn: Callable[[bytes | None], T]) -> Callable[[bytes | None], T]:
    """Decoding never raises anything but WireError."""

    @wraps(fn)
    def run(value: bytes | None) -> T:
        try:
            return fn(value)
        except WireError:
            raise
        except Exception as e:  # hostile bytes are a finding, never a crash (struct, unicode, ...)
            raise WireError(f"undecodable record: {type(e).__name__}: {str(e)[:200]}") from None

    return run


def encode_vote(vote: Vote) -> bytes:
    return VOTE.encode(
        {
            **_entry_fields(vote.entry),
            "epoch": vote.epoch,
            "peer_id": vote.peer_id,
            "signature": vote.signature,
            "voted_at_ms": vote.voted_at_ms,
        }
    )


@_guarded
def decode_vote(value: bytes | None) -> Vote:
    """A vote record; WireError for anything that does not decode or is out of range."""
    rec = VOTE.decode(value)
    if not 1 <= len(rec["peer_id"].encode("utf-8", "surrogatepass")) <= 64:
        raise WireError("peer_id is out of range (1..64 bytes)")
    return Vote(_entry(rec), rec["peer_id"], rec["signature"], rec["voted_at_ms"], rec["epoch"])


def encode_root(ce: CommittedEntry) -> bytes:
    return ROOT.encode(
        {
            **_entry_fields(ce.entry),
            "entry_hash": ce.entry_hash,
            "epoch": ce.epoch,
            "votes": [{"peer_id": p, "signature": s} for p, s in sorted(ce.votes)],
            "committed_by": ce.committed_by,
            "committed_at_ms": ce.committed_at_ms,
        }
    )


@_guarded
def decode_root(value: bytes | None) -> CommittedEntry:
    """A committed-root record; WireError for anything that does not decode or is out of range."""
    rec = ROOT.decode(value)
    e = _entry(rec)
    votes = tuple((v["peer_id"], v["signature"]) for v in rec["votes"])
    return CommittedEntry(e, rec["entry_hash"], votes, rec["committed_by"], rec["committed_at_ms"], rec["epoch"])

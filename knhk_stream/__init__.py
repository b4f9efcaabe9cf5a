"""knhk-stream: a quorum-signed, hash-chained audit log (the lockchain) for Kafka deltas.

The protocol core (decode, hooks, receipts, merkle, beats, chain, quorum,
settings) is pure Python over blake3, fastavro and cryptography; the Kafka,
Redis and telemetry rooms import it, never the other way round.
"""

__version__ = "0.1.0"
PROTOCOL = "knhk-stream/1"

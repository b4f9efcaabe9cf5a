"""The pure protocol core: every byte peers and auditors agree on (docs/PROTOCOL.md).

It imports blake3, fastavro and cryptography only: no Kafka, Redis, telemetry
or CLI code (a contract test holds it there), so an independent verifier can
use it alone.
"""

PROTOCOL = "knhk-stream/2"

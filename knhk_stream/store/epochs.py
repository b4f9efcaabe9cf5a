"""Epoch statements in Redis: `{prefix}:epochs:{{chain_id}}`, a hash from epoch number to JSON.

Redis is not trusted: every statement read back is verified from epoch 0 by
the caller (`ChainSettings.with_epochs(...).epoch_chain`). A stored epoch is
never overwritten (HSETNX).
"""

from __future__ import annotations

import json

from knhk_stream.errors import EpochError
from knhk_stream.protocol.epochs import Epoch
from knhk_stream.protocol.jsontext import loads_json
from knhk_stream.store.keys import epochs_key
from knhk_stream.store.lockchain import LockchainStore, as_text

__all__ = ["epochs_key", "load_epochs", "store_epoch"]


def store_epoch(store: LockchainStore, epoch: Epoch) -> bool:
    """Store a statement where its number is free; False when that number already holds one."""
    data = json.dumps(epoch.to_json(), separators=(",", ":"), ensure_ascii=False)
    return bool(store.client.hsetnx(epochs_key(store.prefix, store.chain_id), str(epoch.number), data))


def load_epochs(store: LockchainStore) -> tuple[list[Epoch], list[str]]:
    """Every parseable statement in Redis (unverified), and a finding for each one that is not."""
    raw = store.client.hgetall(epochs_key(store.prefix, store.chain_id))
    epochs: list[Epoch] = []
    findings: list[str] = []
    for field, value in sorted(raw.items()):
        name = as_text(field)
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            e = Epoch.from_json(loads_json(text), store.chain_id)
        except (UnicodeDecodeError, ValueError, EpochError) as err:
            findings.append(f"Redis epoch {name!r}: {err}")
            continue
        if str(e.number) != name:
            findings.append(f"Redis epoch {name!r} holds a statement numbered {e.number}")
            continue
        epochs.append(e)
    return epochs, findings

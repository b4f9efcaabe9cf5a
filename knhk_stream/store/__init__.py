"""The Redis store: the key layout (keys.py), the lockchain with its atomic append, checkpoints."""

from knhk_stream.errors import ForkError, LockchainError, NotNextError
from knhk_stream.store.lockchain import *  # noqa: F403
from knhk_stream.store.lockchain import LockchainStore, verify_range

__all__ = ["ForkError", "LockchainError", "LockchainStore", "NotNextError", "verify_range"]

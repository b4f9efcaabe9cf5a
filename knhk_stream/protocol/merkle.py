"""RFC 6962 Merkle trees with the hash function as a parameter (BLAKE3 by default).

Bottom-up pairing that promotes an odd last node unchanged builds exactly
RFC 6962's tree (split at the largest power of two below n), without recursion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from blake3 import blake3 as _blake3

from knhk_stream.protocol.encoding import H

HashFn = Callable[[bytes], bytes]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def leaf_hash(leaf: bytes, h: HashFn = H) -> bytes:
    return h(b"\x00" + leaf)


def node_hash(left: bytes, right: bytes, h: HashFn = H) -> bytes:
    return h(b"\x01" + left + right)


def _next_level(level: list[bytes], h: HashFn) -> list[bytes]:
    if h is H:  # BLAKE3 called directly, one hasher reset per node: a Python call less per node
        b3 = _blake3()
        reset, update = b3.reset, b3.update
        nxt = []
        for a, b in zip(level[::2], level[1::2], strict=False):
            reset()
            nxt.append(update(b"\x01" + a + b).digest())
    else:
        nxt = [h(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        nxt.append(level[-1])
    return nxt


def _leaves(leaves: Sequence[bytes], h: HashFn) -> list[bytes]:
    if h is H:
        b3 = _blake3()  # this call's own: a shared hasher would interleave with other threads'
        reset, update = b3.reset, b3.update
        out = []
        for d in leaves:
            reset()
            out.append(update(b"\x00" + d).digest())
        return out
    return [h(b"\x00" + d) for d in leaves]


def root(leaves: Sequence[bytes], h: HashFn = H) -> bytes:
    """MTH(D[n]); H("") for no leaves."""
    if not leaves:
        return h(b"")
    level = _leaves(leaves, h)
    while len(level) > 1:
        level = _next_level(level, h)
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int, h: HashFn = H) -> list[bytes]:
    """RFC 6962 audit path PATH(index, D[n]), bottom to top."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} outside a tree of {len(leaves)} leaves")
    level = _leaves(leaves, h)
    path: list[bytes] = []
    i = index
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        level = _next_level(level, h)
        i //= 2
    return path


def root_from_proof(leaf: bytes, index: int, tree_size: int, path: Sequence[bytes], h: HashFn = H) -> bytes:
    """The root an audit path leads to (RFC 9162 2.1.3.2); ValueError if the path cannot fit."""
    if not 0 <= index < tree_size:
        raise ValueError(f"leaf index {index} outside a tree of {tree_size} leaves")
    fn, sn = index, tree_size - 1
    r = h(b"\x00" + leaf)
    for p in path:
        if sn == 0:
            raise ValueError("audit path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = h(b"\x01" + p + r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = h(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("audit path is shorter than the tree is deep")
    return r


def verify_inclusion(
    leaf: bytes,
    index: int,
    tree_size: int,
    path: Sequence[bytes],
    expected_root: bytes,
    h: HashFn = H,
) -> bool:
    try:
        return root_from_proof(leaf, index, tree_size, path, h) == expected_root
    except ValueError:
        return False

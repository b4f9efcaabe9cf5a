"""RFC 6962 Merkle trees with the hash function as a parameter (BLAKE3 by default).

Bottom-up pairing that promotes an odd last node unchanged builds exactly
RFC 6962's tree (split at the largest power of two below n), without recursion.
`CompactRange` builds the same root as the leaves come, so that the root of a
long list costs little more at the end than that of a short one.
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


def _next_level(level: list[bytes], h: HashFn, b3: _blake3 | None = None) -> list[bytes]:
    """One level up. With BLAKE3 (`b3`: a hasher of the caller's, reset per node; a shared one would
    interleave with other threads') the hash is called directly: a Python call less per node."""
    if b3 is not None:
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


def _leaves(leaves: Sequence[bytes], h: HashFn, b3: _blake3 | None = None) -> list[bytes]:
    if b3 is not None:
        reset, update = b3.reset, b3.update
        out = []
        for d in leaves:
            reset()
            out.append(update(b"\x00" + d).digest())
        return out
    return [h(b"\x00" + d) for d in leaves]


def _hasher(h: HashFn) -> _blake3 | None:
    """A BLAKE3 hasher of this call's own when `h` is BLAKE3 (one for all its levels)."""
    return _blake3() if h is H else None


def root(leaves: Sequence[bytes], h: HashFn = H) -> bytes:
    """MTH(D[n]); H("") for no leaves."""
    if not leaves:
        return h(b"")
    b3 = _hasher(h)
    level = _leaves(leaves, h, b3)
    while len(level) > 1:
        level = _next_level(level, h, b3)
    return level[0]


class CompactRange:
    """The root of a growing list of leaves, from the perfect subtrees it holds so far.

    RFC 6962's tree of n leaves is the right fold of node_hash over the perfect
    subtrees of n's binary decomposition, largest (leftmost) first (a compact
    range, as transparency-dev calls it). Give it the roots of equal-sized perfect
    subtrees in leaf order (`add`); `root(tail)` folds them with the root of the
    leaves after them, which must be fewer than one subtree holds. The result is
    root() of all the leaves, byte for byte.
    """

    __slots__ = ("_h", "_nodes", "leaves")

    def __init__(self, h: HashFn = H) -> None:
        self._h = h
        self._nodes: list[tuple[int, bytes]] = []  # (leaves, root) of perfect subtrees, sizes decreasing
        self.leaves = 0  # leaves covered by the subtrees added

    def add(self, size: int, subtree_root: bytes) -> None:
        """The root of the next `size` leaves (a power of two, the same size every call)."""
        nodes, node = self._nodes, subtree_root
        self.leaves += size
        while nodes and nodes[-1][0] == size:
            node = node_hash(nodes.pop()[1], node, self._h)
            size *= 2
        nodes.append((size, node))

    def root(self, tail_root: bytes | None = None) -> bytes:
        """MTH of the leaves added, then of the leaves whose root is `tail_root` (None: no more leaves)."""
        nodes = self._nodes
        if not nodes:
            return self._h(b"") if tail_root is None else tail_root
        node = nodes[-1][1] if tail_root is None else node_hash(nodes[-1][1], tail_root, self._h)
        for _, left in reversed(nodes[:-1]):
            node = node_hash(left, node, self._h)
        return node


def inclusion_proof(leaves: Sequence[bytes], index: int, h: HashFn = H) -> list[bytes]:
    """RFC 6962 audit path PATH(index, D[n]), bottom to top."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} outside a tree of {len(leaves)} leaves")
    b3 = _hasher(h)
    level = _leaves(leaves, h, b3)
    path: list[bytes] = []
    i = index
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        level = _next_level(level, h, b3)
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

"""The token radix trie: longest-common-prefix lookup over saved rows of one namespace.

Every row is a (token sequence, key) pair. ``longest_prefix`` returns the row whose tokens
share the longest common prefix with a prompt, preferring the shortest such row (the least
to restore); the row may run past the common part, and the caller truncates the restored
KV to the common length.

Performance: the cache-meta process answers a lookup for a 32k-token prompt against ~10k
rows in tens of microseconds, in pure Python. Work per lookup is proportional to the
number of *nodes* on the path, never to the number of tokens:

* tokens stay packed (u32le bytes); edge labels are byte strings;
* children are keyed by the 4-byte first token of their edge;
* an edge is matched with ``prompt.startswith(label, offset)`` (memcmp);
* on a mismatch inside an edge, the first differing token is found by bisection with
  ``startswith`` over the unresolved half, so the bytes compared add up to about twice the
  edge length, at C speed;
* every node keeps the shortest row of its subtree, so the answer is read off the node
  where the walk stops.

Turned down: a per-token dict trie (one Python step per token: ~10 ms for 32k tokens), and
hash-chained block keys (they only match at block boundaries, not at any token).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from erllama.cache.keys import KvcError
from erllama.protocol.errors import InvalidRequestError
from erllama.protocol.tokens import pack_tokens

log = logging.getLogger(__name__)

Best = tuple[int, bytes]  # (row length in tokens, key); min() picks the shortest, then key order


class _Node:
    __slots__ = ("best", "children", "depth", "keys", "label")

    def __init__(self, label: bytes, depth: int) -> None:
        self.label = label  # packed tokens on the edge from the parent
        self.depth = depth  # tokens from the root to the end of this node
        self.children: dict[bytes, _Node] = {}
        self.keys: set[bytes] = set()  # rows ending exactly here
        self.best: Best | None = None

    def recompute(self) -> None:
        candidates = [c.best for c in self.children.values() if c.best is not None]
        if self.keys:
            candidates.append((self.depth, min(self.keys)))
        self.best = min(candidates) if candidates else None


def _common_tokens(data: bytes, pos: int, label: bytes) -> int:
    """Whole tokens shared by ``data[pos:]`` and ``label`` (the caller knows they differ
    somewhere within ``min(len(label), len(data) - pos)`` bytes or that data is shorter)."""
    lo = 0  # tokens known equal
    hi = min(len(label), len(data) - pos) // 4  # upper bound on equal tokens
    if data.startswith(label[: hi * 4], pos):
        return hi
    # Invariant: the first lo tokens are equal, and a difference lies in [lo, hi).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if data.startswith(label[lo * 4 : mid * 4], pos + lo * 4):
            lo = mid
        else:
            hi = mid
    return lo


def _packed(tokens: Sequence[int]) -> bytes:
    if isinstance(tokens, bytes | bytearray | memoryview):
        raise KvcError("bad_argument", "packed tokens given where a token list is expected")
    try:
        return pack_tokens(tokens)
    except InvalidRequestError as exc:
        raise KvcError("bad_argument", str(exc)) from None


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """Packed tokens as ``bytes`` (hashable slices, ``startswith``), checked for length."""
    if len(data) % 4:
        raise KvcError("bad_argument", f"packed tokens length {len(data)} is not a multiple of 4")
    return data if type(data) is bytes else bytes(data)


class TokenTrie:
    """A radix trie over token sequences, one per cache namespace.

    The same (tokens, key) pair is stored once; the same tokens may carry several keys
    (possible only across namespaces, handled anyway). Not thread-safe: cache-meta owns it
    from one event loop.
    """

    __slots__ = ("_root", "_rows")

    def __init__(self) -> None:
        self._root = _Node(b"", 0)
        self._rows = 0

    def __len__(self) -> int:
        """The number of (tokens, key) rows."""
        return self._rows

    def insert(self, tokens: Sequence[int], key: bytes) -> None:
        """Add a row. Raises KvcError ``bad_argument`` for an empty or invalid token list."""
        self.insert_packed(_packed(tokens), key)

    def remove(self, tokens: Sequence[int], key: bytes) -> bool:
        """Drop a row; False when it was not there."""
        return self.remove_packed(_packed(tokens), key)

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[int, bytes] | None:
        """``(common_len, key)`` of the best row for a prompt, or None (see the module)."""
        return self.longest_prefix_packed(_packed(tokens))

    def insert_packed(self, data: bytes | bytearray | memoryview, key: bytes) -> None:
        """``insert`` over packed u32le tokens."""
        data = _as_bytes(data)
        if not data:
            raise KvcError("bad_argument", "a row needs at least one token")
        key = bytes(key)
        node = self._root
        path = [node]
        pos = 0
        while pos < len(data):
            first = data[pos : pos + 4]
            child = node.children.get(first)
            if child is None:
                leaf = _Node(data[pos:], node.depth + (len(data) - pos) // 4)
                node.children[first] = leaf
                node = leaf
                path.append(node)
                break
            label = child.label
            if data.startswith(label, pos):
                pos += len(label)
                node = child
                path.append(node)
                continue
            # Split the edge where the row leaves it (or ends inside it).
            m = _common_tokens(data, pos, label) * 4
            mid = _Node(label[:m], node.depth + m // 4)
            child.label = label[m:]
            mid.children[child.label[:4]] = child
            mid.best = child.best
            node.children[first] = mid
            node = mid
            path.append(node)
            pos += m
        if key in node.keys:
            return
        node.keys.add(key)
        self._rows += 1
        new: Best = (node.depth, key)
        for n in path:
            if n.best is None or new < n.best:
                n.best = new

    def remove_packed(self, data: bytes | bytearray | memoryview, key: bytes) -> bool:
        """``remove`` over packed u32le tokens."""
        data = _as_bytes(data)
        key = bytes(key)
        node = self._root
        path = [node]
        pos = 0
        while pos < len(data):
            child = node.children.get(data[pos : pos + 4])
            if child is None or not data.startswith(child.label, pos):
                return False
            pos += len(child.label)
            node = child
            path.append(node)
        if key not in node.keys:
            return False
        node.keys.discard(key)
        self._rows -= 1
        removed: Best = (node.depth, key)
        # Prune empty leaves and merge pass-through nodes bottom-up. Above the first node
        # left as it is, nothing changes shape.
        for i in range(len(path) - 1, 0, -1):
            n, parent = path[i], path[i - 1]
            if n.keys or len(n.children) > 1:
                break
            if not n.children:
                del parent.children[n.label[:4]]
            else:
                (only,) = n.children.values()
                only.label = n.label + only.label
                parent.children[n.label[:4]] = only
        # The nodes whose best was the removed row form a chain up from its node (nodes
        # just detached may be recomputed too; that is harmless).
        for n in reversed(path):
            if n.best != removed:
                break
            n.recompute()
        return True

    def longest_prefix_packed(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[int, bytes] | None:
        """``longest_prefix`` over packed u32le tokens (the meta's wire form)."""
        data = _as_bytes(data)
        node = self._root
        pos = 0
        end = len(data)
        while pos < end:
            child = node.children.get(data[pos : pos + 4])
            if child is None:
                break
            label = child.label
            if data.startswith(label, pos):
                pos += len(label)
                node = child
                continue
            pos += _common_tokens(data, pos, label) * 4
            node = child
            break
        if pos == 0 or node.best is None:
            return None
        return pos // 4, node.best[1]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every row as (packed tokens, key), in no particular order."""
        stack: list[tuple[_Node, bytes]] = [(self._root, b"")]
        while stack:
            node, prefix = stack.pop()
            here = prefix + node.label
            for key in node.keys:
                yield here, key
            stack.extend((child, here) for child in node.children.values())

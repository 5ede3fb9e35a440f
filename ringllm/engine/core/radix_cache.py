"""Token-granular prefix cache (the SGLang design): a radix tree whose edges are runs of token ids and whose
values are the KV slots of those tokens.

A request locks the path it matched so those slots cannot be evicted under it; unlocked leaves are evicted
in least-recently-used order when the pool runs short. Sequences are inserted when they finish or are
preempted; the part already in the tree is reported so the caller frees its own duplicate slots."""

from __future__ import annotations

import heapq
import itertools

import numpy as np

_clock = itertools.count()


class Node:
    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(self, parent: Node | None = None, key: tuple = (), value: np.ndarray | None = None):
        self.children: dict[int, Node] = {}
        self.parent = parent
        self.key = key
        self.value: np.ndarray = value if value is not None else np.empty(0, dtype=np.int32)  # the root: none
        self.lock_ref = 0
        self.last_access = next(_clock)


def _parent(node: Node) -> Node:
    """The parent of a node below the root (only the root has none)."""
    assert node.parent is not None, "the root has no parent"
    return node.parent


def _common_prefix(a: tuple, b: list, start: int) -> int:
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, free_slots):
        """`free_slots(tensor)` gives evicted slots back to the pool."""
        self.root = Node()
        self.root.lock_ref = 1  # the root is never evicted
        self._free_slots = free_slots
        self.cached_tokens = 0  # slots held by the tree
        self.evictable_tokens = 0  # of those, in unlocked nodes
        self.hit_tokens = 0
        self.query_tokens = 0

    # ---- lookup ----
    def match_prefix(self, tokens: list[int]) -> tuple[np.ndarray, Node]:
        """The slots of the longest cached prefix of `tokens`, and the node where it ends (split if the match
        ends inside an edge)."""
        node, pos, values = self.root, 0, []
        node.last_access = next(_clock)
        while pos < len(tokens) and tokens[pos] in node.children:
            child = node.children[tokens[pos]]
            n = _common_prefix(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            pos += n
            node = child
            node.last_access = next(_clock)
        slots = np.concatenate(values) if values else np.empty(0, dtype=np.int32)
        return slots, node

    def _split(self, child: Node, n: int) -> Node:
        """Cuts `child`'s edge after n tokens; returns the new upper node."""
        mid = Node(child.parent, child.key[:n], child.value[:n])
        mid.lock_ref = child.lock_ref
        mid.last_access = child.last_access
        _parent(child).children[child.key[0]] = mid
        child.key, child.value, child.parent = child.key[n:], child.value[n:], mid
        mid.children[child.key[0]] = child
        return mid

    # ---- insertion ----
    def insert(self, tokens: list[int], slots: np.ndarray) -> int:
        """Adds tokens[i] -> slots[i]. Returns how many leading tokens were already cached: the caller's own
        slots for those are duplicates, and theirs to free."""
        node, pos = self.root, 0
        while pos < len(tokens):
            node.last_access = next(_clock)
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = Node(node, tuple(tokens[pos:]), slots[pos:].copy())
                node.children[tokens[pos]] = leaf
                self.cached_tokens += len(leaf.key)
                self.evictable_tokens += len(leaf.key)
                return pos
            n = _common_prefix(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            pos += n
            node = child
        node.last_access = next(_clock)
        return pos

    # ---- locking ----
    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_tokens -= len(node.key)
            node.lock_ref += 1
            node = _parent(node)

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of an unlocked node")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_tokens += len(node.key)
            node = _parent(node)

    # ---- eviction ----
    def evict(self, num_tokens: int) -> int:
        """Frees at least `num_tokens` slots from unlocked leaves, oldest first, if there are that many.
        Returns how many were freed."""
        leaves = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            self._free_slots(leaf.value)
            freed += len(leaf.key)
            self.cached_tokens -= len(leaf.key)
            self.evictable_tokens -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        return freed

    def _leaves(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if not node.children and node is not self.root:
                yield node
            stack.extend(node.children.values())

    def reset(self) -> None:
        for leaf in list(self._leaves()):
            if leaf.lock_ref:
                raise RuntimeError("radix cache: reset while requests hold cached prefixes")
        self.evict(self.cached_tokens)

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        """Counts one admitted request's lookup towards the hit statistics."""
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

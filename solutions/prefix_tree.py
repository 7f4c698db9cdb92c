"""Part 7a (used by ``load_balancer``): the approximate prefix tree of SGLang's cache-aware router.

sgl-router cannot ask a backend what its KV cache holds, so it *guesses*: every prompt it
routes to a backend is inserted into that backend's tree, and a new prompt's longest
match against a tree estimates how much of it that backend has cached. The guess is
approximate (the backend may have evicted those blocks), cheap (no round trip), and
works on raw text, so the router never tokenizes. Token ids work just as well.

A radix tree keeps runs of elements on its edges, so a long prompt costs one node, not
one per character. Memory is bounded by ``size`` (elements stored): after each insert
the balancer evicts least recently used leaves until ``size <= max_tree_size``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

Prompt = str | Sequence[int]


class _Node:
    __slots__ = ("children", "edge", "parent", "stamp")

    def __init__(self, edge: Prompt, parent: _Node | None, stamp: int) -> None:
        self.edge, self.parent, self.stamp = edge, parent, stamp
        self.children: dict[object, _Node] = {}


def _common(a: Prompt, b: Prompt, start: int) -> int:
    """Length of the common prefix of ``a`` and ``b[start:]``."""
    if b[start:start + len(a)] == a:  # the common case, a whole edge matching, at C speed
        return len(a)
    n = 0
    for x in a:
        if start + n >= len(b) or b[start + n] != x:
            break
        n += 1
    return n


class PrefixTree:
    """An approximate radix tree of the prompts routed to one backend (characters or token ids).

    Each edge holds a run of elements; ``size`` counts the elements stored (the memory
    bound). ``stamp`` on a node is the logical time it was last inserted through, so a
    parent is never older than its children and evicting old leaves first is LRU.
    """

    def __init__(self) -> None:
        self.root = _Node("", None, 0)
        self.size = 0

    def match(self, key: Prompt) -> int:
        """Number of leading elements of ``key`` already stored (0 for an empty tree)."""
        ### BEGIN SOLUTION
        node, i = self.root, 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                break
            n = _common(child.edge, key, i)
            i += n
            if n < len(child.edge):
                break
            node = child
        return i
        ### END SOLUTION

    def insert(self, key: Prompt, stamp: int) -> None:
        """Store ``key``; every node on its path gets ``stamp``. Splits an edge where ``key``
        leaves it, so ``size`` grows by exactly the elements not stored before."""
        ### BEGIN SOLUTION
        node, i = self.root, 0
        node.stamp = stamp
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                node.children[key[i]] = _Node(key[i:], node, stamp)
                self.size += len(key) - i
                return
            n = _common(child.edge, key, i)
            if n < len(child.edge):  # split: the shared part becomes a new inner node
                mid = _Node(child.edge[:n], node, stamp)
                node.children[key[i]] = mid
                child.edge, child.parent = child.edge[n:], mid
                mid.children[child.edge[0]] = child
                child = mid
            child.stamp = stamp
            node, i = child, i + n
        ### END SOLUTION

    def evict(self, max_size: int) -> None:
        """Remove least recently inserted leaves (whole edges) until ``size <= max_size``."""
        ### BEGIN SOLUTION
        if self.size <= max_size:
            return
        tie = itertools.count()
        heap, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and node is not self.root:
                heap.append((node.stamp, next(tie), node))
        heapq.heapify(heap)
        while self.size > max_size and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.size -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.stamp, next(tie), parent))
        ### END SOLUTION

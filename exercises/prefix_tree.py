# Exercise stub generated from solutions/prefix_tree.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
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
        raise NotImplementedError("match: your code here")

    def insert(self, key: Prompt, stamp: int) -> None:
        """Store ``key``; every node on its path gets ``stamp``. Splits an edge where ``key``
        leaves it, so ``size`` grows by exactly the elements not stored before."""
        raise NotImplementedError("insert: your code here")

    def evict(self, max_size: int) -> None:
        """Remove least recently inserted leaves (whole edges) until ``size <= max_size``."""
        raise NotImplementedError("evict: your code here")

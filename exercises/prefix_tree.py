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
        """Store ``key`` (text or token ids) and mark its whole path as used at time ``stamp``.

        Contract: afterwards ``match(key) == len(key)``; ``size`` grows by exactly the number
        of elements of ``key`` that were not stored before (``len(key) - match(key)`` taken
        before the call); every node on the path from the root to the end of ``key``,
        the root included, gets ``stamp``. Inserting a key already stored adds nothing.

        Walk down from the root, one edge per step, keyed by the next element of ``key``:

        * no child starts with that element: hang the rest of ``key`` on a new leaf;
        * a child's edge matches completely: stamp it and continue below it;
        * ``key`` leaves (or ends inside) a child's edge after ``n`` elements: split that
          edge, a new inner node takes the shared ``n`` elements, the old child keeps the
          rest below it, and the walk continues from the new node.

        Example: insert ``"hello world"`` into an empty tree (``size`` 11: one leaf under the
        root), then ``"hello there"``: the edge splits into ``"hello "`` with two children
        ``"world"`` and ``"there"``, and ``size`` becomes 16 (only ``"there"`` is new).

        Invariants after every call: children of a node start with different elements
        (``children`` is keyed by an edge's first element); no edge is empty except the
        root's; ``size`` is the sum of all edge lengths; a parent's ``stamp`` is never
        smaller than a child's (the path is stamped together), so the oldest leaves are the
        least recently used prefixes.
        """
        raise NotImplementedError("insert: your code here")

    def evict(self, max_size: int) -> None:
        """Remove least recently used leaves, a whole edge at a time, until ``size <= max_size``.

        Contract: nothing happens while ``size <= max_size``. Otherwise leaves go in order
        of their ``stamp``, oldest first (ties in any fixed order); removing a leaf takes
        its whole edge out of ``size``, and a parent left without children (not the root)
        becomes a leaf that may go next, in its own stamp order. Inner nodes with children
        are never removed, so every stored prompt keeps its shared prefix as long as any
        prompt below it survives. Eviction may remove more than needed (a whole edge) but
        never leaves ``size > max_size`` unless the tree is empty.

        Hint: collect the leaves into a heap (``heapq``) of ``(stamp, counter, node)``; the
        counter breaks ties so nodes are never compared. Each node knows its ``parent``,
        and its edge's first element is its key in ``parent.children``.

        Example: after ``insert("abcdef", 1)``, ``insert("abcxyz", 2)``, ``insert("q", 3)``
        (``size`` 10: ``"abc"`` with leaves ``"def"`` (1) and ``"xyz"`` (2), and ``"q"`` (3)),
        ``evict(7)`` removes ``"def"`` (the oldest leaf): ``size`` 7, ``match("abcdef") == 3``.
        If ``"abcxyz"`` is inserted again (stamp 4), ``evict(6)`` removes ``"q"`` next.

        Invariants: the same as :meth:`insert`'s; in addition the most recently inserted
        key survives any ``evict(max_size)`` with ``max_size >= len(key)``.
        """
        raise NotImplementedError("evict: your code here")

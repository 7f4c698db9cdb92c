# Exercise stub generated from solutions/block_pool.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 2, the physical side of the paged KV cache: a pool of fixed-size blocks.

The pool knows nothing about sequences. It keeps, for every block id in
``range(num_blocks)``:

- a reference count: how many block tables hold the block (PagedAttention shares one
  physical block between sequences and copies it only on write; Kwon et al., SOSP 2023,
  section 4.4);
- a free queue of the blocks whose count is 0, in least-recently-freed order, so the
  block that has sat unused longest is reused (and its cached content evicted) first;
- for prefix caching, the hash of the tokens a full block holds, and a map from that
  hash back to the block, so a later prompt with the same prefix can reuse its K/V.

A freed block keeps its hash while it waits in the free queue: it is still a cache
entry, and a later hit takes it back out of the queue ("revives" it). Only when the
queue hands it out as a fresh block is its hash dropped (eviction by reuse). This is
the design of vLLM v1's ``block_pool.py``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq


class NoFreeBlocksError(RuntimeError):
    """Raised when a request needs more free KV blocks than the pool has right now."""


def hash_block_tokens(parent_hash: bytes | None, token_ids: Seq[int]) -> bytes:
    """Return the prefix-cache key of one full block.

    The key covers the block's own tokens *and* its parent block's key, so it names the
    whole prefix up to the end of this block: the same 16 tokens after a different
    prefix get a different key (their K/V differ, since attention saw other tokens).

    Args:
        parent_hash: the key of the previous block of the sequence, ``None`` for block 0.
        token_ids: the token ids stored in this block.

    Returns:
        A 32-byte SHA-256 digest.
    """
    # A collision would silently serve another prompt's K/V, so use a cryptographic hash
    # rather than Python's hash() (trivially invertible on ints); vLLM's prefix cache
    # offers SHA-256 for the same reason. repr() of the pair is an unambiguous encoding
    # of both parts (int() first, so numpy or torch integers hash like Python ints).
    raise NotImplementedError("hash_block_tokens: your code here")


class BlockPool:
    """Reference counts, the LRU free queue and the prefix-cache map of ``num_blocks`` blocks.

    Attributes:
        num_blocks: how many blocks the pool owns.
        ref_counts: ``ref_counts[b]`` is the number of block tables holding block ``b``.
        block_hashes: ``block_hashes[b]`` is the cache key of block ``b``, or ``None``.
        cached_block: cache key -> the block holding that content.
        free_queue: the blocks with ref count 0, least recently freed first.
    """

    def __init__(self, num_blocks: int) -> None:
        """Start with every block free, in id order, and an empty prefix cache."""
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached_block: dict[bytes, int] = {}
        # An OrderedDict is a hash map over a doubly linked list: popping the oldest,
        # appending at the tail and deleting from the middle are all O(1).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached ones included (they can be evicted)."""
        return len(self.free_queue)

    def get_new_block(self) -> int:
        """Take the least recently freed block, evict its cache entry, and give it ref count 1.

        Raises:
            NoFreeBlocksError: if every block is held by some sequence.
        """
        raise NotImplementedError("get_new_block: your code here")

    def touch(self, block: int) -> None:
        """Add one reference to ``block``; a free (cached) block leaves the free queue."""
        raise NotImplementedError("touch: your code here")

    def free_block(self, block: int) -> None:
        """Drop one reference; at 0 the block joins the tail of the free queue, hash kept."""
        raise NotImplementedError("free_block: your code here")

    def cache_block(self, block: int, block_hash: bytes) -> None:
        """Publish ``block`` under ``block_hash``, unless another block already holds that content."""
        raise NotImplementedError("cache_block: your code here")

    def match_prefix(self, token_ids: Seq[int], block_size: int, max_blocks: int) -> tuple[list[int], list[bytes]]:
        """Return the longest run of cached blocks holding the first full blocks of ``token_ids``.

        Looks at no more than ``max_blocks`` blocks and stops at the first miss: a later
        block cannot hit, since its key includes the missing block's.

        Returns:
            ``(blocks, keys)``: the hit block ids and their keys, in token order.
        """
        raise NotImplementedError("match_prefix: your code here")

    def uncache_block(self, block: int) -> None:
        """Remove ``block`` from the prefix cache (its content is about to change)."""
        raise NotImplementedError("uncache_block: your code here")

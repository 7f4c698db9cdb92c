# Exercise stub generated from solutions/block_prefix_cache.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 2, automatic prefix caching: the block manager's side of the prefix cache.

vLLM v1 caches the K/V of *full* blocks across requests: once every token of a block
is computed, the block is published under a key that hashes its tokens chained with
its parent block's key (:func:`~.block_pool.hash_block_tokens`), so the key names the
whole prefix up to the end of the block. A later prompt that starts with the same full
blocks finds them by walking its own chain of keys and shares them instead of
computing them again. The pool (:mod:`.block_pool`) keeps the key -> block map and the
eviction order; this module is the sequence side, a mixin of
:class:`~.block_manager.PagedAttentionConfig`:

- :meth:`PrefixCaching._match_prefix` looks a prompt's leading full blocks up (called
  by ``can_allocate`` and ``allocate_blocks``);
- :meth:`PrefixCaching.cache_blocks` publishes a sequence's computed full blocks (the
  engine calls it after every step).

The last prompt token is always recomputed (its forward pass yields the first output
token's logits), so a hit covers at most ``(len(token_ids) - 1) // block_size`` blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

from .block_pool import BlockPool, hash_block_tokens


class PrefixCaching:
    """Look up and publish a sequence's full blocks in the prefix cache (mixed into the block manager).

    Each sequence's chained keys, one per leading full, computed block, live in
    ``_seq_hashes[seq_id]``; :meth:`cache_blocks` extends that list and the block
    manager cuts it back where a block's content may change (``append_slots``,
    ``trim_blocks``).
    """

    # Set by the block manager that mixes this in.
    pool: BlockPool
    block_size: int
    enable_prefix_caching: bool
    _seq_hashes: dict[int, list[bytes]]
    _table: Callable[[int], list[int]]  # seq_id -> its block table (KeyError if it has none)

    def _match_prefix(self, token_ids: Seq[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks that start ``token_ids`` and their keys (empty without prefix caching)."""
        # Only blocks wholly before the last token may hit: it is always recomputed.
        raise NotImplementedError("_match_prefix: your code here")

    def cache_blocks(self, seq_id: int, token_ids: Seq[int], num_computed_tokens: int) -> None:
        """Publish the sequence's full blocks whose tokens are all computed to the prefix cache.

        Idempotent; a no-op without prefix caching. ``token_ids`` are the sequence's
        tokens (prompt then output); only the first ``num_computed_tokens`` matter.
        If another block already caches the same content, this one stays private.
        """
        # Resume the hash chain after the blocks this sequence already published.
        raise NotImplementedError("cache_blocks: your code here")


__all__ = ["PrefixCaching"]

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
        ### BEGIN SOLUTION
        if not self.enable_prefix_caching:
            return [], []
        return self.pool.match_prefix(token_ids, self.block_size, (len(token_ids) - 1) // self.block_size)
        ### END SOLUTION

    def cache_blocks(self, seq_id: int, token_ids: Seq[int], num_computed_tokens: int) -> None:
        """Publish the sequence's full blocks whose tokens are all computed to the prefix cache.

        Idempotent; a no-op without prefix caching. ``token_ids`` are the sequence's
        tokens (prompt then output); only the first ``num_computed_tokens`` matter.
        If another block already caches the same content, this one stays private.
        """
        # Resume the hash chain after the blocks this sequence already published.
        ### BEGIN SOLUTION
        table = self._table(seq_id)
        limit = min(len(token_ids), len(table) * self.block_size)
        if not 0 <= num_computed_tokens <= limit:
            raise ValueError(f"num_computed_tokens must be in [0, {limit}] for seq_id {seq_id}, got {num_computed_tokens}")
        if not self.enable_prefix_caching:
            return
        keys = self._seq_hashes[seq_id]
        key = keys[-1] if keys else None
        for i in range(len(keys), num_computed_tokens // self.block_size):
            key = hash_block_tokens(key, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = table[i]
            if self.pool.block_hashes[block] not in (None, key):
                raise ValueError(f"token_ids of seq_id {seq_id} disagree with the tokens cached in block {block}")
            self.pool.cache_block(block, key)
            keys.append(key)
        ### END SOLUTION


__all__ = ["PrefixCaching"]

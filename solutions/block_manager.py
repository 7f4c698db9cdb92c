"""Part 2: the paged KV-cache block manager (PagedAttention's memory manager).

PagedAttention (Kwon et al., SOSP 2023) keeps each sequence's K/V in fixed-size blocks,
like pages of virtual memory: a *block table* maps a sequence's logical blocks to
physical ones, so a sequence wastes only the unfilled tail of its last block. This
module owns the block tables; :mod:`.block_pool` owns the physical blocks.

- Sharing and copy-on-write (paper, section 4.4): :meth:`~PagedAttentionConfig.fork`
  shares every block; the first write into a still-shared block copies it, and
  :meth:`~PagedAttentionConfig.append_slots` returns the ``(src, dst)`` copies to make.
- Automatic prefix caching (vLLM v1): a full, computed block is published under a hash
  of its tokens chained with its parent's hash; a later prompt that starts with the
  same full blocks reuses them (lookup and publishing: :mod:`.block_prefix_cache`).
- The last prompt token is always recomputed (its forward pass yields the first output
  token's logits), so a hit covers at most ``(len(token_ids) - 1) // block_size`` blocks.

The mixins :mod:`.block_prefix_cache` and :mod:`.block_swap` (host swapping) complete the class.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence as Seq

from servinglab.interfaces import BlockManagerStats

from .block_pool import BlockPool, NoFreeBlocksError, hash_block_tokens
from .block_prefix_cache import PrefixCaching
from .block_swap import SwapSpace

__all__ = ["BlockManager", "BlockPool", "NoFreeBlocksError", "PagedAttentionConfig", "hash_block_tokens"]


def _check_positive_int(name: str, value: int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an integer > 0 (a bool is not)."""
    ### BEGIN SOLUTION
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    ### END SOLUTION


class PagedAttentionConfig(PrefixCaching, SwapSpace):
    """Block tables of live sequences over a pool of ``num_blocks`` KV blocks.

    Implements :class:`servinglab.interfaces.BlockManager`. Token ``p`` of sequence ``s``
    lives in slot ``block_tables[s][p // block_size] * block_size + p % block_size``.

    Attributes:
        num_blocks: physical blocks in the KV cache.
        block_size: tokens per block.
        enable_prefix_caching: publish computed full blocks and reuse them across prompts.
        block_tables: ``seq_id`` -> the sequence's physical block ids, in token order.

    Prefix-cache lookup and publishing come from
    :class:`~.block_prefix_cache.PrefixCaching`: ``_match_prefix`` / ``cache_blocks``.
    Swapping to a host pool of ``num_host_blocks`` blocks (``preemption_mode="swap"``)
    comes from :class:`~.block_swap.SwapSpace`: ``swap_out`` / ``swap_in``.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0) -> None:
        """Create an empty manager; raise ValueError unless both sizes are positive ints."""
        _check_positive_int("num_blocks", num_blocks)
        _check_positive_int("block_size", block_size)
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(self.num_blocks)
        self.block_tables: dict[int, list[int]] = {}
        # Where each sequence's next write is expected (the end of its last append_slots
        # range): lets can_append_slots count the copy-on-writes that append will need.
        self._next_write: dict[int, int] = {}
        # Chained cache keys of each sequence's leading full, computed blocks, so that
        # cache_blocks only hashes blocks it has not seen yet (O(new blocks) per call).
        self._seq_hashes: dict[int, list[bytes]] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.init_swap_space(num_host_blocks)

    # ----- small helpers (given) -----
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on reuse)."""
        return self.pool.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold ``block_id`` right now."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id must be in [0, {self.num_blocks}), got {block_id}")
        return self.pool.ref_counts[block_id]

    def usage(self) -> float:
        """Fraction of blocks held by live sequences (vLLM's ``kv_cache_usage_perc``)."""
        return self.get_stats().usage

    def _table(self, seq_id: int) -> list[int]:
        if seq_id not in self.block_tables:
            raise KeyError(f"seq_id {seq_id} has no blocks (never allocated, or already deallocated)")
        return self.block_tables[seq_id]

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)  # ceil division

    def _no_free(self, needed: int) -> NoFreeBlocksError:
        return NoFreeBlocksError(f"need {needed} free KV blocks, only {self.num_free_blocks} of {self.num_blocks} free")

    # ----- the parts you write -----
    def get_slot(self, seq_id: int, position: int) -> int:
        """Return the cache slot of token ``position`` of ``seq_id`` (ValueError outside its blocks)."""
        ### BEGIN SOLUTION
        table = self._table(seq_id)
        if not 0 <= position < len(table) * self.block_size:
            raise ValueError(f"position must be in [0, {len(table) * self.block_size}) for seq_id {seq_id}, got {position}")
        return table[position // self.block_size] * self.block_size + position % self.block_size
        ### END SOLUTION

    def _free_blocks_needed(self, num_tokens: int, hits: list[int]) -> int:
        """Free blocks an allocation of ``num_tokens`` tokens with these prefix hits consumes."""
        # A hit on a block with ref count 0 takes it out of the free queue, so it costs a
        # free block just like a fresh one; a hit on a block some sequence holds is free.
        ### BEGIN SOLUTION
        revived = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        return self._blocks_for(num_tokens) - len(hits) + revived
        ### END SOLUTION

    def can_allocate(self, token_ids: Seq[int]) -> bool:
        """Whether :meth:`allocate_blocks` would succeed for these tokens now."""
        ### BEGIN SOLUTION
        if len(token_ids) == 0:
            raise ValueError("token_ids must hold at least one token, got an empty sequence")
        hits, _ = self._match_prefix(token_ids)
        return self._free_blocks_needed(len(token_ids), hits) <= self.num_free_blocks
        ### END SOLUTION

    def allocate_blocks(self, seq_id: int, token_ids: Seq[int]) -> int:
        """Give a new sequence blocks for all ``len(token_ids)`` tokens at once.

        With prefix caching, the longest run of cached full blocks at the start of the
        prompt is shared instead of allocated (at most ``(len - 1) // block_size``
        blocks, so the last token is always computed).

        Returns:
            The number of leading tokens already cached: a multiple of ``block_size``,
            at most ``len(token_ids) - 1``; 0 without prefix caching.

        Raises:
            ValueError: ``seq_id`` already has blocks, or ``token_ids`` is empty.
            NoFreeBlocksError: not enough free blocks (nothing is changed).
        """
        # Counts toward get_stats(): queries += len(token_ids), hits += the return value
        # (successful allocations with prefix caching on only).
        ### BEGIN SOLUTION
        if seq_id in self.block_tables:
            raise ValueError(f"seq_id {seq_id} already has blocks; deallocate_blocks it first")
        if len(token_ids) == 0:
            raise ValueError("token_ids must hold at least one token, got an empty sequence")
        hits, keys = self._match_prefix(token_ids)
        needed = self._free_blocks_needed(len(token_ids), hits)
        if needed > self.num_free_blocks:
            raise self._no_free(needed)
        # Take the hits out of the free queue *before* popping fresh blocks, or the LRU
        # pop could evict (and hand out) a block this very prompt is about to reuse.
        for block in hits:
            self.pool.touch(block)
        fresh = [self.pool.get_new_block() for _ in range(self._blocks_for(len(token_ids)) - len(hits))]
        self.block_tables[seq_id] = hits + fresh
        self._seq_hashes[seq_id] = keys
        num_cached = len(hits) * self.block_size
        self._next_write[seq_id] = num_cached
        if self.enable_prefix_caching:
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += num_cached
        return num_cached
        ### END SOLUTION

    def _shared_blocks(self, table: list[int], start: int, end: int) -> list[int]:
        """Indices into ``table`` of blocks with ref count > 1 that positions ``[start, end)`` hit."""
        ### BEGIN SOLUTION
        if end <= start:
            return []
        last = min(len(table), self._blocks_for(end))
        return [i for i in range(start // self.block_size, last) if self.pool.ref_counts[table[i]] > 1]
        ### END SOLUTION

    def can_append_slots(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to hold ``num_tokens`` tokens in total.

        Counts the new blocks plus one copy-on-write per shared block that the positions
        from the sequence's next write (the end of its last :meth:`append_slots` range,
        or its cached prefix after :meth:`allocate_blocks`) up to ``num_tokens`` fall in.
        """
        ### BEGIN SOLUTION
        table = self._table(seq_id)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        new = max(0, self._blocks_for(num_tokens) - len(table))
        return new + len(self._shared_blocks(table, self._next_write[seq_id], num_tokens)) <= self.num_free_blocks
        ### END SOLUTION

    def append_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for the K/V of positions ``[num_computed_tokens, num_computed_tokens + num_new_tokens)``.

        Grows the table to cover ``num_computed_tokens + num_new_tokens`` tokens. Every
        block those positions fall in that is shared (ref count > 1) is copied on write:
        a fresh block replaces it in this table and the shared one loses a reference. A
        cached block this sequence alone holds leaves the prefix cache (its content
        changes: after a speculative rollback, say).

        Returns:
            ``(src, dst)`` block pairs whose K/V the runner must copy before the step.

        Raises:
            ValueError: a negative count, or ``num_computed_tokens`` past the table's slots.
            NoFreeBlocksError: not enough free blocks (nothing is changed).
        """
        # Validate and count every block needed before changing anything, so that a
        # NoFreeBlocksError leaves the manager as it was (the scheduler then preempts).
        ### BEGIN SOLUTION
        table = self._table(seq_id)
        capacity = len(table) * self.block_size
        if not 0 <= num_computed_tokens <= capacity:
            raise ValueError(f"num_computed_tokens must be in [0, {capacity}] for seq_id {seq_id}, got {num_computed_tokens}")
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        end = num_computed_tokens + num_new_tokens
        shared = self._shared_blocks(table, num_computed_tokens, end)
        num_new_blocks = max(0, self._blocks_for(end) - len(table))
        if len(shared) + num_new_blocks > self.num_free_blocks:
            raise self._no_free(len(shared) + num_new_blocks)
        copies: list[tuple[int, int]] = []
        for i in shared:
            src, dst = table[i], self.pool.get_new_block()
            self.pool.free_block(src)  # ref > 1, so it stays held by the other tables
            table[i] = dst
            copies.append((src, dst))
        if num_new_tokens > 0:
            first = num_computed_tokens // self.block_size
            for i in range(first, min(len(table), self._blocks_for(end))):
                self.pool.uncache_block(table[i])
            del self._seq_hashes[seq_id][first:]
        table.extend(self.pool.get_new_block() for _ in range(num_new_blocks))
        self._next_write[seq_id] = end
        return copies
        ### END SOLUTION

    def fork(self, parent_id: int, child_id: int) -> None:
        """Let ``child_id`` share every block of ``parent_id`` (ref counts up, no copy)."""
        ### BEGIN SOLUTION
        parent = self._table(parent_id)
        if child_id in self.block_tables:
            raise ValueError(f"child_id {child_id} already has blocks")
        for block in parent:
            self.pool.touch(block)
        self.block_tables[child_id] = list(parent)
        self._next_write[child_id] = self._next_write[parent_id]
        self._seq_hashes[child_id] = list(self._seq_hashes[parent_id])
        ### END SOLUTION

    def trim_blocks(self, seq_id: int, num_tokens: int) -> None:
        """Keep the blocks of the first ``num_tokens`` tokens, free the rest (speculative rollback)."""
        # Free the tail last-block-first, as deallocate_blocks does.
        ### BEGIN SOLUTION
        table = self._table(seq_id)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        keep = self._blocks_for(num_tokens)
        for block in reversed(table[keep:]):
            self.pool.free_block(block)
        del table[keep:]
        self._next_write[seq_id] = min(self._next_write[seq_id], num_tokens)
        del self._seq_hashes[seq_id][num_tokens // self.block_size :]
        ### END SOLUTION

    def deallocate_blocks(self, seq_id: int) -> None:
        """Release every block of the sequence; cached blocks stay reusable until evicted."""
        # Free in reverse: the tail blocks reach the free queue first, so they are evicted
        # before the head blocks, which are the ones other prompts are likely to share.
        ### BEGIN SOLUTION
        for block in reversed(self._table(seq_id)):
            self.pool.free_block(block)
        del self.block_tables[seq_id], self._next_write[seq_id], self._seq_hashes[seq_id]
        ### END SOLUTION

    def get_stats(self) -> BlockManagerStats:
        """A snapshot of the pool and the prefix-cache counters (in tokens)."""
        ### BEGIN SOLUTION
        return BlockManagerStats(
            num_blocks=self.num_blocks,
            num_free_blocks=self.num_free_blocks,
            num_cached_blocks=len(self.pool.cached_block),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )
        ### END SOLUTION


BlockManager = PagedAttentionConfig

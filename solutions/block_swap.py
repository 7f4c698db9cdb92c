"""Part 2, swapping: move a preempted sequence's KV blocks to host memory and back.

When the paged pool runs out, the scheduler (Part 4) preempts the newest sequence. With
``preemption_mode="recompute"`` its K/V are dropped and recomputed later from its tokens;
with ``preemption_mode="swap"`` (the vLLM paper, Kwon et al., SOSP 2023, section 4.5)
they are copied to a *host* pool of ``swap_space`` GiB (pinned CPU memory on a GPU
machine) and copied back when the sequence resumes. Which is faster depends on the
hardware: a swap moves ``2 x layers x kv_heads x head_dim x bytes`` per token over
PCIe, a recompute runs the model over every token again (paper, section 7.3).

This module is the block manager's side of it, a mixin of
:class:`~.block_manager.PagedAttentionConfig`. It only plans: :meth:`SwapSpace.swap_out`
and :meth:`SwapSpace.swap_in` return the ``(src, dst)`` block pairs the runner copies
(device to host before the step, host to device before the step); the tensors never
pass through here.

The rules the tests check:

- A host block belongs to exactly one swapped sequence (no sharing on the host side).
- A device block shared with another sequence (a fork, a prefix-cache hit) is still
  copied out, but only loses this sequence's reference: the other holders keep it
  (copy-on-write's reference counts, section 4.4).
- A freed device block keeps its prefix-cache hash, as :meth:`deallocate_blocks` does;
  on swap-in a full block whose content is still cached on the device is reused (its
  reference revived) instead of copied, and the copied full blocks are published again.
- Swap-out of a sequence with more blocks than the host has free raises
  :class:`NoFreeBlocksError` and changes nothing; the scheduler then recomputes instead.
"""

from __future__ import annotations

from .block_pool import BlockPool, NoFreeBlocksError


class SwapSpace:
    """The host pool and the swapped sequences' host block tables (mixed into the block manager).

    Attributes:
        num_host_blocks: blocks in the host pool (``swap_space`` GiB / bytes per block).
        host_free: host block ids not holding any sequence's K/V, reused from the front.
        host_tables: ``seq_id`` -> the swapped sequence's host block ids, in token order.
    """

    # Set by the block manager that mixes this in.
    pool: BlockPool
    block_size: int
    block_tables: dict[int, list[int]]
    _next_write: dict[int, int]
    _seq_hashes: dict[int, list[bytes]]

    def init_swap_space(self, num_host_blocks: int) -> None:
        """Start with every one of ``num_host_blocks`` host blocks free (0: no swapping possible)."""
        if isinstance(num_host_blocks, bool) or not isinstance(num_host_blocks, int) or num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be an int >= 0, got {num_host_blocks!r}")
        self.num_host_blocks = num_host_blocks
        self.host_free: list[int] = list(range(num_host_blocks))
        self.host_tables: dict[int, list[int]] = {}

    @property
    def num_free_host_blocks(self) -> int:
        """Host blocks no swapped sequence holds."""
        return len(self.host_free)

    def is_swapped(self, seq_id: int) -> bool:
        """Whether ``seq_id``'s K/V sit in the host pool now."""
        return seq_id in self.host_tables

    def _host_table(self, seq_id: int) -> list[int]:
        if seq_id not in self.host_tables:
            raise KeyError(f"seq_id {seq_id} is not swapped out")
        return self.host_tables[seq_id]

    # ----- the parts you write -----
    def can_swap_out(self, seq_id: int) -> bool:
        """Whether the host pool has a free block for every block of ``seq_id``'s table."""
        ### BEGIN SOLUTION
        if seq_id not in self.block_tables:
            raise KeyError(f"seq_id {seq_id} has no device blocks to swap out")
        return len(self.block_tables[seq_id]) <= self.num_free_host_blocks
        ### END SOLUTION

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]:
        """Move ``seq_id``'s block table to the host pool.

        Every device block of the table gets a host block (taken from the front of
        ``host_free``, in table order); the device block loses this sequence's reference
        (last block first, as :meth:`deallocate_blocks` frees). The sequence keeps its
        next-write position and its prefix-cache keys for :meth:`swap_in`.

        Returns:
            ``(device_block, host_block)`` pairs, in table order: the runner copies each
            device block to its host block *before* anything else runs this step (the
            freed device blocks may be handed to another sequence in the same step).

        Raises:
            KeyError: ``seq_id`` has no device blocks.
            NoFreeBlocksError: the host pool is short of blocks (nothing is changed).
        """
        ### BEGIN SOLUTION
        if not self.can_swap_out(seq_id):
            need = len(self.block_tables[seq_id])
            raise NoFreeBlocksError(f"swap out needs {need} host blocks, only {self.num_free_host_blocks} free")
        table = self.block_tables.pop(seq_id)
        host = self.host_free[: len(table)]
        del self.host_free[: len(table)]
        for block in reversed(table):
            self.pool.free_block(block)  # a shared block stays held by its other tables
        self.host_tables[seq_id] = host
        return list(zip(table, host))
        ### END SOLUTION

    def _swap_in_hits(self, seq_id: int) -> list[int | None]:
        """Per host block: the device block that still caches its content, or ``None``."""
        # Only the sequence's published keys (its leading full, computed blocks) can hit.
        ### BEGIN SOLUTION
        keys = self._seq_hashes[seq_id]
        return [self.pool.cached_block.get(keys[i]) if i < len(keys) else None for i in range(len(self._host_table(seq_id)))]
        ### END SOLUTION

    def can_swap_in(self, seq_id: int, num_tokens: int) -> bool:
        """Whether :meth:`swap_in` and then growing to ``num_tokens`` tokens in total fit in the free blocks.

        Counts a fresh block per host block without a cache hit, one for each hit on a
        free (cached) block (reviving it takes it out of the free queue), none for a hit
        on a block some sequence holds, plus the blocks growth past the table needs.
        """
        ### BEGIN SOLUTION
        hits = self._swap_in_hits(seq_id)
        taken = sum(1 for b in hits if b is None or self.pool.ref_counts[b] == 0)
        grow = max(0, -(-num_tokens // self.block_size) - len(hits))
        return taken + grow <= self.pool.num_free_blocks
        ### END SOLUTION

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a swapped sequence back to device blocks; its host blocks return to ``host_free``.

        Block ``i`` of the table becomes the cached device block with the sequence's
        ``i``-th prefix key when there is one (revived, nothing to copy), else a fresh
        block (copied from host, then published under its key if it has one). Take the
        hits out of the free queue before popping fresh blocks, as allocation does.

        Returns:
            ``(host_block, device_block)`` pairs for the blocks to copy back, in table order.

        Raises:
            KeyError: ``seq_id`` is not swapped out.
            NoFreeBlocksError: not enough free device blocks (nothing is changed).
        """
        ### BEGIN SOLUTION
        hits = self._swap_in_hits(seq_id)
        if not self.can_swap_in(seq_id, 0):
            raise NoFreeBlocksError(f"swap in of seq_id {seq_id} needs more than the {self.pool.num_free_blocks} free blocks")
        host = self.host_tables.pop(seq_id)
        for block in hits:
            if block is not None:
                self.pool.touch(block)
        keys = self._seq_hashes[seq_id]
        table: list[int] = []
        copies: list[tuple[int, int]] = []
        for i, (h, hit) in enumerate(zip(host, hits)):
            if hit is None:
                hit = self.pool.get_new_block()
                copies.append((h, hit))
                if i < len(keys):
                    self.pool.cache_block(hit, keys[i])
            table.append(hit)
        self.host_free.extend(host)
        self.block_tables[seq_id] = table
        return copies
        ### END SOLUTION

    def free_swapped(self, seq_id: int) -> None:
        """Forget a swapped sequence that finished or was aborted: its host blocks become free."""
        ### BEGIN SOLUTION
        self.host_free.extend(self.host_tables.pop(seq_id))
        del self._next_write[seq_id], self._seq_hashes[seq_id]
        ### END SOLUTION


__all__ = ["NoFreeBlocksError", "SwapSpace"]

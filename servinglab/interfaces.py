"""The seams between the runtime and the graded parts.

The engine only ever calls a part through these interfaces. A student who implements
them, with the documented meaning, gets a working engine. Parts 2 and 4 are plain Python
(ints, lists, dicts, deques); Part 3 is the one place the engine hands tensors to
student code.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from servinglab.sequence import Sequence


@dataclass
class BlockManagerStats:
    """A snapshot of the paged KV pool (Part 2 fills it)."""

    num_blocks: int
    num_free_blocks: int  # blocks with ref count 0 (cached ones included: they can be evicted)
    num_cached_blocks: int  # blocks that carry a prefix-cache hash right now
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache so far
    prefix_cache_hits: int  # of those, tokens served from cached blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (vLLM's ``kv_cache_usage_perc``)."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@runtime_checkable
class BlockManager(Protocol):
    """Part 2: the paged KV-cache allocator (``solutions.block_manager.PagedAttentionConfig``).

    Block ids are ints in ``range(num_blocks)``. A sequence's *block table* lists its
    blocks in order: token at position ``p`` lives in slot
    ``block_tables[seq_id][p // block_size] * block_size + p % block_size``.
    """

    block_size: int
    num_blocks: int
    block_tables: dict[int, list[int]]

    @property
    def get_slot(self, seq_id: int, position: int) -> int:
        """The cache slot of token ``position`` of ``seq_id``: the runner builds every step's slot mapping with it."""
        ...

    def num_free_blocks(self) -> int: ...

    def can_allocate(self, token_ids: Seq[int]) -> bool:
        """Whether :meth:`allocate_blocks` would succeed for these tokens now."""
        ...

    def allocate_blocks(self, seq_id: int, token_ids: Seq[int]) -> int:
        """Give a new sequence blocks for all ``len(token_ids)`` tokens; return the number of
        leading tokens already cached (prefix hits: full blocks only, never the last token)."""
        ...

    def can_append_slots(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to hold ``num_tokens`` tokens in total."""
        ...

    def append_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for K/V of positions ``[num_computed_tokens, num_computed_tokens + num_new_tokens)``;
        copy-on-write any shared block those positions fall in; return ``(src, dst)`` block copies."""
        ...

    def cache_blocks(self, seq_id: int, token_ids: Seq[int], num_computed_tokens: int) -> None:
        """Publish the sequence's full, computed blocks to the prefix cache."""
        ...

    def fork(self, parent_id: int, child_id: int) -> None:
        """Let ``child_id`` share every block of ``parent_id`` (ref counts up, no copy)."""
        ...

    def trim_blocks(self, seq_id: int, num_tokens: int) -> None:
        """Free the blocks past the first ``num_tokens`` tokens (speculative-decoding rollback)."""
        ...

    def deallocate_blocks(self, seq_id: int) -> None:
        """Release every block of the sequence (cached blocks stay reusable until evicted)."""
        ...

    def can_swap_out(self, seq_id: int) -> bool:
        """Whether the host pool can take every block of the sequence (``preemption_mode="swap"``)."""
        ...

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]:
        """Move the sequence's blocks to the host pool; return ``(device, host)`` block copies."""
        ...

    def can_swap_in(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the swapped sequence fits back on the device, grown to ``num_tokens`` tokens."""
        ...

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a swapped sequence back to device blocks; return ``(host, device)`` block copies."""
        ...

    def free_swapped(self, seq_id: int) -> None:
        """Release the host blocks of a swapped sequence that finished or was aborted."""
        ...

    def get_stats(self) -> BlockManagerStats: ...


@dataclass
class ScheduledSequence:
    """One sequence in a step: compute K/V for ``num_new_tokens`` tokens from
    ``seq.num_computed_tokens`` on."""

    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    """What one engine step runs (Part 4 returns it)."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # preemption_mode="swap" (vLLM's names): (device, host) copies to make before anything
    # else this step, and (host, device) copies to make before the copy-on-write ones.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@runtime_checkable
class Scheduler(Protocol):
    """Part 4: continuous batching (``solutions.scheduler.Scheduler``)."""

    waiting: object  # deque[Sequence]
    running: list[Sequence]

    def add_sequence(self, seq: Sequence) -> None: ...

    def schedule(self) -> SchedulerOutput: ...

    def fork_sequence(self, parent: Sequence, child: Sequence) -> None: ...

    def finish_sequence(self, seq: Sequence) -> None: ...

    def has_unfinished(self) -> bool: ...


@dataclass
class AttentionMetadata:
    """Everything paged attention needs about the flattened batch (Part 3's input).

    The batch is flattened: ``T`` new tokens from ``B`` sequences, sequence ``b`` owning
    query rows ``query_start_loc[b]:query_start_loc[b + 1]``.

    Attributes:
        slot_mapping: ``[T]`` int64, the cache slot each new token's K/V goes to.
        block_tables: ``[B, max_blocks]`` int32, each row a block table padded with 0.
        context_lens: ``[B]`` int32, tokens in cache per sequence *after* this step's writes.
        query_start_loc: ``[B + 1]`` int32, prefix sums of new tokens per sequence.
        max_query_len: largest number of new tokens of one sequence.
        max_context_len: largest context length.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_context_len: int
    # Python copies, so attention code can loop without syncing a device.
    context_lens_list: list[int] = field(default_factory=list)
    query_lens_list: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

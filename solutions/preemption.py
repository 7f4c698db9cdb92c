"""Part 4, preemption: what happens to the sequence the scheduler must evict, and how it comes back.

When the paged KV pool (Part 2) cannot hold the next step's tokens, the scheduler
(:mod:`.scheduler`) preempts its newest running sequence: it has done the least work,
so it loses the least (vLLM, Kwon et al., SOSP 2023, section 4.5). Two ways to give
its blocks back, chosen by ``preemption_mode`` (vLLM's name):

* ``"recompute"`` (the default, and vLLM v1's only way): drop the K/V, put the sequence
  at the front of ``waiting``; on readmission it prefills prompt plus generated tokens
  again. Costs compute, needs no host memory.
* ``"swap"``: copy its blocks to a host pool of ``swap_space`` GiB and back when it
  resumes (``swap_out`` / ``swap_in`` of Part 2's :mod:`.block_swap`). Costs two copies
  over PCIe on a GPU (a memory copy on a CPU) and host memory; nothing is recomputed.
  When the host pool is full the sequence is recomputed instead, and counted.

Which is faster depends on the sequence length and the link: ``servinglab bench
preempt`` measures both on the machine at hand.

This class is mixed into :class:`~.scheduler.Scheduler`; it uses its ``block_manager``,
``running``, ``waiting``, ``swapped``, ``preemption_mode``, ``preemption_counts``,
``max_num_seqs`` and ``enable_chunked_prefill``.
"""

from __future__ import annotations

import collections

from servinglab.interfaces import BlockManager, ScheduledSequence, SchedulerOutput
from servinglab.sequence import Sequence, SequenceStatus

PREEMPTION_MODES = ("recompute", "swap")


class Preemption:
    """Preempt by recompute or swap, and resume swapped sequences (mixed into the scheduler)."""

    block_manager: BlockManager
    running: list[Sequence]
    waiting: collections.deque[Sequence]
    swapped: collections.deque[Sequence]
    preemption_mode: str
    preemption_counts: collections.Counter[str]
    max_num_seqs: int
    enable_chunked_prefill: bool

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preempt ``seq``: by swap if the mode says so and the host pool has room, else by recompute.

        The caller has already removed it from ``running``. Either way
        ``seq.num_preemptions += 1`` and ``out.preempted.append(seq)``, and one of
        ``preemption_counts``' keys goes up by one.

        * Swap (``preemption_mode == "swap"`` and ``block_manager.can_swap_out``): add
          ``swap_out``'s pairs to ``out.blocks_to_swap_out``; the K/V are kept, so
          ``num_computed_tokens`` stays; ``seq.status = SequenceStatus.SWAPPED``, then
          ``swapped.appendleft(seq)``. Key ``"swap"``.
        * Recompute: its tokens are kept, its K/V dropped: ``deallocate_blocks``,
          ``seq.num_computed_tokens = 0``, ``seq.status = SequenceStatus.WAITING``, then
          ``waiting.appendleft(seq)``. On readmission it prefills prompt plus generated
          tokens again, minus any prefix-cache hits. Key ``"recompute"``, or
          ``"recompute_swap_space_full"`` in swap mode when the host pool was full.
        """
        ### BEGIN SOLUTION
        bm = self.block_manager
        seq.num_preemptions += 1
        out.preempted.append(seq)
        if self.preemption_mode == "swap":
            if bm.can_swap_out(seq.seq_id):
                out.blocks_to_swap_out.extend(bm.swap_out(seq.seq_id))
                seq.status = SequenceStatus.SWAPPED
                self.swapped.appendleft(seq)  # the front: it is older than everything swapped after it
                self.preemption_counts["swap"] += 1
                return
            self.preemption_counts["recompute_swap_space_full"] += 1
        else:
            self.preemption_counts["recompute"] += 1
        bm.deallocate_blocks(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        # Front of the queue: it arrived before everything still waiting.
        self.waiting.appendleft(seq)
        ### END SOLUTION

    def _swap_in_swapped(self, out: SchedulerOutput, budget: int) -> int:
        """Resume swapped sequences from the front of ``swapped``; return the budget left.

        While fewer than ``max_num_seqs`` run and budget remains: the head wants
        ``num_uncomputed_tokens`` (capped by the budget with chunked prefill; without it
        a head that does not fit waits); if ``block_manager.can_swap_in(seq_id,
        num_computed_tokens + num_new)`` is false the head waits (no skipping). Else
        ``swap_in`` (its pairs go to ``out.blocks_to_swap_in``), ``append_slots`` for the
        new tokens (copies to ``out.block_copies``), pop it, status ``RUNNING``, append
        to ``running`` and to ``out.scheduled``. Its ``num_computed_tokens`` is kept:
        nothing is recomputed.
        """
        ### BEGIN SOLUTION
        bm = self.block_manager
        while self.swapped and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.swapped[0]
            num_new = seq.num_uncomputed_tokens
            if self.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget:
                break
            if not bm.can_swap_in(seq.seq_id, seq.num_computed_tokens + num_new):
                break
            out.blocks_to_swap_in.extend(bm.swap_in(seq.seq_id))
            out.block_copies.extend(bm.append_slots(seq.seq_id, seq.num_computed_tokens, num_new))
            self.swapped.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return budget
        ### END SOLUTION

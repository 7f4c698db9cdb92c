# Exercise stub generated from solutions/admission.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 4, admission: how a new sequence enters the waiting queue and leaves it for the batch.

A request reaches the scheduler (:mod:`.scheduler`) through :meth:`Admission.add_sequence`,
which queues it at the back of ``waiting`` after refusing what could never run: a
prompt that needs more KV blocks than the whole pool holds or, with chunked prefill
off, more tokens than one step's budget. Each step, :meth:`Admission._admit_waiting`
moves sequences from the head of ``waiting`` into ``running``, first come first served,
while the batch has room (``max_num_seqs``), the step has budget and the block manager
(Part 2) can allocate their blocks. The head blocks the queue when it does not fit: no
later, smaller request overtakes it (vLLM v1's FCFS policy), so none starves.

Admission is where the prefix cache pays off: ``allocate_blocks`` returns how many
leading tokens are cached already, and the sequence starts with those counted as
computed, so its prefill covers only the rest.

This class is mixed into :class:`~.scheduler.Scheduler`; it uses its ``block_manager``,
``running``, ``waiting``, ``swapped``, ``max_num_seqs``, ``max_num_batched_tokens`` and
``enable_chunked_prefill``.
"""

from __future__ import annotations

import collections
import time

from servinglab.interfaces import BlockManager, ScheduledSequence, SchedulerOutput
from servinglab.sequence import Sequence, SequenceStatus


class Admission:
    """Queue new sequences and admit waiting ones into the running batch (mixed into the scheduler)."""

    block_manager: BlockManager
    running: list[Sequence]
    waiting: collections.deque[Sequence]
    swapped: collections.deque[Sequence]
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a new sequence at the back of ``waiting`` with status ``WAITING``.

        Raises:
            ValueError: the sequence has no tokens; its tokens need more blocks than the
                pool has (message names both numbers); or chunked prefill is off and its
                tokens exceed ``max_num_batched_tokens`` (message names it). Such a sequence could never be
                scheduled, so it is refused now instead of blocking the queue forever.
        """
        # Blocks needed: ceil(num_tokens / block_size). Compare with the whole pool, not
        # the free blocks: blocks held by others come back, the pool size never grows.
        raise NotImplementedError("add_sequence: your code here")

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting sequences in order into ``running``; return the budget left.

        :meth:`~.scheduler.Scheduler.schedule` calls it in a step that preempted nobody,
        after the swapped sequences had their turn. While none is left swapped, fewer
        than ``max_num_seqs`` run and budget remains, the head of ``waiting`` is
        admitted, or blocks the queue if it does not fit (no skipping): without chunked
        prefill all its tokens must fit the budget, and ``can_allocate`` must hold.
        Admitting a sequence means: ``allocate_blocks`` (its return value, the
        prefix-cache hit count, becomes both ``seq.num_computed_tokens`` and
        ``seq.num_cached_tokens``), ``append_slots`` for this step's tokens
        (``num_uncomputed_tokens``, capped by the budget with chunked prefill; its
        copies go to ``out.block_copies``), pop it from ``waiting``, set ``seq.status =
        SequenceStatus.RUNNING``, set ``seq.first_scheduled_time = time.perf_counter()``
        if it is still ``None`` (a readmitted sequence keeps its first time), append it
        to ``running`` and to ``out.scheduled``.

        Raises:
            RuntimeError: no sequence runs, the pool is empty and the budget whole, and
                still the head of ``waiting`` cannot be admitted: it has outgrown the
                pool (or the budget, without chunked prefill) and would wait forever.
        """
        # Hint: `self.waiting[0]` is the head; pop it only once it is admitted.
        raise NotImplementedError("_admit_waiting: your code here")


__all__ = ["Admission"]

# Exercise stub generated from solutions/scheduler.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 4: continuous batching with a token budget, chunked prefill and preemption.

Every engine step asks :meth:`Scheduler.schedule` which sequences run and how many new
tokens each computes. The whole policy works on one number per sequence,
``num_computed_tokens`` (the leading tokens whose K/V are in the cache): a sequence
needs ``num_tokens - num_computed_tokens`` more tokens of forward pass, which is its
whole prompt on admission, a slice of it during a chunked prefill, and exactly one token
while decoding. So prefill and decode are not separate phases; they are one loop over
one token budget (the design of vLLM v1's ``sched/scheduler.py``).

The three ideas, and where they come from:

* Iteration-level scheduling (Orca, OSDI 2022): the batch is rebuilt every step, so a
  finished sequence leaves at once and a waiting one joins at once, instead of the whole
  batch waiting for its longest member.
* Chunked prefill (Sarathi, Agrawal et al. 2023): a long prompt is split across steps so
  it never takes a step's whole budget; the decodes of the running sequences keep
  going in the same steps, which keeps their inter-token latency flat.
* Preemption (vLLM, Kwon et al., SOSP 2023, section 4.5): when the paged KV pool runs
  out, the newest running sequence gives back its blocks. By recompute (the default) it
  returns to the front of the queue and later recomputes its K/V from its tokens; by
  swap (``preemption_mode="swap"``) its K/V are copied to a host pool and back when it
  resumes. Recomputing needs no host memory and is cheap for short sequences; the paper
  compares both (section 7.3) and ``servinglab bench preempt`` does the same here.

The scheduler only plans: it never runs the model and never samples. After each step
the engine advances ``seq.num_computed_tokens`` by the scheduled ``num_new_tokens``,
publishes full blocks with ``block_manager.cache_blocks`` and, when a sequence's tokens
are all computed, appends the sampled token (or finishes the sequence through
:meth:`Scheduler.finish_sequence`).

What can never fit is refused up front: :meth:`Scheduler.add_sequence` raises
``ValueError`` for a prompt that needs more blocks than the whole pool holds (or, with
chunked prefill off, more tokens than one step's budget). Room for the tokens a
sequence will *generate* is the engine's check (prompt plus ``max_tokens``); if a
sequence still outgrows the pool, :meth:`Scheduler.schedule` raises ``RuntimeError``
once it is alone and cannot be admitted, rather than looping forever.

Part 4's files: this one (the step loop over running sequences, forks, finishing),
:mod:`.admission` (``add_sequence`` and admitting waiting sequences) and
:mod:`.preemption` (preempting and resuming swapped sequences); the last two are mixins
of :class:`Scheduler`.
"""

from __future__ import annotations

import collections

from servinglab.interfaces import BlockManager, ScheduledSequence, SchedulerOutput
from servinglab.sequence import Sequence, SequenceStatus

from .admission import Admission
from .preemption import PREEMPTION_MODES, Preemption


class Scheduler(Admission, Preemption):
    """Decide, every step, which sequences run and how many new tokens each computes.

    Args:
        block_manager: the paged KV allocator (Part 2) this scheduler drives.
        max_num_seqs: most sequences running at once (the batch size cap).
        max_num_batched_tokens: most new tokens in one step, over all sequences (the
            token budget).
        enable_chunked_prefill: split prompts longer than the remaining budget across
            steps. Without it a prompt runs whole or waits.
        preemption_mode: ``"recompute"`` (default) or ``"swap"`` (vLLM's name): how a
            preempted sequence gives back its blocks (see :meth:`_preempt`).

    Attributes:
        waiting: sequences queued for admission, first come first served; preempted
            sequences go back to the front.
        running: sequences holding KV blocks, oldest first (the last one is the first
            to be preempted).
        swapped: sequences preempted by swap, whose K/V wait in the host pool; they
            resume before any waiting sequence is admitted.
        preemption_counts: preemptions so far by kind: ``"recompute"``, ``"swap"``, and
            ``"recompute_swap_space_full"`` (swap mode, but the host pool was full).
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        preemption_mode: str = "recompute",
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemption_mode = preemption_mode
        self.swapped: collections.deque[Sequence] = collections.deque()
        self.preemption_counts: collections.Counter[str] = collections.Counter()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_unfinished(self) -> bool:
        """True while any sequence is waiting or running."""
        return bool(self.waiting) or bool(self.running) or bool(self.swapped)

    def schedule(self) -> SchedulerOutput:
        """Plan one step: which sequences compute how many new tokens.

        The policy (vLLM v1): one token budget of ``max_num_batched_tokens`` per step.

        1. Running sequences first, oldest first. Each wants
           ``seq.num_uncomputed_tokens`` (1 while decoding); with chunked prefill it gets
           at most the remaining budget, without it a prefill that does not fit waits.
           If the block manager cannot hold the new tokens, preempt the newest running
           sequence (see :meth:`_preempt`) and retry; if the one being scheduled is the
           newest, preempt it and stop. Reserve slots with ``append_slots`` and collect
           its copy-on-write copies into ``block_copies``.
        2. Only if nothing was preempted, first resume swapped sequences (see
           :meth:`_swap_in_swapped`), then admit waiting sequences in order with the
           budget left (see :meth:`_admit_waiting`: only once none is left swapped, and
           the head blocks the queue if it does not fit).

        Invariants the tests check after every step: running sequences come before newly
        admitted ones in ``scheduled``; no sequence appears with 0 new tokens, and none
        twice; every scheduled sequence has status ``RUNNING`` and is in ``running``;
        ``num_computed_tokens + num_new_tokens <= num_tokens`` and its block table has a
        slot for each of them; the new tokens sum to at most ``max_num_batched_tokens``;
        at most ``max_num_seqs`` run; a step that preempted admits nobody; without
        chunked prefill a sequence always gets all its uncomputed tokens.

        Raises:
            RuntimeError: from :meth:`_admit_waiting`, when the head of ``waiting`` has
                outgrown the pool (or the budget) and would wait forever.
        """
        # Hints: keep `budget` = tokens left this step. Walk `running` by index, because
        # preemption pops from its end.
        raise NotImplementedError("schedule: your code here")

    def fork_sequence(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` as a copy of running ``parent`` that shares all its KV blocks.

        For ``n > 1`` samples and beam search: the block manager raises ref counts
        instead of copying, and copy-on-write splits a block only when one of them
        writes to it. The child runs right after its parent (so it is preempted before
        it) with the parent's ``num_computed_tokens`` and ``num_cached_tokens``, status
        ``RUNNING`` and, if it has none, the parent's ``first_scheduled_time``. The block
        manager's ``fork(parent.seq_id, child.seq_id)`` shares the blocks (no new block
        is taken). The engine makes the child's tokens equal the parent's.

        Raises:
            ValueError: ``parent`` is not running.
        """
        raise NotImplementedError("fork_sequence: your code here")

    def finish_sequence(self, seq: Sequence) -> None:
        """Remove a finished sequence from its queue and free its blocks.

        The engine sets ``seq.status`` to a finished status first (stop, length or
        abort); this method leaves the status as it is. The sequence may be running or
        still waiting (then it holds no blocks and is just dropped from ``waiting``).
        Calling it again for the same sequence does nothing.

        Raises:
            ValueError: ``seq.status`` is not a finished status.
        """
        raise NotImplementedError("finish_sequence: your code here")

    def abort_sequence(self, seq: Sequence) -> None:
        """Cancel ``seq`` (client went away): status ``FINISHED_ABORTED``, blocks freed."""
        if not seq.is_finished:
            seq.status = SequenceStatus.FINISHED_ABORTED
        self.finish_sequence(seq)

"""Pipeline parallelism in the engine (Part 9b): virtual engines keep ``p`` micro-batches in flight.

With ``pipeline_parallel_size=p`` the model runs as ``p`` stages on separate ranks
(:mod:`servinglab.engine.pp_worker`). One batch at a time would leave ``p - 1`` stages
idle, so the driver keeps up to ``p`` batches in flight, as vLLM v0's *virtual engines*
do: ``p`` independent (scheduler, block manager) pairs, each owning ``1/p`` of the KV
blocks (virtual engine ``v`` uses block ids ``v * n .. (v + 1) * n - 1`` of every
rank's cache). A request joins one virtual engine for life (the student's
``pick_virtual_engine``), so a sequence is never in two micro-batches at once and the
student's Parts 2 and 4 run unchanged inside each virtual engine: batching, chunked
prefill and preemption all work per virtual engine.

:class:`VirtualEngines` puts the ``p`` pairs behind the one scheduler / block manager
the engine talks to (routing each sequence to its owner and shifting its block ids);
:meth:`VirtualEngines.step` is the engine's step: fill the pipeline with one batch per
idle virtual engine, then wait for the oldest and commit it (sampling, stop checks)
exactly as a plain step does.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from servinglab.engine.stall import raise_if_stalled
from servinglab.impl import load_part
from servinglab.interfaces import BlockManagerStats
from servinglab.sequence import Sequence


def make_scheduling(config: Any, num_kv_blocks: int, num_host_blocks: int) -> tuple[Any, Any, VirtualEngines | None]:
    """``(block_manager, scheduler, virtual_engines)`` for an engine: Parts 2 and 4, one pair or ``p`` behind a facade."""
    pp = config.pipeline_parallel_size

    def make_block_manager() -> Any:
        return load_part("block_manager").PagedAttentionConfig(
            num_blocks=num_kv_blocks // pp, block_size=config.block_size, enable_prefix_caching=config.enable_prefix_caching,
            num_host_blocks=num_host_blocks)

    def make_scheduler(bm: Any) -> Any:
        return load_part("scheduler").Scheduler(
            bm, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill, preemption_mode=config.preemption_mode)

    if pp > 1:
        engines = VirtualEngines(make_block_manager, make_scheduler, pp)
        return engines, engines, engines
    bm = make_block_manager()
    return bm, make_scheduler(bm), None


class VirtualEngines:
    """``p`` schedulers and block managers behind the engine's scheduler *and* block manager interfaces.

    Args:
        make_block_manager: builds one virtual engine's block manager (its share of the blocks).
        make_scheduler: builds a scheduler over a given block manager.
        pp_size: the number of virtual engines.
    """

    def __init__(self, make_block_manager: Callable[[], Any], make_scheduler: Callable[[Any], Any], pp_size: int) -> None:
        self.block_managers = [make_block_manager() for _ in range(pp_size)]
        self.schedulers = [make_scheduler(bm) for bm in self.block_managers]
        self.block_size: int = self.block_managers[0].block_size
        self.num_blocks: int = self.block_managers[0].num_blocks  # per virtual engine: the most one request may use
        self.owner: dict[int, int] = {}  # seq_id -> virtual engine
        self.in_flight: collections.deque[tuple[int, Any, list[bool], float, list[Sequence]]] = collections.deque()
        self.next_ve = 0

    # ----- the scheduler side
    @property
    def waiting(self) -> list[Sequence]:
        return [s for sched in self.schedulers for s in sched.waiting]

    @property
    def running(self) -> list[Sequence]:
        return [s for sched in self.schedulers for s in sched.running]

    @property
    def preemption_counts(self) -> collections.Counter[str]:
        return sum((sched.preemption_counts for sched in self.schedulers), collections.Counter())

    def has_unfinished(self) -> bool:
        return any(sched.has_unfinished() for sched in self.schedulers)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue ``seq`` on the virtual engine the student's ``pick_virtual_engine`` chooses."""
        loads = [len(s.waiting) + len(s.running) + len(getattr(s, "swapped", ())) for s in self.schedulers]
        ve = load_part("pipeline_parallel").pick_virtual_engine(loads)
        self.schedulers[ve].add_sequence(seq)
        self.owner[seq.seq_id] = ve

    def finish_sequence(self, seq: Sequence) -> None:
        self.schedulers[self.owner[seq.seq_id]].finish_sequence(seq)

    def fork_sequence(self, parent: Sequence, child: Sequence) -> None:
        self.owner[child.seq_id] = self.owner[parent.seq_id]
        self.schedulers[self.owner[parent.seq_id]].fork_sequence(parent, child)

    # ----- the block-manager side (global block ids: a virtual engine's ids shifted by its offset)
    def offset(self, ve: int) -> int:
        return ve * self.num_blocks

    def get_slot(self, seq_id: int, position: int) -> int:
        ve = self.owner[seq_id]
        return self.block_managers[ve].get_slot(seq_id, position) + self.offset(ve) * self.block_size

    def cache_blocks(self, seq_id: int, token_ids: list[int], num_computed_tokens: int) -> None:
        self.block_managers[self.owner[seq_id]].cache_blocks(seq_id, token_ids, num_computed_tokens)

    @property
    def block_tables(self) -> dict[int, list[int]]:
        return {sid: [b + self.offset(ve) for b in bm.block_tables[sid]]
                for ve, bm in enumerate(self.block_managers) for sid in bm.block_tables}

    @property
    def num_free_blocks(self) -> int:
        return sum(bm.num_free_blocks for bm in self.block_managers)

    def get_stats(self) -> BlockManagerStats:
        stats = [bm.get_stats() for bm in self.block_managers]
        return BlockManagerStats(*(sum(getattr(s, f) for s in stats) for f in (
            "num_blocks", "num_free_blocks", "num_cached_blocks", "prefix_cache_queries", "prefix_cache_hits")))

    # ----- the step
    def step(self, engine: Any) -> list[Any]:
        """Fill the pipeline (one batch per idle virtual engine), then commit the oldest batch."""
        busy = {item[0] for item in self.in_flight}
        for i in range(len(self.schedulers)):
            ve = (self.next_ve + i) % len(self.schedulers)
            if ve in busy:
                continue
            start = time.perf_counter()
            out = self.schedulers[ve].schedule()
            if out.is_empty:
                continue
            tables = {s.seq.seq_id: [b + self.offset(ve) for b in self.block_managers[ve].block_tables[s.seq.seq_id]]
                      for s in out.scheduled}
            sample_seqs = engine.runner.submit(out, tables, self.offset(ve))
            self.in_flight.append((ve, out, [s.seq.is_prefill for s in out.scheduled], start, sample_seqs))
            busy.add(ve)
        if not self.in_flight:
            raise_if_stalled(self, self)
            return []
        ve, out, was_prefill, start, sample_seqs = self.in_flight.popleft()
        self.next_ve = (ve + 1) % len(self.schedulers)
        seqs, logits = engine.runner.collect(sample_seqs)
        return engine.commit(out, seqs, logits, was_prefill, start)

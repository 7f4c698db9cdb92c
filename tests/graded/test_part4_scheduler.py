"""Part 4 graded tests: continuous batching, chunked prefill, preemption.

The scheduler is driven the way the engine drives it (see :class:`FakeEngine`): after
each ``schedule()`` every scheduled sequence's ``num_computed_tokens`` advances by its
``num_new_tokens``, full blocks go to the prefix cache, and a sequence whose tokens are
all computed gets one fake sampled token, finishing at its target length. The block
manager is the real Part 2 implementation under test.

Bugs these tests guard against, each caught by at least two of them (exact schedules in
hand-made cases, and the invariants :meth:`FakeEngine.check` asserts on every step of
random workloads; ``scripts/mutation_check.py`` plants them): preempting the oldest running
sequence instead of the newest; a preempted sequence sent to the back of the queue;
chunked prefill that ignores the token budget; ``max_num_seqs`` off by one; prefix-cache
hits not counted as computed tokens, so a cached prefix is computed (and paid for) again.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servinglab.interfaces import SchedulerOutput
from servinglab.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.part(4)


class FakeEngine:
    """The engine's step loop without a model: checks invariants and fakes sampling."""

    def __init__(
        self,
        block_manager,
        scheduler,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        prefix_caching: bool = False,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        chunked: bool = True,
    ) -> None:
        self.bm = block_manager.PagedAttentionConfig(
            num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=prefix_caching
        )
        self.sched = scheduler.Scheduler(
            self.bm,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=chunked,
        )
        self.targets: dict[int, int] = {}
        self.outputs: list[SchedulerOutput] = []
        self.admission_order: list[int] = []

    def add(self, prompt: list[int] | int, max_tokens: int = 4) -> Sequence:
        """Queue a sequence; an int prompt means ``list(range(prompt))``."""
        tokens = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
        seq = Sequence(prompt_token_ids=tokens)
        self.targets[seq.seq_id] = max_tokens
        self.sched.add_sequence(seq)
        return seq

    def step(self) -> SchedulerOutput:
        before = list(self.sched.running)
        out = self.sched.schedule()
        self.check(out, before)
        self.outputs.append(out)
        for s in out.scheduled:
            seq = s.seq
            if seq.seq_id not in self.admission_order:
                self.admission_order.append(seq.seq_id)
            seq.num_computed_tokens += s.num_new_tokens
            self.bm.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens:  # prompt (or chunk run) done: sample
                seq.output_token_ids.append(1000 + len(seq.output_token_ids))
                if len(seq.output_token_ids) >= self.targets[seq.seq_id]:
                    seq.status = SequenceStatus.FINISHED_LENGTH
                    self.sched.finish_sequence(seq)
        return out

    def run(self, max_steps: int = 10_000) -> int:
        """Step until nothing is left; return the number of steps."""
        steps = 0
        while self.sched.has_unfinished():
            self.step()
            steps += 1
            assert steps <= max_steps, "scheduler did not finish the workload (livelock?)"
        return steps

    def check(self, out: SchedulerOutput, before: list[Sequence]) -> None:
        """Invariants every step must keep; ``before`` is ``running`` before the step."""
        sched, bm = self.sched, self.bm
        was_running = [any(s.seq is r for r in before) for s in out.scheduled]
        assert was_running == sorted(was_running, reverse=True), "running sequences go before waiting ones"
        if out.preempted:
            assert all(was_running), "a step that preempts admits nobody"
        for p in out.preempted:
            assert any(p is r for r in before), "only running sequences can be preempted"
            idx = next(i for i, r in enumerate(before) if r is p)
            assert all(not any(s.seq is r for s in out.scheduled) for r in before[idx:]), "preempt the newest first"
        assert out.num_batched_tokens <= sched.max_num_batched_tokens, (
            f"step schedules {out.num_batched_tokens} tokens, over max_num_batched_tokens={sched.max_num_batched_tokens}")
        assert len(out.scheduled) <= sched.max_num_seqs, f"{len(out.scheduled)} sequences scheduled, max_num_seqs={sched.max_num_seqs}"
        assert len(sched.running) <= sched.max_num_seqs, f"{len(sched.running)} running, max_num_seqs={sched.max_num_seqs}"
        ids = [s.seq.seq_id for s in out.scheduled]
        assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
        for s in out.scheduled:
            seq = s.seq
            assert s.num_new_tokens >= 1, "a sequence was scheduled with no new tokens"
            assert seq.status is SequenceStatus.RUNNING, (
                f"scheduled sequence {seq.seq_id} has status {seq.status}: admission sets seq.status = RUNNING")
            assert any(r is seq for r in sched.running), f"scheduled sequence {seq.seq_id} is not in scheduler.running"
            assert seq.num_computed_tokens >= seq.num_cached_tokens, (
                f"sequence {seq.seq_id}: {seq.num_cached_tokens} tokens came from the prefix cache but only "
                f"{seq.num_computed_tokens} count as computed: admission sets num_computed_tokens to the hit count")
            assert seq.num_computed_tokens + s.num_new_tokens <= seq.num_tokens, (
                f"sequence {seq.seq_id}: {seq.num_computed_tokens} computed + {s.num_new_tokens} new > its {seq.num_tokens} tokens")
            # The K/V slots this step writes must exist in the block table.
            assert len(bm.block_tables[seq.seq_id]) * bm.block_size >= seq.num_computed_tokens + s.num_new_tokens, (
                f"sequence {seq.seq_id} is scheduled for slots its block table does not have: call append_slots")
            if not sched.enable_chunked_prefill:
                assert s.num_new_tokens == seq.num_uncomputed_tokens, "chunked a prefill with chunking off"
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING, f"a preempted sequence gets status WAITING, got {seq.status}"
            assert seq.num_computed_tokens == 0, "preemption by recompute drops the K/V: num_computed_tokens = 0"
            assert any(w is seq for w in sched.waiting), "a preempted sequence goes back into waiting (at the front)"
            assert not any(r is seq for r in sched.running), "a preempted sequence must leave running"
            assert not bm.block_tables.get(seq.seq_id), "a preempted sequence must give back its blocks (deallocate_blocks)"

    def assert_all_free(self) -> None:
        assert self.bm.num_free_blocks == self.bm.num_blocks, (
            f"{self.bm.num_blocks - self.bm.num_free_blocks} blocks leaked after every sequence finished")
        assert self.bm.get_stats().num_used_blocks == 0, "blocks still in use after every sequence finished"
        assert not any(self.bm.block_tables.values()), "block tables left behind after every sequence finished"


def new_tokens(out: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return [(s.seq, s.num_new_tokens) for s in out.scheduled]


@pytest.mark.points(3)
def test_prefill_then_decode(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler)
    a, b, c = eng.add(5), eng.add(3), eng.add(7)
    assert (eng.sched.num_waiting, eng.sched.num_running) == (3, 0), "add_sequence queues in waiting; nothing runs yet"
    out = eng.step()
    assert new_tokens(out) == [(a, 5), (b, 3), (c, 7)], "the first step prefills every whole prompt, in arrival order"
    assert eng.sched.running == [a, b, c] and eng.sched.num_waiting == 0, "admitted sequences move to running, in order"
    assert all(s.first_scheduled_time is not None for s in (a, b, c)), (
        "admission sets seq.first_scheduled_time (time.perf_counter()) when it is None")
    assert new_tokens(eng.step()) == [(a, 1), (b, 1), (c, 1)], "after the prefill each sequence decodes 1 token per step"
    eng.run()
    assert [len(s.output_token_ids) for s in (a, b, c)] == [4, 4, 4], "every sequence reaches its 4 tokens"
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in (a, b, c))
    assert not eng.sched.has_unfinished() and eng.sched.num_running == 0, "finish_sequence removes finished sequences"
    eng.assert_all_free()


@pytest.mark.points(3)
def test_token_budget_respected_every_step(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, max_num_batched_tokens=8)
    seqs = [eng.add(10 + i, max_tokens=5) for i in range(6)]
    assert eng.step().num_batched_tokens == 8, "the first 10-token prompt alone fills the 8-token budget (chunked)"
    eng.run()  # FakeEngine.check asserts the budget on every step
    assert all(out.num_batched_tokens <= 8 for out in eng.outputs), "a step went over max_num_batched_tokens=8"
    assert all(len(s.output_token_ids) == 5 for s in seqs), "every sequence reaches its 5 tokens"
    eng.assert_all_free()


@pytest.mark.points(3)
def test_max_num_seqs_respected(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, max_num_seqs=2)
    seqs = [eng.add(3, max_tokens=2 + i) for i in range(5)]
    out = eng.step()
    assert [s for s, _ in new_tokens(out)] == seqs[:2], "max_num_seqs=2: only the first two are admitted"
    assert (eng.sched.num_running, eng.sched.num_waiting) == (2, 3), "three wait while two run"
    eng.step()  # seqs[0] reaches its 2 tokens and leaves
    out = eng.step()
    assert [s for s, _ in new_tokens(out)] == [seqs[1], seqs[2]], "the next waiting one takes the freed seat at once"
    eng.run()
    assert max(len(o.scheduled) for o in eng.outputs) == 2, "never more than max_num_seqs=2 in a step"
    assert all(len(s.output_token_ids) == 2 + i for i, s in enumerate(seqs)), "every sequence reaches its target length"
    eng.assert_all_free()


@pytest.mark.points(3)
def test_running_before_waiting(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, max_num_batched_tokens=2)
    a, b = eng.add(1, max_tokens=2), eng.add(1, max_tokens=5)
    assert new_tokens(eng.step()) == [(a, 1), (b, 1)], "two 1-token prompts fill the 2-token budget"
    c = eng.add(4, max_tokens=3)
    # The two decodes take the whole budget: the newcomer waits.
    assert new_tokens(eng.step()) == [(a, 1), (b, 1)], "running decodes are served before a waiting prompt"
    assert list(eng.sched.waiting) == [c] and a.is_finished, "c waits: the decodes took the whole budget"
    # a left; b decodes first, c gets only the leftover token.
    assert new_tokens(eng.step()) == [(b, 1), (c, 1)], "b decodes first; c gets a 1-token chunk of what is left"
    eng.run()
    assert [len(s.output_token_ids) for s in (a, b, c)] == [2, 5, 3], "every sequence reaches its target length"
    eng.assert_all_free()


@pytest.mark.points(2)
def test_fcfs_admission_no_skipping(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=4, block_size=4)
    a = eng.add(8, max_tokens=2)  # 2 blocks
    eng.step()
    big = eng.add(12, max_tokens=1)  # 3 blocks: does not fit next to a
    small = eng.add(2, max_tokens=1)  # 1 block: would fit, but must not overtake big
    assert new_tokens(eng.step()) == [(a, 1)], "big does not fit next to a, and small must not overtake it"
    assert list(eng.sched.waiting) == [big, small], "first come first served: the head blocks the queue"
    assert a.is_finished
    assert new_tokens(eng.step()) == [(big, 12), (small, 2)], "once a left, both are admitted in arrival order"
    eng.run()
    assert eng.admission_order == [a.seq_id, big.seq_id, small.seq_id], "admission must follow arrival order"
    eng.assert_all_free()


@pytest.mark.points(4)
def test_chunked_prefill_interleaves_with_decode(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, max_num_batched_tokens=4)
    a = eng.add(2, max_tokens=10)
    assert new_tokens(eng.step()) == [(a, 2)]
    b = eng.add(11, max_tokens=2)
    chunks = []
    for _ in range(4):
        out = eng.step()
        assert out.scheduled[0].seq is a and out.scheduled[0].num_new_tokens == 1, "a keeps decoding, first, every step"
        assert out.scheduled[1].seq is b, "b's prefill is chunked into the budget left after a's decode"
        chunks.append(out.scheduled[1].num_new_tokens)
        if len(chunks) < 4:
            assert b.output_token_ids == [], "no sample until the whole prompt is computed"
    assert chunks == [3, 3, 3, 2], f"11 prompt tokens in chunks of the 3 left of a 4-token budget, got {chunks}"
    assert b.num_computed_tokens == 11 and len(b.output_token_ids) == 1
    assert new_tokens(eng.step()) == [(a, 1), (b, 1)], "after its last chunk b decodes like a"
    eng.run()
    assert (len(a.output_token_ids), len(b.output_token_ids)) == (10, 2), "both reach their target lengths"
    eng.assert_all_free()


@pytest.mark.points(2)
def test_no_chunking_when_disabled(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, max_num_batched_tokens=8, chunked=False)
    a = eng.add(2, max_tokens=3)
    eng.step()
    b = eng.add(7, max_tokens=2)
    assert new_tokens(eng.step()) == [(a, 1), (b, 7)], "1 decode + a whole 7-token prompt fit the 8-token budget"
    c = eng.add(8, max_tokens=1)
    # 8 tokens never fit beside the decodes of a and b: c waits whole, it is not split.
    assert new_tokens(eng.step()) == [(a, 1), (b, 1)], "chunking off: c's 8 tokens do not fit the 6 left, so c waits"
    assert list(eng.sched.waiting) == [c], "chunking off: a prompt runs whole or waits"
    assert new_tokens(eng.step()) == [(c, 8)], "once a and b finished, c runs whole"
    eng.run()
    eng.assert_all_free()


@pytest.mark.points(4)
def test_preempts_newest_then_resumes(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=4, block_size=4)
    a, b = eng.add(7, max_tokens=4), eng.add(7, max_tokens=4)
    assert new_tokens(eng.step()) == [(a, 7), (b, 7)], "both prompts prefill: 2 blocks each, the pool is full"
    c = eng.add(2, max_tokens=2)  # no free block: c waits
    assert new_tokens(eng.step()) == [(a, 1), (b, 1)], "position 7 still fits each one's second block"
    out = eng.step()  # a needs a third block: b, the newest, gives its blocks back
    assert out.preempted == [b], "a needs a block and none is free: preempt the newest running sequence, b"
    assert new_tokens(out) == [(a, 1)], "after preempting b, a gets its block and decodes"
    assert b.status is SequenceStatus.WAITING, "a preempted sequence gets status WAITING"
    assert b.num_computed_tokens == 0, "preemption by recompute sets num_computed_tokens = 0"
    assert b.num_preemptions == 1, "_preempt must increment seq.num_preemptions"
    assert list(eng.sched.waiting) == [b, c], "a preempted sequence goes to the FRONT of waiting (appendleft)"
    assert eng.sched.running == [a], "a preempted sequence leaves running"
    assert len(b.output_token_ids) == 2, "tokens are kept; only their K/V is dropped"
    assert a.num_preemptions == 0, "only the preempted sequence's num_preemptions grows"
    eng.step()  # a finishes
    assert a.is_finished
    out = eng.step()  # b is recomputed: prompt and generated tokens in one go
    assert new_tokens(out) == [(b, 9), (c, 2)], "b is readmitted first and recomputes prompt + generated tokens (7 + 2)"
    eng.run()
    assert [len(s.output_token_ids) for s in (a, b, c)] == [4, 4, 2], "every sequence reaches its target length"
    assert b.status is SequenceStatus.FINISHED_LENGTH
    eng.assert_all_free()


@pytest.mark.points(1)
def test_preempts_itself_when_newest(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=3, block_size=4)
    a, b = eng.add(5, max_tokens=3), eng.add(4, max_tokens=2)  # 2 + 1 blocks: full
    eng.step()
    out = eng.step()  # b, the newest, needs a second block: it preempts itself
    assert new_tokens(out) == [(a, 1)], "b, the newest, cannot grow: it preempts itself and only a runs"
    assert out.preempted == [b] and list(eng.sched.waiting) == [b], "b is preempted and queued in waiting"
    assert b.num_preemptions == 1 and a.num_preemptions == 0, "_preempt must increment seq.num_preemptions (b's only)"
    eng.run()
    assert (len(a.output_token_ids), len(b.output_token_ids)) == (3, 2), "both reach their target lengths"
    eng.assert_all_free()


@pytest.mark.points(2)
def test_prefix_cache_hits_set_num_computed_tokens(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=16, block_size=4, prefix_caching=True)
    prompt = list(range(100, 110))
    a = eng.add(prompt, max_tokens=2)
    eng.run()
    assert a.num_cached_tokens == 0, "nothing was cached before a: num_cached_tokens = allocate_blocks(...) = 0"
    b = eng.add(prompt[:8] + [7, 8, 9], max_tokens=2)  # shares a's two full blocks
    out = eng.step()
    assert new_tokens(out) == [(b, 3)], "only the uncached tail (3 tokens) is computed"
    assert b.num_cached_tokens == 8, "admission sets num_cached_tokens to allocate_blocks' hit count"
    assert b.num_computed_tokens == 11, "num_computed_tokens starts at the hit count (8), + 3 this step"
    eng.run()
    assert len(b.output_token_ids) == 2
    eng.assert_all_free()


@pytest.mark.points(2)
def test_cached_prefix_costs_no_budget(block_manager, scheduler):
    # Budget 4 tokens a step, blocks of 4. a (8 tokens) prefills in two chunks of 4 and caches two blocks.
    # b = a's 8 tokens + 1 new: 8 are hits, so b costs 1 token of the budget and c (3 tokens) fits beside it.
    eng = FakeEngine(block_manager, scheduler, num_blocks=16, block_size=4, prefix_caching=True, max_num_batched_tokens=4)
    a = eng.add(list(range(100, 108)), max_tokens=1)
    assert new_tokens(eng.step()) == [(a, 4)] and new_tokens(eng.step()) == [(a, 4)]
    assert a.is_finished
    b = eng.add(list(range(100, 108)) + [7], max_tokens=1)
    c = eng.add([50, 51, 52], max_tokens=1)
    assert new_tokens(eng.step()) == [(b, 1), (c, 3)], "b's 8 cached tokens are not computed again: 1 + 3 = 4 tokens this step"
    eng.run()
    eng.assert_all_free()


@pytest.mark.points(2)
def test_fork_sequence_shares_blocks(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=16, block_size=4)
    a = eng.add(6, max_tokens=3)
    d = eng.add(3, max_tokens=3)
    eng.step()
    child = Sequence(prompt_token_ids=list(a.prompt_token_ids), output_token_ids=list(a.output_token_ids))
    eng.targets[child.seq_id] = 3
    eng.sched.fork_sequence(a, child)
    assert eng.sched.running == [a, child, d], "the child is inserted in running right after its parent"
    assert child.status is SequenceStatus.RUNNING, "fork_sequence sets the child's status to RUNNING"
    assert child.num_computed_tokens == a.num_computed_tokens == 6, "the child starts with the parent's num_computed_tokens"
    assert eng.bm.block_tables[child.seq_id] == eng.bm.block_tables[a.seq_id], "the child shares the parent's blocks (fork)"
    out = eng.step()
    assert new_tokens(out) == [(a, 1), (child, 1), (d, 1)], "parent, child, then d decode"
    # Position 6 lies in a's shared second block: writing it needs a copy-on-write.
    assert len(out.block_copies) >= 1, "writing into a shared block needs a copy: collect append_slots' copies"
    assert eng.bm.block_tables[child.seq_id][1] != eng.bm.block_tables[a.seq_id][1], "copy-on-write split the shared block"
    eng.run()
    assert len(child.output_token_ids) == 3 and child.is_finished
    eng.assert_all_free()


@pytest.mark.points(2)
def test_finish_and_abort_free_blocks(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=8, block_size=4, max_num_seqs=1)
    a, b = eng.add(6), eng.add(3)
    eng.step()
    assert eng.bm.num_free_blocks == 6 and list(eng.sched.waiting) == [b], "max_num_seqs=1: a runs (2 blocks), b waits"
    with pytest.raises(ValueError):
        eng.sched.finish_sequence(a)  # still RUNNING: the engine sets a finished status first
    eng.sched.abort_sequence(a)
    assert a.status is SequenceStatus.FINISHED_ABORTED
    assert eng.sched.running == [] and eng.bm.num_free_blocks == 8, "finish_sequence removes it from running, frees its blocks"
    eng.sched.abort_sequence(a)  # idempotent
    eng.sched.finish_sequence(a)
    assert eng.bm.num_free_blocks == 8, "finishing twice must not free anything twice"
    b.status = SequenceStatus.FINISHED_STOPPED  # finishing a waiting sequence just drops it
    eng.sched.finish_sequence(b)
    assert b.status is SequenceStatus.FINISHED_STOPPED, "finish_sequence keeps the status the engine set"
    assert not eng.sched.has_unfinished() and eng.sched.schedule().is_empty, "a finished waiting sequence leaves waiting"
    eng.assert_all_free()


@pytest.mark.points(1)
def test_rejects_what_can_never_fit(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=7, block_size=4)
    with pytest.raises(ValueError) as err:
        eng.add(37)  # needs 10 blocks, the pool has 7
    assert re.search(r"\b10\b", str(err.value)) and re.search(r"\b7\b", str(err.value)), "name both block counts"
    assert eng.sched.num_waiting == 0, "a refused sequence must not be queued"
    eng.add(28)  # exactly the pool: fine
    with pytest.raises(ValueError):
        eng.add([])
    eng = FakeEngine(block_manager, scheduler, max_num_batched_tokens=8, chunked=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        eng.add(9)  # without chunking a 9-token prompt never fits an 8-token step
    with pytest.raises(ValueError, match="max_num_seqs"):
        scheduler.Scheduler(eng.bm, max_num_seqs=0)


@pytest.mark.points(1)
def test_sequence_outgrowing_the_pool_raises(block_manager, scheduler):
    eng = FakeEngine(block_manager, scheduler, num_blocks=2, block_size=4)
    eng.add(7, max_tokens=10)  # the prompt fits, its output cannot: an error, not a hang
    with pytest.raises(RuntimeError):
        eng.run(max_steps=100)


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    num_blocks = draw(st.integers(1, 16))
    chunked = draw(st.booleans())
    budget = draw(st.integers(1, 48))
    # Every sequence must fit alone: its K/V (prompt + max_tokens - 1, the last sample is
    # never computed) in the pool and, without chunking, in one step's budget.
    limit = num_blocks * block_size if chunked else min(num_blocks * block_size, budget)
    n = draw(st.integers(1, 8))
    seqs = []
    for _ in range(n):
        prompt_len = draw(st.integers(1, limit))
        # A tiny vocabulary, so prompts share prefixes and the prefix cache gets hits.
        prompt = draw(st.lists(st.integers(0, 2), min_size=prompt_len, max_size=prompt_len))
        max_tokens = draw(st.integers(1, min(limit - prompt_len + 1, 12)))
        arrival = draw(st.integers(0, 6))
        seqs.append((arrival, prompt, max_tokens))
    return dict(
        block_size=block_size,
        num_blocks=num_blocks,
        chunked=chunked,
        max_num_batched_tokens=budget,
        max_num_seqs=draw(st.integers(1, 6)),
        prefix_caching=draw(st.booleans()),
        seqs=sorted(seqs, key=lambda s: s[0]),
    )


@pytest.mark.points(4)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(workload=workloads())
def test_random_workloads_finish_cleanly(block_manager, scheduler, workload):
    wl = dict(workload)
    pending = list(wl.pop("seqs"))
    eng = FakeEngine(block_manager, scheduler, **wl)
    added: list[Sequence] = []
    step = 0
    while pending or eng.sched.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, max_tokens = pending.pop(0)
            added.append(eng.add(prompt, max_tokens=max_tokens))
        out = eng.step()  # FakeEngine.check: budget, max_num_seqs, slots, no empty entries
        assert out.scheduled or out.preempted or not eng.sched.has_unfinished(), "a step made no progress"
        step += 1
        assert step <= 5_000, "scheduler did not finish the workload (livelock?)"
    for seq in added:
        assert seq.status is SequenceStatus.FINISHED_LENGTH, f"sequence {seq.seq_id} never finished"
        assert len(seq.output_token_ids) == eng.targets[seq.seq_id], f"sequence {seq.seq_id} has the wrong number of tokens"
    assert eng.admission_order == [s.seq_id for s in added], "first come, first served: admission must follow arrival"
    eng.assert_all_free()

"""Graded tests for swap preemption: Part 2's ``swap_out`` / ``swap_in`` and Part 4's choice.

The block-manager tests keep a *shadow* of the KV contents: a dict from device slot to
what was written there, and one from host slot. Applying the returned ``(src, dst)``
block pairs the way the runner does (swap-outs first, then swap-ins, then
copy-on-write) must give every sequence back exactly its own contents, and no block
may leak on either side. The scheduler and engine tests check that ``preemption_mode
="swap"`` recomputes nothing, falls back to recompute (counted) when the host pool is
full, and produces the same greedy float32 tokens as a run that never preempts.

Plausible bugs these tests guard against (each fails at least two of them): swap_out
that keeps the device blocks referenced, free_swapped that leaks the host blocks, a host
capacity check off by one, swap_in that copies blocks still cached on the device; in
the scheduler (Part 4): a swapped sequence that loses its computed tokens or goes to the
back of the swapped queue, a host-full fallback not counted apart.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from servinglab.sequence import Sequence, SequenceStatus

BS = 4


def make(bm: ModuleType, num_blocks: int = 8, host: int = 8, caching: bool = False):
    return bm.PagedAttentionConfig(num_blocks=num_blocks, block_size=BS, enable_prefix_caching=caching, num_host_blocks=host)


class Shadow:
    """What each device and host slot holds; applies block pairs as the runner does."""

    def __init__(self) -> None:
        self.device: dict[int, object] = {}
        self.host: dict[int, object] = {}

    @staticmethod
    def _copy(src_mem: dict, dst_mem: dict, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            for j in range(BS):
                dst_mem[dst * BS + j] = src_mem.get(src * BS + j)

    def swap_out(self, pairs):
        self._copy(self.device, self.host, pairs)

    def swap_in(self, pairs):
        self._copy(self.host, self.device, pairs)

    def cow(self, pairs):
        self._copy(self.device, self.device, list(pairs))

    def write(self, m, seq_id: int, tokens: list[int], start: int, end: int) -> None:
        for p in range(start, end):
            self.device[m.get_slot(seq_id, p)] = (seq_id, tuple(tokens[: p + 1]))

    def read(self, m, seq_id: int, n: int) -> list:
        return [self.device.get(m.get_slot(seq_id, p)) for p in range(n)]


def fill(m, shadow: Shadow, seq_id: int, tokens: list[int]) -> None:
    cached = m.allocate_blocks(seq_id, tokens)
    shadow.cow(m.append_slots(seq_id, cached, len(tokens) - cached))
    shadow.write(m, seq_id, tokens, cached, len(tokens))
    m.cache_blocks(seq_id, tokens, len(tokens))


@pytest.mark.part(2)
@pytest.mark.points(2)
def test_swap_round_trip_keeps_contents_and_leaks_nothing(block_manager: ModuleType) -> None:
    m, sh = make(block_manager, num_blocks=8, host=6), Shadow()
    a, b = list(range(10)), list(range(50, 57))  # 3 and 2 blocks
    fill(m, sh, 1, a)
    fill(m, sh, 2, b)
    want = sh.read(m, 1, len(a))
    assert m.can_swap_out(1)
    pairs = m.swap_out(1)
    assert len(pairs) == 3 and [d for d, _ in pairs] == [0, 1, 2], "one (device, host) pair per block, in table order"
    sh.swap_out(pairs)
    assert 1 not in m.block_tables and m.num_free_blocks == 6 and m.num_free_host_blocks == 3, (
        "swap_out frees the device blocks and takes as many host blocks")
    fill(m, sh, 3, list(range(100, 124)))  # takes every free block, the freed ones too: overwrites them in the shadow
    assert m.can_swap_in(1, len(a)) is False, "3 free device blocks are needed, 0 are free"
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.swap_in(1)
    assert m.num_free_host_blocks == 3 and 1 not in m.block_tables, "a failed swap_in changes nothing"
    m.deallocate_blocks(3)
    assert m.can_swap_in(1, len(a)) and not m.can_swap_in(1, 6 * BS + 1), "can_swap_in counts growth past the table"
    back = m.swap_in(1)
    sh.swap_in(back)
    assert len(back) == 3 and all(0 <= h < 6 for h, _ in back), "(host, device) pairs for the blocks to copy back"
    assert sh.read(m, 1, len(a)) == want, "after the round trip the sequence must read back its own K/V"
    assert m.num_free_host_blocks == 6, "swap_in returns the host blocks"
    # The sequence keeps growing where it stopped.
    sh.cow(m.append_slots(1, len(a), 3))
    assert len(m.block_tables[1]) == 4
    for sid in (1, 2):
        m.deallocate_blocks(sid)
    assert m.num_free_blocks == 8 and m.num_free_host_blocks == 6 and not m.block_tables, "no block leaked on either side"


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_host_pool_capacity_by_hand(block_manager: ModuleType) -> None:
    """A host pool of 3 blocks: a 3-block table fits exactly; then not even one block more does."""
    m, sh = make(block_manager, num_blocks=8, host=3), Shadow()
    fill(m, sh, 1, list(range(12)))  # exactly 3 blocks
    fill(m, sh, 2, list(range(20, 23)))  # 1 block
    assert m.can_swap_out(1), "3 blocks into 3 free host blocks fit"
    assert len(m.swap_out(1)) == 3 and m.num_free_host_blocks == 0
    assert not m.can_swap_out(2), "no host block is free"
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.swap_out(2)
    assert m.block_tables[2] == [3] and m.num_free_blocks == 7, "a refused swap_out leaves the table and the pool alone"


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_swap_in_revives_its_own_cached_blocks(block_manager: ModuleType) -> None:
    """Swapped out and straight back in: the 2 full blocks are still cached on the device, only the partial one is copied."""
    m, sh = make(block_manager, num_blocks=8, host=4, caching=True), Shadow()
    prompt = list(range(9))  # blocks 0, 1 full (published), block 2 holds one token
    fill(m, sh, 1, prompt)
    want = sh.read(m, 1, len(prompt))
    sh.swap_out(m.swap_out(1))
    assert m.num_free_blocks == 8, "the swapped sequence's device blocks are free (the full ones keep their hashes)"
    assert m.can_swap_in(1, len(prompt))
    back = m.swap_in(1)
    sh.swap_in(back)
    assert len(back) == 1, f"copy only the block that is not cached on the device, got pairs {back}"
    assert m.block_tables[1][:2] == [0, 1] and m.num_free_blocks == 5 and m.num_free_host_blocks == 4
    assert sh.read(m, 1, len(prompt)) == want


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_swap_respects_shared_blocks_prefix_cache_and_a_full_host(block_manager: ModuleType) -> None:
    m, sh = make(block_manager, num_blocks=10, host=4, caching=True), Shadow()
    prompt = list(range(9))  # 3 blocks, 2 of them full
    fill(m, sh, 1, prompt)
    m.fork(1, 2)
    want = sh.read(m, 1, len(prompt))
    free = m.num_free_blocks
    sh.swap_out(m.swap_out(2))
    assert m.block_tables[1] == [0, 1, 2] and all(m.ref_count(b) == 1 for b in (0, 1, 2)), (
        "a shared block only loses the swapped sequence's reference; its other holders keep it")
    assert m.num_free_blocks == free, "no device block was freed: the parent still holds them all"
    back = m.swap_in(2)
    sh.swap_in(back)
    assert len(back) == 1, "the two full blocks are still cached on the device: revive them, copy only the last block"
    assert m.block_tables[2][:2] == [0, 1] and m.ref_count(0) == 2
    assert sh.read(m, 2, len(prompt)) == want
    # A host pool too small for the table: refused, nothing changed.
    fill(m, sh, 3, list(range(40, 60)))  # 5 blocks, the host has 4
    assert not m.can_swap_out(3)
    tables = {s: list(t) for s, t in m.block_tables.items()}
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.swap_out(3)
    assert m.block_tables == tables and m.num_free_host_blocks == 4, "a failed swap_out changes nothing"
    # A swapped sequence that finishes gives its host blocks back.
    m.swap_out(1)
    assert m.num_free_host_blocks == 1 and m.is_swapped(1)
    m.free_swapped(1)
    assert m.num_free_host_blocks == 4 and not m.is_swapped(1)
    for sid in (2, 3):
        m.deallocate_blocks(sid)
    assert m.num_free_blocks == 10


def _swap_machine(bm: ModuleType, caching: bool) -> type[RuleBasedStateMachine]:
    """Random allocate / step / fork / swap out / swap in / free against a shadow KV cache."""

    class SwapMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.m = make(bm, num_blocks=10, host=6, caching=caching)
            self.sh = Shadow()
            self.tokens: dict[int, list[int]] = {}
            self.computed: dict[int, int] = {}
            self.swapped: set[int] = set()
            self.next_id = 0

        def _pick(self, i: int, swapped: bool) -> int | None:
            ids = sorted(s for s in self.tokens if (s in self.swapped) == swapped)
            return ids[i % len(ids)] if ids else None

        @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14))
        def allocate(self, prompt: list[int]) -> None:
            if not self.m.can_allocate(prompt):
                return
            sid, self.next_id = self.next_id, self.next_id + 1
            self.computed[sid] = self.m.allocate_blocks(sid, prompt)
            self.tokens[sid] = list(prompt)

        @rule(i=st.integers(0, 99), chunk=st.integers(1, 6), tok=st.integers(0, 2))
        def step(self, i: int, chunk: int, tok: int) -> None:
            sid = self._pick(i, False)
            if sid is None:
                return
            toks, done = self.tokens[sid], self.computed[sid]
            if done == len(toks):
                toks.append(tok)
            n = min(chunk, len(toks) - done)
            if not self.m.can_append_slots(sid, done + n):
                return
            self.sh.cow(self.m.append_slots(sid, done, n))
            for p in range(done, done + n):
                self.sh.device[self.m.get_slot(sid, p)] = tuple(toks[: p + 1])
            self.computed[sid] = done + n
            self.m.cache_blocks(sid, toks, done + n)

        @rule(i=st.integers(0, 99))
        def fork(self, i: int) -> None:
            parent = self._pick(i, False)
            if parent is None:
                return
            child, self.next_id = self.next_id, self.next_id + 1
            self.m.fork(parent, child)
            self.tokens[child], self.computed[child] = list(self.tokens[parent]), self.computed[parent]

        @rule(i=st.integers(0, 99))
        def swap_out(self, i: int) -> None:
            sid = self._pick(i, False)
            if sid is None:
                return
            if not self.m.can_swap_out(sid):
                with pytest.raises(bm.NoFreeBlocksError):
                    self.m.swap_out(sid)
                return
            self.sh.swap_out(self.m.swap_out(sid))
            self.swapped.add(sid)

        @rule(i=st.integers(0, 99))
        def swap_in(self, i: int) -> None:
            sid = self._pick(i, True)
            if sid is None or not self.m.can_swap_in(sid, self.computed[sid]):
                return
            self.sh.swap_in(self.m.swap_in(sid))
            self.swapped.discard(sid)

        @precondition(lambda self: self.tokens)
        @rule(i=st.integers(0, 99))
        def free(self, i: int) -> None:
            sid = sorted(self.tokens)[i % len(self.tokens)]
            if sid in self.swapped:
                self.m.free_swapped(sid)
                self.swapped.discard(sid)
            else:
                self.m.deallocate_blocks(sid)
            del self.tokens[sid], self.computed[sid]

        @invariant()
        def books_balance(self) -> None:
            live = set(self.tokens) - self.swapped
            assert set(self.m.block_tables) == live, "block_tables holds exactly the sequences on the device"
            holders: dict[int, int] = {}
            for table in self.m.block_tables.values():
                for b in table:
                    holders[b] = holders.get(b, 0) + 1
            assert all(self.m.ref_count(b) == holders.get(b, 0) for b in range(10)), "ref counts match the tables"
            assert self.m.num_free_blocks + len(holders) == 10, "every device block is free or held"
            host_used = [h for s in self.swapped for h in self.m.host_tables[s]]
            assert len(host_used) == len(set(host_used)), "a host block belongs to one swapped sequence"
            assert self.m.num_free_host_blocks + len(host_used) == 6, "every host block is free or held"

        @invariant()
        def contents_read_back(self) -> None:
            for sid in set(self.tokens) - self.swapped:
                for p in range(self.computed[sid]):
                    assert self.sh.device.get(self.m.get_slot(sid, p)) == tuple(self.tokens[sid][: p + 1]), (sid, p)

    return SwapMachine


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_random_workloads_with_swap(block_manager: ModuleType) -> None:
    for caching in (False, True):
        run_state_machine_as_test(_swap_machine(block_manager, caching), settings=settings(stateful_step_count=40, max_examples=40))


# ----- Part 4: the scheduler's choice -----


def drive(block_manager, scheduler, mode: str, host: int, prompts: list[int], max_tokens: int = 6, **kwargs):
    """Run a workload on 12 blocks of 4 tokens; return (scheduler, tokens computed, outputs, outs).

    Checked at every step: the token budget, ``max_num_seqs``, the swapped queue in arrival
    order (oldest at the front, the next to resume), and a resumed sequence's computed
    tokens the ones it had when it was swapped out.
    """
    bm = make(block_manager, num_blocks=12, host=host)
    sched = scheduler.Scheduler(bm, max_num_batched_tokens=16, preemption_mode=mode, **kwargs)
    seqs = [Sequence(prompt_token_ids=list(range(i * 100, i * 100 + n))) for i, n in enumerate(prompts)]
    arrival = {s.seq_id: i for i, s in enumerate(seqs)}
    for s in seqs:
        sched.add_sequence(s)
    computed, outs, kept = 0, [], {}
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        outs.append(out)
        assert sum(item.num_new_tokens for item in out.scheduled) <= 16, "a step went over max_num_batched_tokens"
        assert len(sched.running) <= sched.max_num_seqs
        order = [arrival[s.seq_id] for s in sched.swapped]
        assert order == sorted(order), f"swapped queue out of arrival order: {order} (the oldest resumes first)"
        for seq in out.preempted:
            if seq.status is SequenceStatus.SWAPPED:
                assert seq in sched.swapped and seq.seq_id not in bm.block_tables and seq.num_computed_tokens > 0
                kept[seq.seq_id] = seq.num_computed_tokens
        for item in out.scheduled:
            seq = item.seq
            if seq.seq_id in kept and not bm.is_swapped(seq.seq_id):
                assert seq.num_computed_tokens == kept.pop(seq.seq_id), "a swapped-in sequence keeps the tokens it had computed"
            assert seq.status is SequenceStatus.RUNNING and seq in sched.running, "a resumed sequence runs (status RUNNING)"
            computed += item.num_new_tokens
            seq.num_computed_tokens += item.num_new_tokens
            assert len(bm.block_tables[seq.seq_id]) * BS >= seq.num_computed_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(7)
                if len(seq.output_token_ids) == max_tokens:
                    seq.status = SequenceStatus.FINISHED_LENGTH
                    sched.finish_sequence(seq)
    assert not sched.has_unfinished(), "the workload did not finish"
    assert bm.num_free_blocks == 12 and bm.num_free_host_blocks == host, "blocks leaked on the device or the host"
    return sched, computed, seqs, outs


@pytest.mark.part(4)
@pytest.mark.points(1)
def test_scheduler_swaps_instead_of_recomputing(block_manager, scheduler) -> None:
    prompts = [9, 10, 11, 12]  # with 8 outputs each: 74 tokens, 19+ blocks wanted, 12 exist (two swapped out at once)
    minimum = sum(n + 8 - 1 for n in prompts)  # every prompt token and every output but the last, once
    rec, rec_tokens, _, _ = drive(block_manager, scheduler, "recompute", 0, prompts, max_tokens=8)
    assert rec.preemption_counts["recompute"] > 0 and rec_tokens > minimum, "the workload must force recompute preemption"
    swap, swap_tokens, _, outs = drive(block_manager, scheduler, "swap", 12, prompts, max_tokens=8)
    assert swap.preemption_counts["swap"] > 0 and swap.preemption_counts["recompute"] == 0
    assert swap_tokens == minimum, f"swap mode recomputes nothing: {swap_tokens} tokens computed, {minimum} needed"
    assert sum(len(o.blocks_to_swap_out) for o in outs) == sum(len(o.blocks_to_swap_in) for o in outs) > 0


@pytest.mark.part(4)
@pytest.mark.points(2)
def test_several_swapped_sequences_resume_oldest_first(block_manager, scheduler) -> None:
    """Six prompts, up to six running: four swaps, several sequences out at once, resumed in arrival order."""
    prompts = [5, 6, 7, 8, 9, 10]
    sched, tokens, _, outs = drive(block_manager, scheduler, "swap", 12, prompts, max_tokens=12, max_num_seqs=6)
    assert sched.preemption_counts["swap"] >= 4 and sched.preemption_counts["recompute"] == 0
    assert tokens == sum(n + 12 - 1 for n in prompts), "swap mode recomputes nothing"


@pytest.mark.part(4)
@pytest.mark.points(1)
def test_a_full_host_pool_falls_back_to_recompute(block_manager, scheduler) -> None:
    full, full_tokens, _, _ = drive(block_manager, scheduler, "swap", 1, [9, 10, 11, 12])  # a 1-block host pool
    assert full.preemption_counts["recompute_swap_space_full"] > 0 and full.preemption_counts["swap"] == 0, (
        "a preempted sequence that does not fit the host pool is recomputed, and counted")
    assert full.preemption_counts["recompute"] == 0, "in swap mode a fallback counts as recompute_swap_space_full"
    with pytest.raises(ValueError, match="preemption_mode"):
        scheduler.Scheduler(make(block_manager), preemption_mode="swapp")


@pytest.mark.part(4)
@pytest.mark.points(2)
def test_swap_gives_the_tokens_of_a_run_that_never_preempts() -> None:
    from servinglab import LLM, SamplingParams
    from servinglab.model.weights import random_model, tiny_llama_config

    config = tiny_llama_config()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 9, 17, 30, 44, 5)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(**kwargs):
        llm = LLM(model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config, dtype="float32",
                  block_size=4, max_num_batched_tokens=16, max_model_len=64, **kwargs)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        return llm.engine, [o.outputs[0].token_ids for o in outs]

    _, want = run(num_kv_blocks=200)
    # A host pool of 8 blocks of 2 KiB: one preempted sequence fits it, the other is recomputed.
    engine, got = run(num_kv_blocks=20, preemption_mode="swap", swap_space=8 * 2048 / 2**30, enable_prefix_caching=False)
    counts = engine.scheduler.preemption_counts
    assert counts["swap"] > 0 and counts["recompute_swap_space_full"] > 0, f"expected a swap and a fallback, got {dict(counts)}"
    assert engine.runner.num_swapped_blocks > 0
    assert got == want, "swapped-out sequences must resume with their own K/V"
    assert engine.block_manager.num_free_host_blocks == engine.num_host_blocks
    with pytest.raises(ValueError, match="preemption_mode"):
        run(num_kv_blocks=20, preemption_mode="copy")
    with pytest.raises(ValueError, match="swap_space"):
        run(num_kv_blocks=20, preemption_mode="swap", swap_space=-1)

"""Part 2 graded tests: the paged KV-cache block manager.

The ``block_manager`` fixture is the module under test (``solutions.block_manager`` or
``exercises.block_manager``, chosen by ``pytest --impl``). Block ids follow from the
free queue's order: a fresh manager hands out 0, 1, 2, ... and a freed block goes to the
back of the queue (least recently freed is reused first), as in vLLM v1's block pool.
Sharing, copy-on-write and prefix caching follow Kwon et al., SOSP 2023 (section 4.4).

Bugs these tests guard against, each caught by at least two of them (exact block ids in
hand-made cases, and random workloads checked against the invariants;
``scripts/mutation_check.py`` plants them): a block hash that does not chain its parent's;
a free queue that hands out the most recently freed block first; the prompt's last token
cached, so a whole prompt can be a hit; copy-on-write that keeps its reference to the
shared block; a deallocation that frees head blocks first, so eviction takes the wrong
end of a sequence.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from servinglab.interfaces import BlockManager as BlockManagerProtocol

BS = 4  # a small block size keeps the block arithmetic readable


def make(bm: ModuleType, num_blocks: int = 8, caching: bool = False):
    return bm.PagedAttentionConfig(num_blocks=num_blocks, block_size=BS, enable_prefix_caching=caching)


def prefill(m, seq_id: int, tokens: list[int]) -> int:
    """Allocate, 'compute' the rest of the prompt in one step, publish it; return the cached count."""
    cached = m.allocate_blocks(seq_id, tokens)
    assert m.append_slots(seq_id, cached, len(tokens) - cached) == []
    m.cache_blocks(seq_id, tokens, len(tokens))
    return cached


# ----- allocation, slots, deallocation -----


@pytest.mark.part(2)
@pytest.mark.points(3)
def test_allocate_gives_ceil_blocks_in_free_order(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=8)
    assert isinstance(m, BlockManagerProtocol), "the runtime's contract"
    assert m.num_free_blocks == 8, "a new manager has every block free"
    assert m.allocate_blocks(1, list(range(10))) == 0, "no prefix caching: nothing cached"
    assert m.block_tables[1] == [0, 1, 2], "ceil(10 / 4) = 3 blocks"
    assert m.allocate_blocks(2, list(range(8))) == 0
    assert m.block_tables[2] == [3, 4], "exactly 2 full blocks, no spare"
    assert m.allocate_blocks(3, [7]) == 0
    assert m.block_tables[3] == [5], "a 1-token prompt needs one block: the next free one, 5"
    assert m.num_free_blocks == 2, "3 + 2 + 1 blocks allocated out of 8"
    assert [m.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 1, 0, 0]


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_slot_arithmetic(block_manager: ModuleType) -> None:
    m = make(block_manager)
    m.allocate_blocks(1, [0, 0])  # block 0
    m.allocate_blocks(2, list(range(6)))  # blocks 1, 2
    # slot = block_tables[s][p // block_size] * block_size + p % block_size
    assert [m.get_slot(2, p) for p in range(6)] == [4, 5, 6, 7, 8, 9]
    assert m.get_slot(1, 1) == 1
    assert m.get_slot(2, 7) == 11, "reserved, not yet written: still a valid slot"
    with pytest.raises(ValueError, match="position"):
        m.get_slot(2, 8)


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_append_slots_grows_across_block_boundary(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=6)
    m.allocate_blocks(1, [1, 2, 3, 4])
    assert m.append_slots(1, 0, 4) == [], "prefill fits the one block"
    assert m.block_tables[1] == [0], "a 4-token prefill fits block 0 (block_size 4)"
    assert m.can_append_slots(1, 5)
    assert m.append_slots(1, 4, 1) == [], "position 4 opens block 1"
    assert m.block_tables[1] == [0, 1]
    assert m.append_slots(1, 5, 1) == [], "position 5 still fits block 1"
    assert m.block_tables[1] == [0, 1]
    assert m.append_slots(1, 6, 7) == [], "positions 6..12 need blocks 2 and 3"
    assert m.block_tables[1] == [0, 1, 2, 3]
    assert m.num_free_blocks == 2, "4 of 6 blocks hold positions 0..12"
    assert m.can_append_slots(1, 24) and not m.can_append_slots(1, 25)


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_deallocate_returns_blocks(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=6)
    m.allocate_blocks(1, list(range(9)))  # 0, 1, 2
    m.allocate_blocks(2, list(range(5)))  # 3, 4
    m.deallocate_blocks(1)
    assert m.num_free_blocks == 4, "freeing seq 1 returns its 3 blocks: 1 + 3 free"
    assert 1 not in m.block_tables, "a freed sequence leaves block_tables"
    assert [m.ref_count(b) for b in range(6)] == [0, 0, 0, 1, 1, 0]
    # Least recently freed first: block 5 (never used), then 1's blocks tail first.
    m.allocate_blocks(3, list(range(13)))
    assert m.block_tables[3] == [5, 2, 1, 0]
    m.deallocate_blocks(2)
    m.deallocate_blocks(3)
    assert m.num_free_blocks == 6, "every block is free again after both sequences are freed"
    with pytest.raises(KeyError, match="2"):
        m.deallocate_blocks(2)  # twice is an error, never a silent double free


@pytest.mark.part(2)
@pytest.mark.points(3)
def test_out_of_blocks(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=3)
    assert issubclass(block_manager.NoFreeBlocksError, RuntimeError)
    assert m.can_allocate(list(range(12))), "12 tokens fit exactly in 3 blocks of 4"
    assert not m.can_allocate(list(range(13))), "13 tokens need a 4th block: can_allocate must say no"
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.allocate_blocks(1, list(range(13)))
    assert m.block_tables == {} and m.num_free_blocks == 3, "a failed call changes nothing"
    m.allocate_blocks(1, list(range(8)))
    assert not m.can_append_slots(1, 13)
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.append_slots(1, 8, 5)
    assert m.block_tables[1] == [0, 1] and m.num_free_blocks == 1
    assert m.append_slots(1, 8, 4) == [] and m.num_free_blocks == 0


# ----- sharing and copy-on-write -----


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_fork_shares_every_block(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=4)
    m.allocate_blocks(1, list(range(6)))
    m.append_slots(1, 0, 6)
    m.fork(1, 2)
    assert m.block_tables[2] == m.block_tables[1] == [0, 1]
    assert m.block_tables[2] is not m.block_tables[1], "same blocks, separate tables"
    assert m.ref_count(0) == m.ref_count(1) == 2, "fork shares the parent's blocks: each is referenced twice"
    assert m.num_free_blocks == 2, "nothing was copied"
    m.deallocate_blocks(1)
    assert m.ref_count(0) == m.ref_count(1) == 1 and m.num_free_blocks == 2, "seq 2 still holds both blocks after seq 1 is freed"
    m.deallocate_blocks(2)
    assert m.num_free_blocks == 4, "the last holder freed: every block is free again"


@pytest.mark.part(2)
@pytest.mark.points(4)
def test_copy_on_write(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=3)
    m.allocate_blocks(1, list(range(6)))  # [0, 1]; block 1 is half full
    m.append_slots(1, 0, 6)
    m.fork(1, 2)
    assert m.can_append_slots(2, 7), "one copy needed, one block free"
    # The child writes position 6, inside shared block 1: copy it, keep full block 0 shared.
    assert m.append_slots(2, 6, 1) == [(1, 2)]
    assert m.block_tables[2] == [0, 2]
    assert (m.ref_count(0), m.ref_count(1), m.ref_count(2)) == (2, 1, 1)
    # The parent now holds block 1 alone: it writes in place, no copy.
    assert m.append_slots(1, 6, 1) == []
    assert m.block_tables[1] == [0, 1] and m.num_free_blocks == 0

    m = make(block_manager, num_blocks=2)
    m.allocate_blocks(1, list(range(6)))
    m.append_slots(1, 0, 6)
    m.fork(1, 2)
    assert not m.can_append_slots(2, 7), "the copy needs a block and none is free"
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.append_slots(2, 6, 1)
    assert m.block_tables[2] == [0, 1] and m.ref_count(1) == 2

    m = make(block_manager, num_blocks=4)
    m.allocate_blocks(1, list(range(8)))  # nothing computed yet
    m.fork(1, 2)
    assert m.append_slots(2, 0, 8) == [(0, 2), (1, 3)], "every written shared block is copied"
    assert m.block_tables[2] == [2, 3] and m.ref_count(0) == m.ref_count(1) == 1

    m = make(block_manager, num_blocks=3)
    m.allocate_blocks(1, list(range(9)))  # [0, 1, 2]
    m.append_slots(1, 0, 9)
    m.trim_blocks(1, 7)  # rollback: position 7 (inside block 1) is the next write again
    m.allocate_blocks(2, [0])  # takes the freed block 2: nothing free now
    m.fork(1, 3)
    assert not m.can_append_slots(3, 8), "writing position 7 means copying shared block 1"
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.append_slots(3, 7, 1)


# ----- prefix caching -----


@pytest.mark.part(2)
@pytest.mark.points(3)
def test_prefix_cache_shares_full_blocks(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=8, caching=True)
    a = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert prefill(m, 1, a) == 0
    assert m.block_tables[1] == [0, 1, 2]
    b = a[:8] + [99, 98, 97]  # shares two full blocks with a
    assert m.can_allocate(b), "b shares two cached blocks and needs one fresh: it fits"
    assert m.allocate_blocks(2, b) == 8
    assert m.block_tables[2][:2] == [0, 1] and m.block_tables[2][2] not in (0, 1, 2)
    assert m.ref_count(0) == m.ref_count(1) == 2 and m.ref_count(2) == 1, "the shared blocks are referenced by both sequences, the partial block only by seq 1"
    c = a[:6] + [0, 0, 0]  # only the first full block matches
    assert m.allocate_blocks(3, c) == 4
    assert m.block_tables[3][0] == 0 and m.ref_count(0) == 3, "seq 3 reuses cached block 0 (a third reference)"
    # Writing after the cached prefix never copies it: the shared blocks stay untouched.
    tight = make(block_manager, num_blocks=4, caching=True)
    prefill(tight, 1, a[:9])  # [0, 1, 2]
    assert tight.allocate_blocks(2, a[:8] + [5]) == 8 and tight.num_free_blocks == 0
    assert tight.can_append_slots(2, 9)
    assert tight.append_slots(2, 8, 1) == []


@pytest.mark.part(2)
@pytest.mark.points(3)
def test_last_token_is_never_cached(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=8, caching=True)
    a = list(range(100, 108))  # exactly two full blocks
    prefill(m, 1, a)
    # Same prompt again: the last token must be recomputed, so only block 0 is a hit.
    assert m.allocate_blocks(2, a) == 4
    assert m.block_tables[2][0] == 0 and m.block_tables[2][1] != 1, "the same prompt again: block 0 is a hit, block 1 (holding the last token) is recomputed in a new block"
    assert m.allocate_blocks(3, a + [5]) == 8, "one more token: both blocks count"
    assert m.allocate_blocks(4, a[:5]) == 4
    assert m.allocate_blocks(5, a[:4]) == 0, "a one-block prompt can never hit"


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_hits_need_cache_blocks_and_computed_tokens(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=12, caching=True)
    a = list(range(9))
    m.allocate_blocks(1, a)
    m.append_slots(1, 0, 9)
    assert m.allocate_blocks(2, a) == 0, "computed, but never published"
    m.cache_blocks(1, a, 6)  # only block 0 is full *and* computed within 6 tokens
    assert m.allocate_blocks(3, a) == 4
    m.cache_blocks(1, a, 9)
    m.cache_blocks(1, a, 9)  # idempotent
    assert m.get_stats().num_cached_blocks == 2, "cache_blocks publishes full, computed blocks only, once each"
    assert m.allocate_blocks(4, a) == 8
    plain = make(block_manager, num_blocks=12, caching=False)
    prefill(plain, 1, a)
    assert plain.allocate_blocks(2, a) == 0 and plain.get_stats().num_cached_blocks == 0


@pytest.mark.part(2)
@pytest.mark.points(2)
def test_hash_chain_includes_the_prefix(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=12, caching=True)
    prefill(m, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Block 1's tokens (5..8) again, but after a different first block: K/V differ, no hit.
    assert m.allocate_blocks(2, [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0
    assert m.allocate_blocks(3, [1, 2, 3, 4, 0, 0, 0, 0, 1]) == 4
    assert m.allocate_blocks(4, [5, 6, 7, 8, 1]) == 0, "block 1's tokens at the start: no hit"


@pytest.mark.part(2)
@pytest.mark.points(2)
def test_freed_cached_blocks_revive(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=4, caching=True)
    a = list(range(20, 29))  # 9 tokens: blocks 0, 1 full and cached, block 2 partial
    prefill(m, 1, a)
    m.deallocate_blocks(1)
    stats = m.get_stats()
    assert stats.num_free_blocks == 4 and stats.num_cached_blocks == 2, "free, still cached"
    assert m.allocate_blocks(2, a) == 8
    assert m.block_tables[2][:2] == [0, 1], "the very same blocks, taken back off the free queue"
    assert m.ref_count(0) == m.ref_count(1) == 1 and m.num_free_blocks == 1, "the revived blocks are held once each; one block is left free"
    assert m.can_allocate(a[:8] + [0]), "both hits are held by seq 2: only 1 fresh block needed"
    m.deallocate_blocks(2)  # queue: 2, 3, 1, 0

    m.allocate_blocks(3, [7] * 8)  # takes 2, 3: the two free blocks left are cached 1 and 0
    assert not m.can_allocate(a), "2 revived + 1 fresh = 3 free blocks, only 2 free"
    with pytest.raises(block_manager.NoFreeBlocksError):
        m.allocate_blocks(4, a)
    assert m.num_free_blocks == 2 and m.get_stats().num_cached_blocks == 2, "nothing changed"
    m.deallocate_blocks(3)
    assert m.allocate_blocks(4, a) == 8


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_duplicate_content_is_cached_once(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=6, caching=True)
    a = list(range(9))
    m.allocate_blocks(1, a)  # [0, 1, 2]
    m.allocate_blocks(2, a)  # [3, 4, 5]: nothing was cached yet, so no hit
    for sid in (1, 2):
        m.append_slots(sid, 0, 9)
        m.cache_blocks(sid, a, 9)
    m.deallocate_blocks(1)
    assert m.allocate_blocks(3, a) == 8 and m.block_tables[3][:2] == [0, 1], "the first copy serves hits"
    m.deallocate_blocks(2)
    m.deallocate_blocks(3)
    m.allocate_blocks(4, list(range(100, 124)))  # every block is reused: the whole cache is evicted
    assert m.get_stats().num_cached_blocks == 0, "blocks reused for new content leave the prefix cache"
    m.deallocate_blocks(4)
    assert m.allocate_blocks(5, a) == 0 and m.num_free_blocks == 3


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_rewritten_block_leaves_the_cache(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=8, caching=True)
    prefill(m, 1, [1, 2, 3, 4, 5, 6])  # block 0 cached, block 1 half full
    m.append_slots(1, 6, 2)  # two speculative tokens, 7 and 8
    m.cache_blocks(1, [1, 2, 3, 4, 5, 6, 7, 8], 8)  # block 1 cached as [5, 6, 7, 8]
    m.trim_blocks(1, 7)  # token 8 rejected; block 1 is kept (it still holds 5, 6, 7)
    assert m.append_slots(1, 7, 1) == [], "a different token overwrites position 7 in place"
    # Block 1 no longer holds [5, 6, 7, 8]: it must not serve that prefix.
    assert m.allocate_blocks(2, [1, 2, 3, 4, 5, 6, 7, 8, 0]) == 4
    m.cache_blocks(1, [1, 2, 3, 4, 5, 6, 7, 50], 8)  # its new content can be published
    assert m.allocate_blocks(3, [1, 2, 3, 4, 5, 6, 7, 50, 0]) == 8
    assert m.block_tables[3][:2] == m.block_tables[1], "seq 3's first two blocks are seq 1's (the republished prefix)"


@pytest.mark.part(2)
@pytest.mark.points(2)
def test_eviction_takes_least_recently_freed_tail_first(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=4, caching=True)
    a = list(range(1, 10))  # blocks [0, 1, 2]; 0 and 1 cached
    prefill(m, 1, a)
    m.deallocate_blocks(1)  # freed tail first: queue 3, 2, 1, 0
    m.allocate_blocks(2, list(range(50, 62)))  # takes 3 blocks: evicts cached block 1, not 0
    assert m.get_stats().num_cached_blocks == 1, "allocating 3 fresh blocks evicts the least recently freed cached block (1), not 0"
    m.deallocate_blocks(2)  # queue: 0 (cached), 1, 2, 3
    # The hit at the head of the queue is taken out before fresh blocks are popped.
    assert m.allocate_blocks(3, a) == 4 and m.block_tables[3] == [0, 1, 2]

    m = make(block_manager, num_blocks=4, caching=True)
    x, y = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    prefill(m, 1, x)  # blocks [0, 1], 0 cached
    prefill(m, 2, y)  # blocks [2, 3], 2 cached
    m.deallocate_blocks(1)  # x freed first: it is evicted first
    m.deallocate_blocks(2)
    m.allocate_blocks(3, list(range(30, 39)))  # 3 blocks: 1, 0, 3
    assert m.block_tables[3] == [1, 0, 3]
    m.deallocate_blocks(3)
    assert m.allocate_blocks(4, y) == 4 and m.block_tables[4][0] == 2
    assert m.allocate_blocks(5, x) == 0


# ----- rollback, stats, bad input -----


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_trim_blocks(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=8)
    m.allocate_blocks(1, list(range(10)))  # [0, 1, 2]
    m.trim_blocks(1, 10)
    assert m.block_tables[1] == [0, 1, 2]
    m.trim_blocks(1, 5)  # ceil(5 / 4) = 2 blocks stay
    assert m.block_tables[1] == [0, 1] and m.num_free_blocks == 6
    m.trim_blocks(1, 8)
    assert m.block_tables[1] == [0, 1]
    m.fork(1, 2)
    m.trim_blocks(2, 3)  # the child lets go of block 1; the parent still holds it
    assert m.block_tables[2] == [0] and m.ref_count(1) == 1 and m.num_free_blocks == 6, "the child keeps block 0 only; block 1 stays with the parent"
    m.trim_blocks(1, 0)
    assert m.block_tables[1] == [] and m.ref_count(0) == 1 and m.num_free_blocks == 7, "trimming to 0 tokens frees every block of seq 1 except the one its child still holds"
    assert m.append_slots(1, 0, 2) == [] and len(m.block_tables[1]) == 1, "it can grow again"


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_stats(block_manager: ModuleType) -> None:
    m = make(block_manager, num_blocks=10, caching=True)
    a = list(range(10))
    prefill(m, 1, a)
    m.allocate_blocks(2, a[:8] + [77, 78])
    stats = m.get_stats()
    assert (stats.num_blocks, stats.num_free_blocks, stats.num_cached_blocks) == (10, 6, 2)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8), "counted in tokens"
    assert stats.prefix_cache_hit_rate == pytest.approx(0.4), "hit rate = 8 hit tokens / 20 queried tokens"
    assert m.usage() == pytest.approx(0.4), "usage = 4 of 10 blocks in use"


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_bad_input_is_rejected(block_manager: ModuleType) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        block_manager.PagedAttentionConfig(0)
    with pytest.raises(ValueError, match="block_size"):
        block_manager.PagedAttentionConfig(4, block_size=-1)
    m = make(block_manager)
    with pytest.raises(ValueError, match="token_ids"):
        m.allocate_blocks(1, [])
    m.allocate_blocks(1, [1, 2, 3])
    with pytest.raises(ValueError, match="seq_id"):
        m.allocate_blocks(1, [4])
    with pytest.raises(ValueError, match="num_new_tokens"):
        m.append_slots(1, 0, -1)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        m.append_slots(1, -1, 1)
    with pytest.raises(ValueError, match="num_tokens"):
        m.trim_blocks(1, -1)
    with pytest.raises(ValueError, match="child_id"):
        m.fork(1, 1)
    for call in (lambda: m.deallocate_blocks(42), lambda: m.fork(42, 43), lambda: m.can_append_slots(42, 1)):
        with pytest.raises(KeyError, match="42"):
            call()
    assert m.block_tables == {1: [0]} and m.num_free_blocks == 7, "errors changed nothing"


# ----- properties: random workloads keep the books balanced -----


def _machine(bm: ModuleType, caching: bool) -> type[RuleBasedStateMachine]:
    """A random mix of allocate / step / fork / cache / trim / deallocate against a model.

    A shadow KV cache records what each slot's K/V depend on: the token *and* every token
    before it (attention saw them all). Block copies are applied before writes, as the
    runner does. Every computed position of every live sequence must read back its own
    prefix: this catches missing copy-on-writes, blocks handed to two owners, and prefix
    hits on blocks computed for other tokens or after another prefix.
    """

    class BlockManagerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.m = bm.PagedAttentionConfig(num_blocks=10, block_size=BS, enable_prefix_caching=caching)
            self.tokens: dict[int, list[int]] = {}
            self.computed: dict[int, int] = {}
            self.shadow: dict[int, tuple[int, ...] | None] = {}
            self.next_id = 0

        def _pick(self, i: int) -> int:
            ids = sorted(self.tokens)
            return ids[i % len(ids)]

        def _snapshot(self):
            return {s: list(t) for s, t in self.m.block_tables.items()}, self.m.num_free_blocks

        @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=18))
        def allocate(self, prompt: list[int]) -> None:
            sid, self.next_id = self.next_id, self.next_id + 1
            if not self.m.can_allocate(prompt):
                before = self._snapshot()
                with pytest.raises(bm.NoFreeBlocksError):
                    self.m.allocate_blocks(sid, prompt)
                assert self._snapshot() == before, "a failed call must leave the manager exactly as it was"
                return
            cached = self.m.allocate_blocks(sid, prompt)
            assert cached % BS == 0 and 0 <= cached <= len(prompt) - 1, "hits are whole blocks and never include the last prompt token"
            assert len(self.m.block_tables[sid]) == -(-len(prompt) // BS), "a prompt gets ceil(len / block_size) blocks"
            self.tokens[sid], self.computed[sid] = list(prompt), cached

        @precondition(lambda self: self.tokens)
        @rule(i=st.integers(0, 99), chunk=st.integers(1, 6), new_token=st.integers(0, 2), cache=st.booleans())
        def step(self, i: int, chunk: int, new_token: int, cache: bool) -> None:
            sid = self._pick(i)
            toks, done = self.tokens[sid], self.computed[sid]
            if done == len(toks):
                toks.append(new_token)  # decode: the sampled token is computed next step
            n = min(chunk, len(toks) - done)
            can = self.m.can_append_slots(sid, done + n)
            before = self._snapshot()
            try:
                copies = self.m.append_slots(sid, done, n)
            except bm.NoFreeBlocksError:
                assert not can, "can_append_slots said yes, append_slots ran out of blocks"
                assert self._snapshot() == before, "a failed call must leave the manager exactly as it was"
                return
            for src, dst in copies:
                for j in range(BS):
                    self.shadow[dst * BS + j] = self.shadow.get(src * BS + j)
            for p in range(done, done + n):
                self.shadow[self.m.get_slot(sid, p)] = tuple(toks[: p + 1])
            self.computed[sid] = done + n
            if cache:
                self.m.cache_blocks(sid, toks, done + n)

        @precondition(lambda self: self.tokens)
        @rule(i=st.integers(0, 99))
        def fork(self, i: int) -> None:
            parent, child = self._pick(i), self.next_id
            self.next_id += 1
            self.m.fork(parent, child)
            self.tokens[child], self.computed[child] = list(self.tokens[parent]), self.computed[parent]

        @precondition(lambda self: self.tokens)
        @rule(i=st.integers(0, 99))
        def cache(self, i: int) -> None:
            sid = self._pick(i)
            self.m.cache_blocks(sid, self.tokens[sid], self.computed[sid])

        @precondition(lambda self: self.tokens)
        @rule(i=st.integers(0, 99), back=st.integers(0, 5))
        def trim(self, i: int, back: int) -> None:
            sid = self._pick(i)
            keep = max(0, len(self.tokens[sid]) - back)  # reject the last `back` tokens
            self.m.trim_blocks(sid, keep)
            del self.tokens[sid][keep:]
            self.computed[sid] = min(self.computed[sid], keep)
            assert len(self.m.block_tables[sid]) <= -(-keep // BS), "trim keeps at most ceil(keep / block_size) blocks"

        @precondition(lambda self: self.tokens)
        @rule(i=st.integers(0, 99))
        def deallocate(self, i: int) -> None:
            sid = self._pick(i)
            self.m.deallocate_blocks(sid)
            del self.tokens[sid], self.computed[sid]

        @invariant()
        def books_balance(self) -> None:
            tables = self.m.block_tables
            assert set(tables) == set(self.tokens), "block_tables holds exactly the live sequences"
            holders: dict[int, int] = {}
            for table in tables.values():
                assert len(set(table)) == len(table), "a block appears twice in one table"
                for b in table:
                    holders[b] = holders.get(b, 0) + 1
            for b in range(10):
                assert self.m.ref_count(b) == holders.get(b, 0)
            assert self.m.num_free_blocks + len(holders) == 10, "every block is either free or held (no leak, no double free)"
            stats = self.m.get_stats()
            assert stats.num_free_blocks == self.m.num_free_blocks, "get_stats() agrees with num_free_blocks"
            assert 0 <= stats.prefix_cache_hits <= stats.prefix_cache_queries, "hits cannot exceed queries"

        @invariant()
        def computed_tokens_read_back(self) -> None:
            for sid, toks in self.tokens.items():
                for p in range(self.computed[sid]):
                    assert self.shadow.get(self.m.get_slot(sid, p)) == tuple(toks[: p + 1]), (sid, p)

        def teardown(self) -> None:
            for sid in list(self.tokens):
                self.m.deallocate_blocks(sid)
            assert self.m.num_free_blocks == 10 and self.m.block_tables == {}, "after freeing everything, no table is left and every block is free"
            assert all(self.m.ref_count(b) == 0 for b in range(10)), "after freeing everything, no block is still referenced"

    return BlockManagerMachine


@pytest.mark.part(2)
@pytest.mark.points(1)
def test_random_workloads_without_prefix_caching(block_manager: ModuleType) -> None:
    run_state_machine_as_test(_machine(block_manager, caching=False), settings=settings(stateful_step_count=40))


@pytest.mark.part(2)
@pytest.mark.points(2)
def test_random_workloads_with_prefix_caching(block_manager: ModuleType) -> None:
    run_state_machine_as_test(_machine(block_manager, caching=True), settings=settings(stateful_step_count=40))

"""Graded tests for Part 3: paged attention.

Every expected value is dense causal attention computed here in float64 with plain torch
(``repeat_interleave`` for grouped-query heads), over keys and values the test placed in
the paged cache itself through shuffled block tables. Unused cache slots hold large
garbage, so reading past a sequence's context or through a padded block-table entry
shows up as a wrong answer.

Bugs these tests guard against, each caught by at least two of them here and in
``test_part3b_paged_attention_triton.py`` (``scripts/mutation_check.py`` plants them): a
prefill mask not shifted by the cached prefix; a decode mask that lets one position past
the context through; query head h reading KV head h modulo the KV heads instead of its
group's; keys written into the value cache; a Triton kernel whose online softmax does not
rescale its accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from servinglab.interfaces import AttentionMetadata

GARBAGE = 1e3  # scale of the values in slots no sequence owns


@dataclass
class Case:
    """A paged cache holding ``len(specs)`` sequences, their queries and the batch metadata."""

    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    metadata: AttentionMetadata
    keys: list[torch.Tensor]  # per sequence, [context_len, kv_heads, head_dim] in position order
    values: list[torch.Tensor]
    specs: list[tuple[int, int]]  # (context_len, query_len) per sequence
    scale: float


def make_case(specs, num_heads, num_kv_heads, head_dim=16, block_size=4, seed=0, dtype=torch.float32, pad_blocks=1) -> Case:
    """Scatter each sequence's K/V into randomly chosen blocks; block 0 is never used (padding)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-ctx // block_size) for ctx, _ in specs]
    num_blocks = sum(needed) + 4
    k_cache = GARBAGE * torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = GARBAGE * torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables, keys, values = [], [], []
    for (ctx, _), n in zip(specs, needed):
        table, free = free[:n], free[n:]
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        pos = torch.arange(ctx)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = v
        tables.append(table)
        keys.append(k.to(dtype))
        values.append(v.to(dtype))
    width = max(needed) + pad_blocks
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q_lens = [q for _, q in specs]
    ctx_lens = [c for c, _ in specs]
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64),  # unused by paged_attention
        block_tables=block_tables,
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
        max_query_len=max(q_lens),
        max_context_len=max(ctx_lens),
        context_lens_list=ctx_lens,
        query_lens_list=q_lens,
    )
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    return Case(query, k_cache.to(dtype), v_cache.to(dtype), metadata, keys, values, list(specs), head_dim**-0.5)


def dense_attention(case: Case) -> torch.Tensor:
    """Causal attention per sequence, float64: query row i of a sequence sits at ctx - q_len + i."""
    num_heads, num_kv_heads = case.query.shape[1], case.keys[0].shape[1]
    group = num_heads // num_kv_heads
    outs, start = [], 0
    for (ctx, q_len), k, v in zip(case.specs, case.keys, case.values):
        q = case.query[start : start + q_len].double()
        start += q_len
        k = k.double().repeat_interleave(group, dim=1)  # query head h uses kv head h // group
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * case.scale
        q_pos = torch.arange(ctx - q_len, ctx)
        allowed = torch.arange(ctx)[None, :] <= q_pos[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.cat(outs)


def check(paged_attention, case: Case, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    out = paged_attention.paged_attention(case.query, case.k_cache, case.v_cache, case.metadata, case.scale)
    assert out.shape == case.query.shape, f"output shape {tuple(out.shape)}, expected {tuple(case.query.shape)}"
    torch.testing.assert_close(out.double(), dense_attention(case), atol=atol, rtol=rtol)


# (block_size, num_heads, num_kv_heads): GQA group sizes 1, 3 and 4.
LAYOUTS = [(1, 4, 4), (4, 6, 2), (16, 8, 2)]
LAYOUT_IDS = ["bs1-mha", "bs4-gqa3", "bs16-gqa4"]


@pytest.mark.part(3)
@pytest.mark.points(1)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_write_to_kv_cache_fills_exactly_the_slots(paged_attention, block_size):
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, kv_heads, head_dim, num_tokens = 6, 2, 8, 5
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    # Keys arrive as a view into a fused projection: not contiguous.
    fused = torch.randn(num_tokens, 2 * kv_heads, head_dim, generator=gen)
    key, value = fused[:, :kv_heads], fused[:, kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    paged_attention.write_to_kv_cache(key, value, k_cache, v_cache, slots)
    for t, s in enumerate(slots.tolist()):
        torch.testing.assert_close(k_cache[s // block_size, s % block_size], key[t], rtol=0, atol=0)
        torch.testing.assert_close(v_cache[s // block_size, s % block_size], value[t], rtol=0, atol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[untouched], k_before.view(-1, kv_heads, head_dim)[untouched]), "write_to_kv_cache changed a K slot that slot_mapping does not name"
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[untouched], v_before.view(-1, kv_heads, head_dim)[untouched]), "write_to_kv_cache changed a V slot that slot_mapping does not name"


@pytest.mark.part(3)
@pytest.mark.points(1)
def test_gather_kv_reads_positions_in_order(paged_attention):
    case = make_case([(11, 1), (4, 4)], num_heads=2, num_kv_heads=2, block_size=4, seed=3)
    for b, (ctx, _) in enumerate(case.specs):
        k, v = paged_attention.gather_kv(case.k_cache, case.v_cache, case.metadata.block_tables[b], ctx)
        torch.testing.assert_close(k, case.keys[b], rtol=0, atol=0)
        torch.testing.assert_close(v, case.values[b], rtol=0, atol=0)


@pytest.mark.part(3)
@pytest.mark.points(1)
@pytest.mark.parametrize("block_size,heads,kv_heads", LAYOUTS, ids=LAYOUT_IDS)
def test_prefill_only_ragged_batch(paged_attention, block_size, heads, kv_heads):
    specs = [(ctx, ctx) for ctx in (1, 7, 16, 33)]
    check(paged_attention, make_case(specs, heads, kv_heads, block_size=block_size, seed=block_size))


@pytest.mark.part(3)
@pytest.mark.points(1)
@pytest.mark.parametrize("block_size,heads,kv_heads", LAYOUTS, ids=LAYOUT_IDS)
def test_decode_only_ragged_batch(paged_attention, block_size, heads, kv_heads):
    specs = [(ctx, 1) for ctx in (1, 5, 16, 17, 33, 64)]
    check(paged_attention, make_case(specs, heads, kv_heads, block_size=block_size, seed=10 + block_size))


@pytest.mark.part(3)
@pytest.mark.points(1)
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_after_cached_prefix(paged_attention, block_size):
    """Context longer than the query: a prefix-cache hit, or a later chunk of a chunked prefill."""
    specs = [(16, 5), (37, 12), (5, 4), (64, 33)]
    check(paged_attention, make_case(specs, 6, 2, block_size=block_size, seed=20 + block_size))


@pytest.mark.part(3)
@pytest.mark.points(1)
@pytest.mark.parametrize("block_size,heads,kv_heads", LAYOUTS, ids=LAYOUT_IDS)
def test_mixed_batch(paged_attention, block_size, heads, kv_heads):
    """Prefills, decodes and prefix-cached chunks in one step, in no particular order."""
    specs = [(9, 9), (40, 1), (23, 1), (50, 7), (3, 1), (12, 12), (30, 29)]
    check(paged_attention, make_case(specs, heads, kv_heads, block_size=block_size, seed=30 + block_size))


@pytest.mark.part(3)
@pytest.mark.points(1)
def test_smollm2_head_layout(paged_attention):
    """SmolLM2-135M's attention: 9 query heads over 3 KV heads of size 64.

    The query arrives as the model passes it: a view into a fused [T, 9 + 3, 64] tensor.
    """
    specs = [(20, 20), (70, 1), (45, 1), (33, 8)]
    case = make_case(specs, 9, 3, head_dim=64, block_size=16, seed=40, pad_blocks=3)
    fused = torch.cat([case.query, torch.randn(case.query.shape[0], 3, 64)], dim=1)
    case.query = fused[:, :9]
    assert not case.query.is_contiguous(), "the test builds a non-contiguous query on purpose (course bug if this fails)"
    check(paged_attention, case)


@pytest.mark.part(3)
@pytest.mark.points(1)
def test_leaves_inputs_unchanged(paged_attention):
    case = make_case([(10, 10), (21, 1), (8, 3)], 4, 2, block_size=4, seed=50)
    before = [t.clone() for t in (case.query, case.k_cache, case.v_cache, case.metadata.block_tables)]
    out = paged_attention.paged_attention(case.query, case.k_cache, case.v_cache, case.metadata, case.scale)
    assert out.dtype == case.query.dtype, "paged_attention must return the query's dtype"
    for t, b in zip((case.query, case.k_cache, case.v_cache, case.metadata.block_tables), before):
        assert torch.equal(t, b), "paged_attention must not modify its inputs"


@pytest.mark.part(3)
@pytest.mark.points(1)
def test_bfloat16(paged_attention):
    """The engine runs in bfloat16: same answer within bfloat16's precision."""
    case = make_case([(24, 24), (40, 1), (17, 1), (30, 6)], 6, 2, block_size=16, seed=60, dtype=torch.bfloat16)
    check(paged_attention, case, atol=3e-2, rtol=3e-2)


@pytest.mark.part(3)
@pytest.mark.points(1)
def test_write_then_attend_like_the_model(paged_attention):
    """Prefill a prompt in two chunks, then decode, writing K/V with write_to_kv_cache each step."""
    gen = torch.Generator().manual_seed(70)
    heads, kv_heads, head_dim, block_size = 6, 2, 16, 4
    k_cache = GARBAGE * torch.randn(12, block_size, kv_heads, head_dim, generator=gen)
    v_cache = GARBAGE * torch.randn(12, block_size, kv_heads, head_dim, generator=gen)
    table = [9, 2, 7, 4, 11, 5]
    total = 20
    keys = torch.randn(total, kv_heads, head_dim, generator=gen)
    values = torch.randn(total, kv_heads, head_dim, generator=gen)
    queries = torch.randn(total, heads, head_dim, generator=gen)
    done = 0
    for n in (7, 6, 1, 1, 1, 1, 1, 1, 1):
        pos = torch.arange(done, done + n)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        paged_attention.write_to_kv_cache(keys[pos], values[pos], k_cache, v_cache, slots)
        ctx = done + n
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=torch.tensor([table], dtype=torch.int32),
            context_lens=torch.tensor([ctx], dtype=torch.int32), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            max_query_len=n, max_context_len=ctx, context_lens_list=[ctx], query_lens_list=[n],
        )
        case = Case(queries[pos], k_cache, v_cache, meta, [keys[:ctx]], [values[:ctx]], [(ctx, n)], head_dim**-0.5)
        check(paged_attention, case)
        done = ctx


def _to_device(case: Case, device: str) -> Case:
    m = case.metadata
    meta = AttentionMetadata(
        m.slot_mapping.to(device), m.block_tables.to(device), m.context_lens.to(device), m.query_start_loc.to(device),
        m.max_query_len, m.max_context_len, m.context_lens_list, m.query_lens_list,
    )
    return Case(case.query.to(device), case.k_cache.to(device), case.v_cache.to(device), meta, case.keys, case.values, case.specs, case.scale)


@pytest.mark.part(3)
@pytest.mark.points(2)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU-only check)")
def test_mixed_batch_on_cuda(paged_attention):
    """The same paged attention on a CUDA device: mixed prefill/decode batch, GQA, bf16 and fp32."""
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        cpu_case = make_case([(37, 37), (20, 1), (50, 9), (9, 1)], 6, 2, block_size=16, dtype=dtype)
        case = _to_device(cpu_case, "cuda")
        out = paged_attention.paged_attention(case.query, case.k_cache, case.v_cache, case.metadata, case.scale)
        assert out.device.type == "cuda", "the output must stay on the input's device"
        torch.testing.assert_close(out.double().cpu(), dense_attention(cpu_case), atol=atol, rtol=1e-2)

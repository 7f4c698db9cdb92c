"""The GPU attention kernels (servinglab.model.triton) against Part 3's PyTorch reference.

Every case is a random ragged batch scattered through shuffled block tables, with
garbage in the slots no sequence owns. On a CPU the kernels run through Triton's
interpreter (small shapes, float32: exact up to float32 rounding, tolerance 2e-5);
the ``gpu`` tests run the compiled kernels in bfloat16 and float16 on long contexts,
against the reference computed in float32 from the same rounded inputs (tolerances:
bf16 2e-2, fp16 3e-3, absolute, on outputs of magnitude below 1).
"""

from __future__ import annotations

import pytest
import torch

from servinglab import impl
from servinglab.interfaces import AttentionMetadata
from servinglab.model import attention_backend
from servinglab.model.triton.decode_attention import choose_num_splits, paged_decode_attention
from servinglab.model.triton.kv_write import write_kv_cache
from servinglab.model.triton.prefill_attention import paged_prefill_attention

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernels)")
DEVICE = "cuda" if CUDA else "cpu"
LAYOUTS = [(16, 9, 3), (32, 9, 3), (16, 4, 4), (32, 4, 4)]  # (block_size, heads, kv_heads): GQA and MHA
LAYOUT_IDS = [f"bs{b}-h{h}-kv{k}" for b, h, k in LAYOUTS]


def ragged_case(specs, heads, kv_heads, block_size, head_dim=64, dtype=torch.float32, seed=0, device=DEVICE):
    """``specs``: (context_len, query_len) per sequence. Returns query, caches, metadata."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c, _ in specs]
    num_blocks = sum(needed) + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = 100 * torch.randn(shape, generator=gen), 100 * torch.randn(shape, generator=gen)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = []
    for (ctx, _), n in zip(specs, needed):
        table, free = free[:n], free[n:]
        pos = torch.arange(ctx)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        k_cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(ctx, kv_heads, head_dim, generator=gen)
        v_cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(ctx, kv_heads, head_dim, generator=gen)
        tables.append(table)
    width = max(needed) + 1
    q_lens, ctx_lens = [q for _, q in specs], [c for c, _ in specs]
    starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(q_lens), max_context_len=max(ctx_lens), context_lens_list=ctx_lens, query_lens_list=q_lens,
    )
    query = torch.randn(sum(q_lens), heads, head_dim, generator=gen)
    return query.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), metadata


def reference(query, k_cache, v_cache, metadata):
    """Part 3's reference in float32 on the CPU, from the same (rounded) inputs."""
    ref = impl.load_part("paged_attention", "solutions")
    m = metadata
    cpu = AttentionMetadata(*(t.cpu() for t in (m.slot_mapping, m.block_tables, m.context_lens, m.query_start_loc)),
                            m.max_query_len, m.max_context_len, m.context_lens_list, m.query_lens_list)
    return ref.paged_attention(query.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu(), cpu, query.shape[-1] ** -0.5)


def assert_matches(out, query, k_cache, v_cache, metadata, atol):
    assert out.shape == query.shape and out.dtype == query.dtype and out.device == query.device
    expected = reference(query, k_cache, v_cache, metadata)
    err = (out.float().cpu() - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol} against the PyTorch reference"


# ------------------------------------------------------------------ interpreter-size checks (every machine)
@pytest.mark.parametrize("block_size,heads,kv_heads", LAYOUTS, ids=LAYOUT_IDS)
def test_decode_ragged_batch(block_size, heads, kv_heads):
    specs = [(1, 1), (17, 1), (70, 1), (33, 1), (129, 1)]
    case = ragged_case(specs, heads, kv_heads, block_size, seed=block_size + heads)
    assert_matches(attention_backend.paged_attention(*case, 64**-0.5), *case, atol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_split_kv_matches_single_pass(num_splits):
    """Flash-decoding: any number of splits (more splits than tiles too) gives the same answer."""
    case = ragged_case([(300, 1), (5, 1), (190, 1)], 9, 3, 16, seed=3)
    q, k, v, m = case
    out = paged_decode_attention(q, k, v, m.block_tables, m.context_lens, 64**-0.5, num_splits=num_splits)
    assert_matches(out, *case, atol=2e-5)


def test_split_rule():
    """The rule reproduces the H200 sweep's best split counts (decode_attention.choose_num_splits)."""
    assert choose_num_splits(1, 3, 128, 132) == 1, "two tiles: the merge costs more than a split saves"
    assert choose_num_splits(1, 3, 1000, 132) == 16, "one short sequence: a split per tile"
    assert choose_num_splits(1, 3, 8192, 132) == 32, "a long context at batch 1: the widest split"
    assert choose_num_splits(64, 3, 1000, 132) == 5, "135M at batch 64: the sweep's best was 4-8"
    assert choose_num_splits(4, 32, 1000, 132) == 8, "1.7B at batch 4: the sweep's best was 8"
    assert choose_num_splits(32, 32, 4000, 132) == 1, "a full grid needs no split"
    assert choose_num_splits(1, 3, 300, 132) <= 5, "never more splits than tiles"


def test_padding_lanes_write_nothing_and_attend_to_nothing():
    """CUDA-graph padding: slot -1 is skipped by the KV write, context 0 gives a zero row."""
    q, k, v, m = ragged_case([(20, 1), (9, 1)], 9, 3, 16, seed=5)
    m.context_lens[1] = 0
    for splits in (1, 4):
        out = paged_decode_attention(q, k, v, m.block_tables, m.context_lens, 0.125, num_splits=splits)
        assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1])), "a padding lane must output 0"
    key, value = torch.randn(3, 3, 64, device=DEVICE), torch.randn(3, 3, 64, device=DEVICE)
    before = k.clone(), v.clone()
    write_kv_cache(key, value, k, v, torch.tensor([-1, -1, -1], device=DEVICE))
    assert torch.equal(k, before[0]) and torch.equal(v, before[1]), "slot -1 must write nothing"


@pytest.mark.parametrize("block_size", [16, 32])
def test_kv_write_matches_reference(block_size):
    ref = impl.load_part("paged_attention", "solutions")
    gen = torch.Generator().manual_seed(block_size)
    qkv = torch.randn(7, 9 + 6, 64, generator=gen).to(DEVICE)  # strided views, as the model passes them
    key, value = qkv[:, 9:12], qkv[:, 12:15]
    slots = torch.tensor([5, 0, 31, 40, 63, 17, 2], device=DEVICE)
    caches = [torch.randn(4, block_size, 3, 64, generator=gen).to(DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv_cache(key, value, caches[0], caches[1], slots)
    ref.write_to_kv_cache(key, value, expected[0], expected[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize("block_size,heads,kv_heads", LAYOUTS, ids=LAYOUT_IDS)
def test_prefill_with_cached_prefix_and_decodes(block_size, heads, kv_heads):
    """Prefills, chunks after a cached prefix and decode rows in one launch."""
    specs = [(9, 9), (40, 1), (70, 23), (3, 1), (100, 100), (33, 8)]
    case = ragged_case(specs, heads, kv_heads, block_size, seed=20 + block_size + heads)
    assert_matches(attention_backend.paged_attention(*case, 64**-0.5), *case, atol=2e-5)


def test_prefill_kernel_on_decode_rows():
    case = ragged_case([(12, 1), (50, 1)], 9, 3, 16, seed=7)
    q, k, v, m = case
    out = paged_prefill_attention(q, k, v, m.block_tables, m.context_lens, m.query_start_loc, 1, 64**-0.5)
    assert_matches(out, *case, atol=2e-5)


# ------------------------------------------------------------------ compiled kernels on a GPU
GPU_DTYPES = [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)]


def test_decode_kernel_with_several_query_rows(block_size=16, heads=9, kv_heads=3):
    """Speculative verification: 1 + k rows per sequence, causal inside the window, split or not
    (a split past a draft row's position leaves it no key: the merge must weigh it 0)."""
    specs = [(5, 5), (70, 5), (129, 5)]
    case = ragged_case(specs, heads, kv_heads, block_size, seed=heads)
    q, k, v, m = case
    for splits in (1, 3):
        out = paged_decode_attention(q, k, v, m.block_tables, m.context_lens, 64**-0.5, num_splits=splits, query_len=5)
        assert_matches(out, *case, atol=2e-5)
    assert_matches(attention_backend.paged_attention(*case, 64**-0.5), *case, atol=2e-5)  # the backend picks it too


def _random_specs(gen, num_seqs, max_ctx, decode):
    ctx = torch.randint(1, max_ctx + 1, (num_seqs,), generator=gen).tolist()
    if decode:
        return [(c, 1) for c in ctx]
    return [(c, int(torch.randint(1, min(c, 300) + 1, (1,), generator=gen))) for c in ctx]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,atol", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("block_size,heads,kv_heads", LAYOUTS, ids=LAYOUT_IDS)
def test_gpu_decode_long_contexts(dtype, atol, block_size, heads, kv_heads):
    gen = torch.Generator().manual_seed(block_size * 7 + heads)
    specs = _random_specs(gen, 12, 8192, decode=True) + [(8192, 1), (1, 1)]
    case = ragged_case(specs, heads, kv_heads, block_size, dtype=dtype, seed=heads)
    q, k, v, m = case
    for splits in (None, 1, 16):
        out = paged_decode_attention(q, k, v, m.block_tables, m.context_lens, 64**-0.5, num_splits=splits,
                                     max_context_len=m.max_context_len)
        assert_matches(out, *case, atol=atol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,atol", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("block_size,heads,kv_heads", LAYOUTS, ids=LAYOUT_IDS)
def test_gpu_prefill_ragged(dtype, atol, block_size, heads, kv_heads):
    gen = torch.Generator().manual_seed(block_size * 11 + heads)
    specs = _random_specs(gen, 10, 4096, decode=False) + [(1, 1), (513, 513), (8192, 64)]
    case = ragged_case(specs, heads, kv_heads, block_size, dtype=dtype, seed=heads + 1)
    assert_matches(attention_backend.paged_attention(*case, 64**-0.5), *case, atol=atol)

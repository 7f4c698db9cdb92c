"""Causal attention of a ragged batch over the paged cache: prefill, chunks, prefix hits.

Sequence ``b`` brings ``q_len_b`` new query rows, the *last* ``q_len_b`` positions of its
``ctx_b``-position context (the rows before them are a cached prefix: an earlier chunk
of a chunked prefill or a prefix-cache hit). Row ``i`` sits at position
``ctx_b - q_len_b + i`` and attends to every position ``<=`` it. Decode rows are the
case ``q_len = 1``, so a mixed step runs in this one launch.

One program per (sequence, tile of ``BLOCK_Q`` query positions, KV head); the tile's
rows are ``BLOCK_Q`` positions x the ``G`` query heads of that KV head (vLLM's
``triton_unified_attention`` packs them the same way), so every K/V tile read through
the block table serves ``BLOCK_Q * G`` rows. Keys are visited only up to the tile's
last query position: the causal mask prunes whole tiles, not just scores.

Why a Triton kernel rather than PyTorch SDPA here: SDPA needs each sequence's K/V
contiguous, i.e. a gather copy and one call per sequence (a Python loop over the batch,
host-bound on a GPU: about 0.33 ms of CPU per ``_cudnn_attention_forward`` call was
measured on an H200), while this kernel reads the paged cache in place for the whole
ragged batch in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_N = 64
TILE_ROWS = 64  # BLOCK_Q * BLOCK_G rows per program


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len  # positions cached before this step's rows

    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = q_tile * BLOCK_Q + offs_m // BLOCK_G  # query row within the sequence
    g = offs_m % BLOCK_G
    row_mask = (tok < q_len) & (g < GROUP)
    q_pos = prefix + tok
    heads = kv_head * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys past the tile's last query position are masked for every row: skip them.
    kv_end = tl.minimum(ctx, prefix + (q_tile + 1) * BLOCK_Q)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < kv_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        within = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + within[:, None] * stride_ks + kv_head * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + within[:, None] * stride_vs + kv_head * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Causal with a prefix: row at q_pos sees positions <= q_pos. The first tile
        # always holds position 0, so every row's running max is finite from then on.
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, num_heads, head_dim]`` (a ragged batch) over the paged cache.

    Args:
        query: rows of sequence ``b`` are ``query_start_loc[b]:query_start_loc[b + 1]``.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, holding
            this step's K/V already.
        block_tables: ``[B, max_blocks]`` int32; context_lens: ``[B]`` int32 (after the step).
        query_start_loc: ``[B + 1]`` int32 prefix sums of query lengths.
        max_query_len: the longest ``q_len`` (a Python int: it sizes the grid).
        scale: score multiplier.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("query and the caches need a contiguous last dimension (head_dim)")
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_q = max(1, TILE_ROWS // block_g)  # rows = block_q * block_g >= 64 >= tl.dot's 16
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    num_seqs = block_tables.shape[0]
    if num_tokens == 0:
        return out
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, context_lens, query_start_loc, out,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    return out

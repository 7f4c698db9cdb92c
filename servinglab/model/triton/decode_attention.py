"""Paged decode attention: one new query row per sequence, K/V read through the block table.

Design (vLLM's ``triton_unified_attention`` decode path; LightLLM / SGLang's two-stage
"flash decoding" kernels for the split):

- one program per (sequence, KV head[, split]): the ``G = num_heads / num_kv_heads``
  query heads that share a KV head form the rows of one ``[BLOCK_G, head_dim]`` tile
  (padded to 16 rows, the smallest ``tl.dot``), so each K/V tile is loaded once for
  all of them (grouped-query attention, Ainslie et al., 2023);
- the context is walked in tiles of ``BLOCK_N`` positions; each position's physical
  block comes from the block table (``block_table[p // block_size]``), so K/V are read
  where they lie in the paged cache: no gather copy (Kwon et al., 2023, section 4.1);
- online softmax (Milakov & Gimelshein, 2018; FlashAttention, Dao et al., 2022): a
  running max ``m``, normaliser ``l`` and un-normalised output ``acc`` are rescaled by
  ``exp(m_old - m_new)`` as each tile arrives, so scores never leave registers;
- split-KV (flash-decoding, Dao et al., 2023): with few sequences the grid has too few
  programs to keep 132 SMs busy, so each sequence's tiles are cut into ``num_splits``
  equal ranges, each program writes a partial output and its log-sum-exp, and
  :mod:`.split_reduce` merges them. The ranges are computed *inside* the kernel from
  the context length, so one launch shape serves any context (CUDA-graph friendly).

Scores use base 2 (``exp2``, with ``log2(e)`` folded into the scale): one multiply
fewer per score, the usual FlashAttention trick.

Several query rows per sequence (``query_len`` > 1: speculative verification, the last
token and its ``k`` drafts; vLLM's full-graph spec decode does the same): sequence
``b``'s rows ``b * query_len + i`` sit at positions ``ctx_b - query_len + i`` and attend
causally (keys at positions ``<=`` their own). The tile grows to ``query_len x G`` rows,
so each K/V tile is still read once per (sequence, KV head, split), and every launch
has the same shape for any contexts: capturable in a CUDA graph. A row can find no key
in a split (its position lies before the split's range): it leaves ``lse = -inf``, which
the merge weighs 0.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from servinglab.model.triton.split_reduce import merge_splits

LOG2E = 1.4426950408889634
BLOCK_N = 64  # context positions per tile (several KV blocks when block_size < 64)
MIN_ROWS = 16  # tl.dot needs at least 16 rows
MAX_SPLITS = 32
SPLIT_MIN_TILES = 3  # contexts of fewer tiles run single-pass (choose_num_splits)
PROGRAMS_PER_SM = 8  # resident decode programs per SM the split rule aims for


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, QUERY_LEN: tl.constexpr, ROWS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)

    # Row r of the tile: query token r // BLOCK_G of this sequence, head r % BLOCK_G of the group.
    offs_r = tl.arange(0, ROWS)
    offs_g = offs_r % BLOCK_G
    tok = offs_r // BLOCK_G
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = (offs_g < GROUP) & (tok < QUERY_LEN)
    d_mask = offs_d < HEAD_DIM
    token = seq * QUERY_LEN + tok  # the row of the flattened query
    q_pos = ctx - QUERY_LEN + tok  # causal limit of each row
    q = tl.load(q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    # This program's share of the context: tiles [tile_lo, tile_hi).
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        pos = tile * BLOCK_N + offs_n
        n_mask = pos < ctx
        block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        within = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + within[:, None] * stride_ks + kv_head * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + within[:, None] * stride_vs + kv_head * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [ROWS, BLOCK_N], base-2 logits
        s = tl.where(n_mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        # With one query row every tile in range holds a visible position, so m_new is
        # finite; a later draft row may see none yet: subtract 0 then (exp2(-inf) = 0).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # A program with no positions (an empty split, or a padding lane with ctx 0) has l = 0.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        # Partials: [num_tokens, num_heads, NUM_SPLITS, BLOCK_D] float32 and [.., NUM_SPLITS] lse.
        row = (token * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=g_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """How many KV splits a decode launch uses (1 = the single-pass kernel).

    A program walks its tiles one after the other, and each tile waits on two dependent
    loads (block-table entry, then K/V), so the kernel's time is about the length of
    one program's walk until there are enough programs in flight to hide that latency.
    Aim for ``PROGRAMS_PER_SM`` resident programs per SM (grid x splits), never more
    splits than tiles, and no split for contexts of at most ``SPLIT_MIN_TILES - 1``
    tiles, where the merge costs more than it saves.

    Measured on an H200 (bf16, block size 16, CUDA-graph replays; microseconds per
    call, single pass -> this rule), e.g.: SmolLM2-135M shapes at batch 1, context
    1000: 19.4 -> 4.5; batch 64, context 1000: 33.2 -> 19.5; SmolLM2-1.7B shapes at
    batch 4, context 1000: 30.1 -> 13.9; batch 32 and up: single pass (best there).
    """
    programs = num_seqs * num_kv_heads
    num_tiles = triton.cdiv(max(max_context_len, 1), BLOCK_N)
    if num_tiles < SPLIT_MIN_TILES:
        return 1
    by_occupancy = (PROGRAMS_PER_SM * num_sms) // programs
    return max(1, min(MAX_SPLITS, by_occupancy, num_tiles))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (cached: the property query costs host time every step)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any small number exercises both paths


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    query_len: int = 1,
) -> torch.Tensor:
    """Decode attention of ``query`` ``[B * query_len, num_heads, head_dim]`` over the paged cache.

    Args:
        query: ``query_len`` rows per sequence, sequence after sequence (may be a strided
            view; last dim contiguous). Row ``i`` of sequence ``b`` sits at position
            ``context_lens[b] - query_len + i`` and attends causally.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_tables: ``[B, max_blocks]`` int32 block ids.
        context_lens: ``[B]`` int32 positions in cache (0 = a padding lane, output 0).
        scale: score multiplier.
        num_splits: force a split count; ``None`` applies :func:`choose_num_splits`
            with ``max_context_len`` (default: the table width times the block size,
            the longest context the table can describe, without reading the device).
        out: optional output buffer shaped like ``query``.
        query_len: query rows per sequence (1: plain decode; ``1 + k``: speculative verification).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = block_tables.shape[0]
    if query_len < 1 or num_tokens != num_seqs * query_len:
        raise ValueError(f"query has {num_tokens} rows, block_tables {num_seqs} sequences: need query_len ({query_len}) rows each")
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("query and the caches need a contiguous last dimension (head_dim)")
    group = num_heads // num_kv_heads
    if num_splits is None:
        longest = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, longest, _num_sms(query.device))
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in 1..256, got {num_splits}")
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    # One query row: the group's heads padded to 16 rows, as before; several: query_len x G (power of two).
    block_g = max(MIN_ROWS, triton.next_power_of_2(group)) if query_len == 1 else triton.next_power_of_2(group)
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, block_d, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits, NUM_HEADS=num_heads,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        QUERY_LEN=query_len, ROWS=max(MIN_ROWS, triton.next_power_of_2(query_len) * block_g),
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        merge_splits(part_out, part_lse, out)
    return out

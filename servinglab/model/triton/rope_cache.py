"""RoPE on q and k, then K/V into the paged cache: one kernel instead of two.

In a decode step of a small model every kernel runs for a few microseconds, so what
counts is how many run one after the other. :mod:`.rope` and :mod:`.kv_write` each
make a pass over the same rows: the first rotates q and k in place, the second copies
the rotated k and the untouched v to their cache slots. This kernel does both while the
rows are in registers (vLLM fuses the same two steps in its ``rotary_embedding`` +
``reshape_and_cache`` path for the same reason).

One program per token:

- the ``num_heads + num_kv_heads`` q and k heads are rotated (rotate-half layout, the
  ``cos``/``sin`` table read once per token, float32 math, one rounding) and written
  back into the fused QKV row, so the prefill kernel and Part 3's reference see the
  same q;
- the rotated k heads and the v heads are stored at the token's slot; slot ``-1`` (a
  padding lane of a captured CUDA graph) stores nothing, exactly like :mod:`.kv_write`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_t, stride_cache_slot,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + pos * HALF + offs_d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + offs_d, mask=d_mask, other=0.0)[None, :]
    row = qkv_ptr + token * stride_t

    # q and k heads sit side by side at the start of the row: rotate them together.
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < NUM_HEADS + NUM_KV_HEADS) & d_mask[None, :]
    first = row + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty)
    tl.store(first, y1, mask=mask)
    tl.store(first + HALF, y2, mask=mask)

    # The cache row of this slot: [kv_heads, head_dim] contiguous. Rows of the tile that
    # are q heads (offs_h < NUM_HEADS) or padding are masked out of the cache store.
    is_k = (offs_h >= NUM_HEADS) & (offs_h < NUM_HEADS + NUM_KV_HEADS) & ((offs_h * 0 + slot) >= 0)
    k_mask = is_k[:, None] & d_mask[None, :]
    dst_k = k_cache_ptr + slot * stride_cache_slot + (offs_h[:, None] - NUM_HEADS) * (2 * HALF) + offs_d[None, :]
    tl.store(dst_k, y1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dst_k + HALF, y2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)

    # v: a plain copy of the last NUM_KV_HEADS heads of the row.
    offs_v = tl.arange(0, BLOCK_KV)
    offs_full = tl.arange(0, 2 * BLOCK_HALF)
    v_mask = ((offs_v[:, None] < NUM_KV_HEADS) & (offs_full[None, :] < 2 * HALF)) & ((offs_v[:, None] * 0 + slot) >= 0)
    src_v = row + (NUM_HEADS + NUM_KV_HEADS + offs_v[:, None]) * (2 * HALF) + offs_full[None, :]
    v = tl.load(src_v, mask=v_mask, other=0.0)
    dst_v = v_cache_ptr + slot * stride_cache_slot + offs_v[:, None] * (2 * HALF) + offs_full[None, :]
    tl.store(dst_v, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rope_and_cache_(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
) -> None:
    """Rotate q and k of each ``qkv`` row in place and store k, v at ``slot_mapping``.

    Args:
        qkv: ``[T, (num_heads + 2 * num_kv_heads) * head_dim]``, rows contiguous.
        positions: ``[T]`` token positions (index the ``cos``/``sin`` tables).
        cos, sin: float32 ``[max_positions, head_dim / 2]`` (:func:`.rope.rope_cos_sin_cache`).
        k_cache, v_cache: contiguous ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        slot_mapping: ``[T]`` cache slots; ``< 0`` stores nothing for that row.
        num_heads, num_kv_heads: query and KV heads of the layer.
    """
    num_tokens = qkv.shape[0]
    head_dim = 2 * cos.shape[1]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.stride(-1) != 1 or qkv.shape[1] != width:
        raise ValueError(f"qkv must be [T, {width}] with contiguous rows, got {tuple(qkv.shape)}")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"caches must be contiguous [blocks, block_size, {num_kv_heads}, {head_dim}], got {tuple(k_cache.shape)}")
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rope_and_cache_kernel[(num_tokens,)](
        qkv, positions, cos, sin, slot_mapping, k_cache, v_cache, qkv.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, BLOCK_H=triton.next_power_of_2(num_heads + num_kv_heads),
        BLOCK_KV=triton.next_power_of_2(num_kv_heads), HALF=half, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )

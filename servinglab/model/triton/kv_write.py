"""Store a step's new keys and values at their cache slots (vLLM's ``reshape_and_cache``).

One program per (token, KV head) copies one ``head_dim`` row of K and one of V. A slot
of ``-1`` is skipped: the padding lanes of a captured CUDA graph point there, so a
padded batch writes nothing for them. ``tl.arange`` needs a power of two, so the row is
``BLOCK_D = next_power_of_2(head_dim)`` wide and masked (a tile over
``kv_heads x head_dim`` = 3 x 64 = 192 would not compile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot, stride_cache_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    # Broadcast the slot to the row first: a scalar in the mask trips the interpreter.
    mask = (offs < HEAD_DIM) & ((offs * 0 + slot) >= 0)
    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + offs, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + offs, mask=mask)
    # The cache is [num_blocks, block_size, kv_heads, head_dim], contiguous: slot s is
    # row s of its [num_blocks * block_size, kv_heads, head_dim] view.
    dst = slot * stride_cache_slot + head * stride_cache_head + offs
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``key``/``value`` ``[T, kv_heads, head_dim]`` rows into the caches at ``slot_mapping`` ``[T]``.

    Same contract as Part 3's ``write_to_kv_cache``, plus: a slot ``< 0`` writes nothing.
    ``key`` and ``value`` may be strided views (rows of the fused QKV projection) as long
    as their last dimension is contiguous.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"key {tuple(key.shape)}, value {tuple(value.shape)} and slot_mapping {tuple(slot_mapping.shape)} must agree")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"caches must be contiguous [blocks, block_size, {num_kv_heads}, {head_dim}], got {tuple(k_cache.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous last dimension (head_dim)")
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )

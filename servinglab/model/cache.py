"""Allocate the paged KV cache tensors the engine runs on.

One pair of tensors per decoder layer, each shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``: a slot is one token's K (or V) for
all KV heads of that layer, and slot ``s`` lives at ``[s // block_size, s % block_size]``.
Part 1's memory math must agree with the bytes these tensors really take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servinglab.impl import load_part


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape facts of a Llama-family model that decide its KV-cache size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config) -> "KVCacheSpec":
        """Read the spec from a transformers ``PretrainedConfig`` (or anything with its fields)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)


def pool_num_blocks(spec: KVCacheSpec, memory_gib: float, block_size: int, dtype: torch.dtype) -> int:
    """How many KV blocks fit ``memory_gib``, by the student's Part 1 (``kv_cache.num_kv_blocks``).

    The whole budget is KV (the weights live elsewhere, as with ``VLLM_CPU_KVCACHE_SPACE``).

    Raises:
        ValueError: the budget holds no block (naming ``kv_cache_memory_gib`` and the block's bytes).
    """
    block_bytes = block_nbytes(spec, block_size, dtype)
    try:
        blocks = load_part("kv_cache").num_kv_blocks(spec, int(memory_gib * 2**30), gpu_memory_utilization=1.0,
                                                   block_size=block_size, dtype=dtype, weight_bytes=0)
    except ValueError as exc:
        raise ValueError(f"kv_cache_memory_gib={memory_gib} holds no {block_bytes}-byte block") from exc
    if blocks < 1:
        raise ValueError(f"kv_cache_memory_gib={memory_gib} holds no {block_bytes}-byte block")
    return blocks


def block_nbytes(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all layers: K and V of ``block_size`` tokens."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * block_size * torch.empty((), dtype=dtype).element_size()


def host_pool_num_blocks(spec: KVCacheSpec, swap_space_gib: float, block_size: int, dtype: torch.dtype) -> int:
    """How many KV blocks fit a host pool of ``swap_space_gib`` GiB (vLLM's ``swap_space``)."""
    if isinstance(swap_space_gib, bool) or not isinstance(swap_space_gib, (int, float)) or not swap_space_gib >= 0:
        raise ValueError(f"swap_space must be a number of GiB >= 0, got {swap_space_gib!r}")
    return int(swap_space_gib * 2**30) // block_nbytes(spec, block_size, dtype)


def allocate_host_kv_cache(spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                           pin_memory: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The host pool for swapping: per layer ``(k, v)`` of ``[num_blocks, block_size, kv_heads, head_dim]`` on the CPU.

    Left uninitialised (a block is always written by a swap-out before a swap-in reads
    it); pinned (page-locked) on a GPU machine, so device<->host copies run by DMA.
    """
    shape = (max(num_blocks, 0), block_size, spec.num_kv_heads, spec.head_dim)
    return [(torch.empty(shape, dtype=dtype, pin_memory=pin_memory), torch.empty(shape, dtype=dtype, pin_memory=pin_memory))
            for _ in range(spec.num_layers)]


def allocate_kv_cache(
    spec: KVCacheSpec,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return ``[(k_cache, v_cache)] * num_layers``, zero-filled."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(spec.num_layers)
    ]


def kv_cache_nbytes(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes held by the cache tensors (what Part 1 predicts)."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)

# Exercise stub generated from solutions/paged_attention.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 3: paged attention over a block-structured KV cache.

The KV cache is one pair of tensors per layer, each ``[num_blocks, block_size,
num_kv_heads, head_dim]`` (see :mod:`servinglab.model.cache`). A sequence's tokens are not
stored contiguously: its *block table* lists the blocks that hold positions
``0..block_size-1``, ``block_size..2*block_size-1`` and so on, so position ``p`` lives in
slot ``block_table[p // block_size] * block_size + p % block_size`` (Kwon et al., 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention",
section 4.1). Attention therefore reads keys and values *through* the block table.

The model calls two functions per layer, always with the same arguments whatever the
batch holds (nano-vllm's split: an :class:`~servinglab.interfaces.AttentionMetadata`
carries the batching facts, so the model never sees them):

1. :func:`write_to_kv_cache` stores this step's new K/V rows at their slots;
2. :func:`paged_attention` lets every new query row attend, causally, over its
   sequence's whole context (cached prefix plus the rows just written).

Both signatures are kept stable so a fused GPU kernel (vLLM's ``paged_attention_v1/v2``,
FlashAttention's ``flash_attn_with_kvcache``) can replace the PyTorch bodies later.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from servinglab.interfaces import AttentionMetadata


def write_to_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each new token's key and value at its cache slot, in place.

    Args:
        key: ``[T, num_kv_heads, head_dim]``, the keys of this step's ``T`` new tokens.
        value: ``[T, num_kv_heads, head_dim]``, their values.
        k_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, one layer's keys.
        v_cache: same shape, one layer's values.
        slot_mapping: ``[T]`` int64; row ``t`` goes to slot ``slot_mapping[t]``, i.e. to
            ``cache[slot // block_size, slot % block_size]``.

    ``key`` and ``value`` may be non-contiguous views (the model slices them out of one
    fused projection). Every other slot must stay untouched. A GPU build would call vLLM's
    ``reshape_and_cache`` kernel here with the same arguments.
    """
    # Hint: view the cache as [num_blocks * block_size, num_kv_heads, head_dim] (a view
    # shares memory, so writing into it writes the cache) and index it with slot_mapping.
    raise NotImplementedError("write_to_kv_cache: your code here")


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sequence's keys and values out of the paged cache, in position order.

    Args:
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_table: ``[n]`` integer block ids (it may carry padding past the blocks in use).
        context_len: how many positions the sequence has in the cache.

    Returns:
        ``(keys, values)``, each ``[context_len, num_kv_heads, head_dim]``; row ``p`` is
        position ``p``.
    """
    # Hint: only the first ceil(context_len / block_size) blocks are in use; indexing a
    # tensor with a tensor of block ids gathers whole blocks at once.
    raise NotImplementedError("gather_kv: your code here")


def causal_attention_with_prefix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one sequence's new rows over its whole, contiguous context.

    Args:
        query: ``[q_len, num_heads, head_dim]``, the new rows; they are the *last* ``q_len``
            positions of the context, so row ``i`` sits at ``context_len - q_len + i``.
        key, value: ``[context_len, num_kv_heads, head_dim]`` with ``context_len >= q_len``.
        scale: multiplies the scores, usually ``head_dim ** -0.5``.

    Returns:
        ``[q_len, num_heads, head_dim]``: row ``i`` attends to positions ``<= context_len - q_len + i``.
        Query head ``h`` uses KV head ``h // (num_heads // num_kv_heads)`` (grouped-query
        attention, Ainslie et al., 2023).
    """
    # Hint: torch.nn.functional.scaled_dot_product_attention takes [batch, heads, len, dim];
    # is_causal=True is right only when q_len == context_len (no cached prefix); otherwise
    # pass a boolean attn_mask (True = may attend). enable_gqa=True handles the head groups.
    raise NotImplementedError("causal_attention_with_prefix: your code here")


def batched_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:
    """Decode attention for ``B`` sequences with one new row each, in one batched call.

    Args:
        query: ``[B, num_heads, head_dim]``, row ``b`` is sequence ``b``'s newest token.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_tables: ``[B, max_blocks]`` block ids, padded (with any valid id, e.g. 0).
        context_lens: ``[B]`` positions in cache per sequence (the new one included).
        max_context_len: ``max(context_lens)``, a Python int.
        scale: score multiplier.

    Returns:
        ``[B, num_heads, head_dim]``. The newest row sees every position of its context,
        so the only mask needed hides the padding past ``context_lens[b]``.
    """
    # Hint: gather k_cache[block_tables] for every sequence at once, flatten blocks into
    # positions, and mask positions >= context_lens[b]. A decode step is memory bound,
    # so one large gather beats B small ones (the reason vLLM batches decode).
    raise NotImplementedError("batched_decode_attention: your code here")


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a flattened, ragged batch over the paged KV cache.

    Args:
        query: ``[T, num_heads, head_dim]``; sequence ``b`` owns rows
            ``query_start_loc[b]:query_start_loc[b + 1]``.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, already
            holding this step's new keys and values (:func:`write_to_kv_cache` ran first).
        metadata: block tables, context lengths and query offsets of the batch.
        scale: score multiplier, usually ``head_dim ** -0.5``.

    Returns:
        ``[T, num_heads, head_dim]``. Sequence ``b``'s query row ``i`` sits at position
        ``context_lens[b] - query_len_b + i`` and attends to every position ``<=`` that one.
        This one rule covers prefill, prefill after a prefix-cache hit, a chunk of a
        chunked prefill, decode, and any mix of them in one batch.

    A GPU build keeps this signature and calls a fused kernel instead.
    """
    # Hint: decode rows (query_len == 1) of many sequences can share one batched call
    # (batched_decode_attention); the other sequences can go one at a time through
    # gather_kv and causal_attention_with_prefix. Loop over Python lists, not tensors.
    raise NotImplementedError("paged_attention: your code here")

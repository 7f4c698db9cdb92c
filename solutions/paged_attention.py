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
    ### BEGIN SOLUTION
    if key.shape != value.shape or key.shape[0] != slot_mapping.shape[0]:
        raise ValueError(
            f"key {tuple(key.shape)}, value {tuple(value.shape)} and slot_mapping "
            f"{tuple(slot_mapping.shape)} must agree on the number of tokens"
        )
    _, _, num_kv_heads, head_dim = k_cache.shape
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_blocks = -(-context_len // block_size)
    blocks = block_table[:num_blocks].long()
    keys = k_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:context_len]
    values = v_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:context_len]
    return keys, values
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    q_len, ctx_len = query.shape[0], key.shape[0]
    q = query.transpose(0, 1).unsqueeze(0)
    k = key.transpose(0, 1).unsqueeze(0)
    v = value.transpose(0, 1).unsqueeze(0)
    gqa = query.shape[1] != key.shape[1]
    if q_len == ctx_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # Row i may see positions up to (ctx_len - q_len + i): a causal mask shifted right
        # by the cached prefix.
        rows = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
        mask = torch.arange(ctx_len, device=query.device)[None, :] <= rows[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-max_context_len // block_size)
    tables = block_tables[:, :num_blocks].reshape(-1).long()
    # index_select on dim 0 is a plain row copy, several times faster on CPU than
    # advanced indexing k_cache[tables]. [B * blocks, block_size, Hkv, D] -> [B, Hkv, L, D]
    keys = k_cache.index_select(0, tables).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, tables).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    # The G query heads sharing a KV head act as G query rows of that head: no need to
    # repeat K/V (grouped-query attention, Ainslie et al., 2023).
    q = query.view(num_seqs, num_kv_heads, group, head_dim)
    positions = torch.arange(keys.shape[2], device=query.device)
    mask = (positions[None, :] < context_lens.to(query.device)[:, None].long())[:, None, None, :]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)
    ### END SOLUTION


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
    ### BEGIN SOLUTION
    ctx_lens = metadata.context_lens_list or metadata.context_lens.tolist()
    q_lens = metadata.query_lens_list or torch.diff(metadata.query_start_loc).tolist()
    starts = list(itertools.accumulate(q_lens, initial=0))
    if len(ctx_lens) != len(q_lens) or starts[-1] != query.shape[0]:
        raise ValueError(f"metadata describes {starts[-1]} query rows in {len(q_lens)} sequences, query has {query.shape[0]}")
    decode = [b for b, n in enumerate(q_lens) if n == 1]
    if len(decode) == len(q_lens):  # decode-only: rows are the sequences, in order
        return batched_decode_attention(
            query, k_cache, v_cache, metadata.block_tables, metadata.context_lens, max(ctx_lens), scale
        )
    out = torch.empty_like(query)
    batched = decode if len(decode) > 1 else []  # a lone decode row goes the general way
    if batched:
        rows = torch.tensor([starts[b] for b in batched], device=query.device)
        seqs = torch.tensor(batched, device=query.device)
        out[rows] = batched_decode_attention(
            query[rows], k_cache, v_cache, metadata.block_tables[seqs], metadata.context_lens[seqs],
            max(ctx_lens[b] for b in batched), scale,
        )
    skip = set(batched)
    for b, (q_len, ctx_len) in enumerate(zip(q_lens, ctx_lens)):
        if b in skip or q_len == 0:
            continue
        keys, values = gather_kv(k_cache, v_cache, metadata.block_tables[b], ctx_len)
        s = starts[b]
        out[s : s + q_len] = causal_attention_with_prefix(query[s : s + q_len], keys, values, scale)
    return out
    ### END SOLUTION

"""Part 9, the collectives: the forward pieces that make sharded layers exchange results.

:mod:`.tensor_parallel` splits the weights; these functions run a sharded layer and put
its partial results back together with ``torch.distributed`` (gloo on CPUs, NCCL on
GPUs):

* :func:`row_parallel_linear`: the partial product of a row-parallel layer (o_proj,
  down_proj), summed by one ``all_reduce`` (Megatron, Shoeybi et al. 2019, section 3);
* :func:`vocab_parallel_embedding`: each rank looks up the ids in its vocabulary range,
  one ``all_reduce`` assembles the embeddings;
* :func:`gather_logits`: the LM head's vocabulary slices, one ``all_gather_into_tensor``;
* :func:`distributed_argmax`: the greedy token without gathering the logits (``2 x k``
  numbers per token instead of the vocabulary size).

:mod:`.tensor_parallel` re-exports them, so ``load_part("tensor_parallel")`` has all of
Part 9.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def row_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Forward of a row-parallel layer: local partial product, then one all-reduce.

    Args:
        x: ``[T, in / k]``, this rank's slice of the input features.
        weight: ``[out, in / k]``, this rank's :func:`row_shard`.
        bias: the whole ``[out]`` bias or ``None``; added once, *after* the sum (adding
            it on every rank would count it ``k`` times).
        group: the tensor-parallel process group (``None``: the default group).

    Returns:
        ``[T, out]``, the same full result on every rank: ``sum_r x_r W_r^T (+ bias)``
        through ``torch.distributed.all_reduce`` (SUM).
    """
    ### BEGIN SOLUTION
    partial = F.linear(x, weight)
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return partial if bias is None else partial + bias
    ### END SOLUTION


def vocab_parallel_embedding(
    input_ids: torch.Tensor, weight: torch.Tensor, vocab_start: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Look up token ids in a vocabulary-sharded embedding table.

    Args:
        input_ids: ``[T]`` int64 ids over the *whole* vocabulary.
        weight: ``[V / k, hidden]``, the rows ``vocab_start .. vocab_start + V/k - 1``.
        vocab_start: the first id this rank holds.
        group: the tensor-parallel process group.

    Returns:
        ``[T, hidden]`` embeddings, identical on every rank: each rank looks up the ids
        in its range (others clamped to a valid row and then zeroed, so no index is out
        of range), and one ``all_reduce`` (SUM) adds the ``k`` partial tables, of which
        exactly one is non-zero for every token.
    """
    ### BEGIN SOLUTION
    local = input_ids - vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight)
    out = out.masked_fill(outside[:, None], 0.0)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
    ### END SOLUTION


def gather_logits(local_logits: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Assemble full-vocabulary logits from every rank's slice.

    Args:
        local_logits: ``[S, V / k]``, this rank's vocabulary slice (rank ``r`` holds ids
            ``r*V/k .. (r+1)*V/k - 1``).
        group: the tensor-parallel process group.

    Returns:
        ``[S, V]`` on every rank, columns in vocabulary order. Uses one
        ``torch.distributed.all_gather_into_tensor``, which stacks the ranks' tensors
        along dim 0 (``[k*S, V/k]``): rearrange that into ``[S, k*V/k]``.
    """
    ### BEGIN SOLUTION
    world = dist.get_world_size(group)
    rows, cols = local_logits.shape
    stacked = torch.empty((world * rows, cols), dtype=local_logits.dtype, device=local_logits.device)
    dist.all_gather_into_tensor(stacked, local_logits.contiguous(), group=group)
    return stacked.view(world, rows, cols).permute(1, 0, 2).reshape(rows, world * cols)
    ### END SOLUTION


def distributed_argmax(local_logits: torch.Tensor, vocab_start: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Greedy tokens without gathering the logits: ``[S]`` int64 global ids, on every rank.

    Each rank finds its local maximum and its global id; the ranks exchange only those
    ``2 x S`` numbers (``all_gather_into_tensor``) and every rank picks the largest.
    Ties go to the smallest global id, as ``torch.argmax`` over the full row does.
    Traffic per token: ``2 x k`` numbers instead of ``V``.
    """
    ### BEGIN SOLUTION
    world = dist.get_world_size(group)
    values, idx = local_logits.float().max(dim=-1)  # first maximum within the slice
    mine = torch.stack([values, (idx + vocab_start).float()], dim=0)  # [2, S]; ids < 2^24 are exact in float32
    everyone = torch.empty((world * 2, mine.shape[1]), dtype=mine.dtype, device=mine.device)
    dist.all_gather_into_tensor(everyone, mine.contiguous(), group=group)
    everyone = everyone.view(world, 2, -1)
    # Ranks are in vocabulary order, so the first rank holding the maximum has the smallest id.
    best_rank = everyone[:, 0, :].argmax(dim=0)
    return everyone[best_rank, 1, torch.arange(mine.shape[1], device=mine.device)].long()
    ### END SOLUTION

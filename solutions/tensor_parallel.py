"""Part 9: tensor parallelism, Megatron-style (Shoeybi et al. 2019, arXiv 1909.08053).

A model too large (or too slow) for one GPU is split *inside every layer* across ``k``
ranks. Each rank holds ``1/k`` of every large matrix and the ranks exchange partial
results with collectives from ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

A linear layer ``y = x W^T`` (PyTorch stores ``W`` as ``[out, in]``) splits two ways:

* **column-parallel**: split ``W`` by *output* features (rows of the stored matrix).
  Every rank sees the whole ``x`` and computes its own slice of ``y``; no
  communication. Used for q/k/v (split by heads) and gate/up (split by intermediate
  features).
* **row-parallel**: split ``W`` by *input* features (columns of the stored matrix).
  Every rank holds a slice of ``x`` (exactly the slice a column-parallel layer just
  produced) and computes a partial ``y``; the partials are summed with one
  ``all_reduce``. Used for o_proj and down_proj.

Pairing them (Megatron paper, section 3) costs exactly two all-reduces per decoder layer:
attention heads are independent, so ``q/k/v`` column-parallel -> attention on the local
heads -> ``o_proj`` row-parallel -> all-reduce; SwiGLU is element-wise, so ``gate/up``
column-parallel -> ``silu(gate) * up`` on the local features -> ``down_proj``
row-parallel -> all-reduce. Norms are tiny and stay replicated on every rank.

Splitting the KV heads (not only the query heads) means each rank also keeps only
``num_kv_heads / k`` heads of the KV cache: the same memory holds ``k`` times more
blocks per rank (Part 1's ``num_kv_blocks(..., tensor_parallel_size=k)``). vLLM
replicates KV heads when ``k > num_kv_heads``; this course requires ``k`` to divide it.

The vocabulary splits too: the embedding table by rows (each rank looks up only the ids
in its range, zeros elsewhere, then one all-reduce) and the LM head by vocabulary rows
(each rank computes its slice of the logits; an ``all_gather_into_tensor`` assembles
them, or a distributed argmax finds the greedy token without gathering them).

This file splits the weights; the collectives that run the sharded layers are in
:mod:`.tp_collectives` (re-exported here).

Parameter names are the engine's (:mod:`servinglab.model.llama`): q/k/v are fused into
one ``qkv_proj`` (rows ``[q heads | k heads | v heads]``) and gate/up into one
``gate_up_proj`` (rows ``[gate | up]``), so a rank's shard of a fused matrix is the
concatenation of its slice of *each* part, never one contiguous chunk of the whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .tp_collectives import distributed_argmax, gather_logits, row_parallel_linear, vocab_parallel_embedding


@dataclass(frozen=True)
class TPShape:
    """The sizes of a Llama-family model that decide how it shards.

    Attributes:
        hidden_size: width of the residual stream (never split).
        num_heads: query heads (``num_attention_heads``).
        num_kv_heads: key/value heads (``num_key_value_heads``; equal to ``num_heads``
            without grouped-query attention).
        head_dim: features per head.
        intermediate_size: width of the MLP's gate and up projections.
        vocab_size: rows of the embedding table and of the LM head.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> "TPShape":
        """Read the shape from a transformers ``LlamaConfig`` (or anything with its fields)."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, heads, kv, head_dim, config.intermediate_size, config.vocab_size)


def _divisors_of_all(values: list[int]) -> list[int]:
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return [d for d in range(1, g + 1) if g % d == 0]


def check_tp_size(shape: TPShape, tp_size: int) -> None:
    """Raise ``ValueError`` unless ``tp_size`` ranks can each take an equal, whole share.

    Checks, in this order: ``tp_size`` is a positive integer; it divides
    ``num_attention_heads`` (``shape.num_heads``), ``num_key_value_heads``,
    ``intermediate_size`` and ``vocab_size``. The message names the first parameter
    that does not divide (with both numbers) and lists the sizes that would work, e.g.
    SmolLM2-135M (9 heads, 3 KV heads) at ``tp_size=2``: "... must divide
    num_attention_heads (9) ... allowed tensor_parallel_size values: [1, 3]".
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
    sizes = {
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
    }
    # Hint: the sizes that work are the divisors of all four numbers: _divisors_of_all(list(sizes.values())).
    ### BEGIN SOLUTION
    allowed = _divisors_of_all(list(sizes.values()))
    for name, size in sizes.items():
        if size % tp_size:
            raise ValueError(
                f"tensor_parallel_size ({tp_size}) must divide {name} ({size}): every rank needs an equal, "
                f"whole share; allowed tensor_parallel_size values for this model: {allowed}"
            )
    ### END SOLUTION


def local_shape(shape: TPShape, tp_size: int) -> TPShape:
    """The shape one rank holds: heads, KV heads, intermediate size and vocabulary divided by ``tp_size``.

    ``hidden_size`` and ``head_dim`` stay whole. Calls :func:`check_tp_size` first.
    """
    check_tp_size(shape, tp_size)
    ### BEGIN SOLUTION
    return TPShape(
        shape.hidden_size,
        shape.num_heads // tp_size,
        shape.num_kv_heads // tp_size,
        shape.head_dim,
        shape.intermediate_size // tp_size,
        shape.vocab_size // tp_size,
    )
    ### END SOLUTION


def shard_range(size: int, rank: int, tp_size: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s equal share of ``size`` items.

    Raises ``ValueError`` naming ``rank`` when it is not in ``0..tp_size-1``, and naming
    ``size`` when ``tp_size`` does not divide it.
    """
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank must be in 0..{tp_size - 1}, got {rank}")
    if size % tp_size:
        raise ValueError(f"size ({size}) must be divisible by tensor_parallel_size ({tp_size})")
    ### BEGIN SOLUTION
    per = size // tp_size
    return rank * per, (rank + 1) * per
    ### END SOLUTION


def column_shard(weight: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a column-parallel layer: a block of *output* features.

    ``weight`` is ``[out, in]`` (or a bias ``[out]``); the result is
    ``[out / tp_size, in]``, rows ``shard_range(out, rank, tp_size)``. Concatenating the
    shards of ranks ``0..k-1`` along dim 0 gives ``weight`` back.
    """
    ### BEGIN SOLUTION
    start, end = shard_range(weight.shape[0], rank, tp_size)
    return weight[start:end].clone()
    ### END SOLUTION


def row_shard(weight: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a row-parallel layer: a block of *input* features.

    ``weight`` is ``[out, in]``; the result is ``[out, in / tp_size]``, columns
    ``shard_range(in, rank, tp_size)``, so it multiplies exactly the features the
    preceding column-parallel layer left on this rank. Concatenating the shards along
    dim 1 gives ``weight`` back. (Splitting dim 0 here is the classic bug: the shapes
    then no longer match the rank's input.)
    """
    ### BEGIN SOLUTION
    start, end = shard_range(weight.shape[1], rank, tp_size)
    return weight[:, start:end].clone()
    ### END SOLUTION


def shard_qkv(qkv: torch.Tensor, shape: TPShape, rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``rank``'s rows of the fused ``qkv_proj`` weight (or bias), split by heads.

    The fused rows are ``[q: num_heads*head_dim | k: num_kv_heads*head_dim | v: same]``.
    The shard is ``[q rows of this rank's num_heads/k query heads | k rows of its
    num_kv_heads/k KV heads | v rows of the same KV heads]``: heads stay whole and
    query head ``h`` stays on the rank of its KV head ``h // (num_heads/num_kv_heads)``
    (grouped-query attention needs them together). Raises ``ValueError`` (from
    :func:`check_tp_size`) when heads or KV heads do not divide, and when ``qkv`` does
    not have ``(num_heads + 2*num_kv_heads) * head_dim`` rows.
    """
    check_tp_size(shape, tp_size)
    q_rows, kv_rows = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    if qkv.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(f"qkv has {qkv.shape[0]} rows, expected (num_heads + 2*num_kv_heads) * head_dim = {q_rows + 2 * kv_rows}")
    ### BEGIN SOLUTION
    q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=0)
    return torch.cat([column_shard(q, rank, tp_size), column_shard(k, rank, tp_size), column_shard(v, rank, tp_size)], dim=0)
    ### END SOLUTION


def shard_gate_up(gate_up: torch.Tensor, shape: TPShape, rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``rank``'s rows of the fused ``gate_up_proj`` weight (or bias).

    The fused rows are ``[gate: intermediate_size | up: intermediate_size]``; the shard
    is ``[this rank's gate rows | the same rows of up]`` (``2 * intermediate_size / k``
    rows), so ``silu(gate) * up`` pairs the same features on every rank.
    """
    check_tp_size(shape, tp_size)
    if gate_up.shape[0] != 2 * shape.intermediate_size:
        raise ValueError(f"gate_up has {gate_up.shape[0]} rows, expected 2 * intermediate_size = {2 * shape.intermediate_size}")
    ### BEGIN SOLUTION
    gate, up = gate_up.chunk(2, dim=0)
    return torch.cat([column_shard(gate, rank, tp_size), column_shard(up, rank, tp_size)], dim=0)
    ### END SOLUTION


def shard_state_dict(state: dict[str, torch.Tensor], shape: TPShape, rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s share of a full engine state dict (same keys, smaller tensors).

    Rules by parameter name (the engine's names, see the module docstring):

    * ``...qkv_proj.weight`` / ``.bias``: :func:`shard_qkv`.
    * ``...gate_up_proj.weight`` / ``.bias``: :func:`shard_gate_up`.
    * ``...o_proj.weight``, ``...down_proj.weight``: :func:`row_shard`; their biases stay
      whole (added once, after the all-reduce).
    * ``model.embed_tokens.weight``, ``lm_head.weight``: :func:`column_shard` (vocabulary rows).
    * ``...norm.weight`` (every RMSNorm): replicated, the same tensor on every rank.
    * anything else: ``ValueError`` naming the key.

    Calls :func:`check_tp_size` first.
    """
    check_tp_size(shape, tp_size)
    ### BEGIN SOLUTION
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".qkv_proj." in name:
            out[name] = shard_qkv(tensor, shape, rank, tp_size)
        elif ".gate_up_proj." in name:
            out[name] = shard_gate_up(tensor, shape, rank, tp_size)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = row_shard(tensor, rank, tp_size)
        elif name.endswith(("o_proj.bias", "down_proj.bias", "norm.weight")):
            out[name] = tensor
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = column_shard(tensor, rank, tp_size)
        else:
            raise ValueError(f"do not know how to shard parameter {name!r}")
    return out
    ### END SOLUTION

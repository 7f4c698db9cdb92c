"""Part 9b: pipeline parallelism, the decoder split into stages (GPipe, Huang et al. 2019).

Tensor parallelism (Part 9) splits every layer across ranks and pays two all-reduces
per layer. Pipeline parallelism splits the *stack*: rank ``s`` of ``p`` holds a
contiguous run of decoder layers, the embedding sits on the first stage, the final
norm and the LM head on the last, and the ranks exchange one activation per step with
point-to-point ``send`` / ``recv``. Memory per rank drops to about ``1/p`` (the
embedding and the LM head stay whole on their stages); communication drops to one
``[T, hidden]`` hand-off per stage boundary.

The price is the *bubble*: a stage waits for the previous one. With ``m`` micro-batches
of equal cost through ``p`` stages, GPipe's schedule keeps each stage busy ``m`` slots
out of ``m + p - 1``, so the idle fraction is ``(p - 1) / (m + p - 1)`` (GPipe, section
2.2). vLLM keeps ``p`` micro-batches in flight, one per *virtual engine*: each request
belongs to one virtual engine with its own scheduler and share of the KV blocks, so a
sequence is never in two micro-batches at once.

The residual stream travels as two tensors, vLLM's ``IntermediateTensors``
(``hidden_states``, ``residual``): a stage hands over the last layer's MLP output and
the stream before it, and the next stage adds them. Forget the residual and every later
stage works on the MLP's output alone.

Parameter names are the engine's (:mod:`servinglab.model.llama`): ``model.embed_tokens.weight``,
``model.layers.{i}.*``, ``model.norm.weight``, ``lm_head.weight`` (absent when the
embeddings are tied, as in SmolLM2).
"""

from __future__ import annotations

import re
from collections.abc import Sequence as Seq
from typing import Any

import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """``[start, end)`` of the decoder layers stage ``pp_rank`` of ``pp_size`` runs.

    Contiguous, in order, covering ``0 .. num_layers - 1`` exactly once. Each stage gets
    ``num_layers // pp_size`` layers; the ``num_layers % pp_size`` extra layers go one
    each to the stages just *before* the last (the last stage also runs the norm and the
    LM head), vLLM's ``get_pp_indices``: 5 layers on 3 stages are ``[0, 2)``, ``[2, 4)``,
    ``[4, 5)``.

    Raises:
        ValueError: naming ``pipeline_parallel_size`` when it is not a positive int or
            exceeds ``num_layers`` (a stage with no layer), naming ``pp_rank`` when it is
            outside ``0 .. pp_size - 1``.
    """
    if isinstance(pp_size, bool) or not isinstance(pp_size, int) or pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be a positive integer, got {pp_size!r}")
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) must be <= num_hidden_layers ({num_layers}): every stage needs a layer")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in 0..{pp_size - 1}, got {pp_rank}")
    ### BEGIN SOLUTION
    sizes = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        sizes[-i] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]
    ### END SOLUTION


def stage_state_dict(state: dict[str, torch.Tensor], num_layers: int, pp_rank: int, pp_size: int,
                     tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The weights stage ``pp_rank`` holds, with its layers renumbered from 0.

    * ``model.layers.{i}.<rest>`` for ``i`` in :func:`stage_layers` becomes
      ``model.layers.{i - start}.<rest>``; other layers are left out.
    * ``model.embed_tokens.weight``: on the first stage only.
    * ``model.norm.weight`` and ``lm_head.weight``: on the last stage only. With tied
      embeddings the full state has no ``lm_head.weight``: the last stage gets the
      embedding matrix under ``lm_head.weight`` (the first and last stage then each
      hold a copy, unless they are the same stage, which keeps the tied embedding).
    * any other key: ``ValueError`` naming it.
    """
    start, end = stage_layers(num_layers, pp_rank, pp_size)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    ### BEGIN SOLUTION
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match:
            i = int(match.group(1))
            if start <= i < end:
                out[f"model.layers.{i - start}.{match.group(2)}"] = tensor
        elif name == "model.embed_tokens.weight":
            if first:
                out[name] = tensor
            if last and tie_word_embeddings and not first:
                out["lm_head.weight"] = tensor
        elif name in ("model.norm.weight", "lm_head.weight"):
            if last:
                out[name] = tensor
        else:
            raise ValueError(f"do not know which stage holds parameter {name!r}")
    return out
    ### END SOLUTION


def stage_forward(layers: Seq[Any], hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  metadata: Any, kv_caches: Seq[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one stage's decoder layers; return what goes to the next stage.

    The residual stream entering the stage is ``hidden + residual`` (just ``hidden``
    on the first stage, where ``residual`` is ``None``: the embedding). Every layer but
    the last is ``x = layer(x, cos, sin, metadata, kv_cache)``. The last layer is
    opened up, as vLLM's layers return it: ``residual = x + attn(input_layernorm(x))``
    and ``hidden = mlp(post_attention_layernorm(residual))`` (the layer's output is
    their sum, which the next stage, or the final norm, forms). Attribute names:
    ``layer.input_layernorm``, ``layer.self_attn(h, cos, sin, metadata, kv_cache)``,
    ``layer.post_attention_layernorm``, ``layer.mlp``.

    Returns:
        ``(hidden, residual)``, both ``[T, hidden_size]``.
    """
    ### BEGIN SOLUTION
    x = hidden if residual is None else hidden + residual
    for layer, kv_cache in zip(layers[:-1], kv_caches[:-1]):
        x = layer(x, cos, sin, metadata, kv_cache)
    last = layers[-1]
    residual = x + last.self_attn(last.input_layernorm(x), cos, sin, metadata, kv_caches[-1])
    return last.mlp(last.post_attention_layernorm(residual)), residual
    ### END SOLUTION


def pick_virtual_engine(num_unfinished: Seq[int]) -> int:
    """The virtual engine a new request joins: the one with the fewest unfinished requests.

    Ties go to the lowest index (vLLM v0's ``add_request`` over its ``pp_size`` schedulers).
    """
    ### BEGIN SOLUTION
    return min(range(len(num_unfinished)), key=lambda i: (num_unfinished[i], i))
    ### END SOLUTION


def gpipe_bubble_fraction(pp_size: int, num_microbatches: int) -> float:
    """GPipe's idle fraction ``(p - 1) / (m + p - 1)`` for ``m`` equal micro-batches through ``p`` stages.

    Raises ``ValueError`` naming the parameter when either is below 1.
    """
    ### BEGIN SOLUTION
    if pp_size < 1 or num_microbatches < 1:
        raise ValueError(f"pp_size and num_microbatches must be >= 1, got {pp_size} and {num_microbatches}")
    return (pp_size - 1) / (num_microbatches + pp_size - 1)
    ### END SOLUTION


def measured_bubble_fraction(busy: Seq[Seq[tuple[float, float]]]) -> float:
    """The idle share of ``p`` stages: ``1 - total busy time / (p x makespan)``.

    ``busy[s]`` lists stage ``s``'s compute intervals ``(start, end)`` in seconds on one
    clock; the makespan runs from the earliest start to the latest end of any stage.
    """
    ### BEGIN SOLUTION
    starts = [a for stage in busy for a, _ in stage]
    ends = [b for stage in busy for _, b in stage]
    makespan = max(ends) - min(starts)
    total = sum(b - a for stage in busy for a, b in stage)
    return 1.0 - total / (len(busy) * makespan)
    ### END SOLUTION

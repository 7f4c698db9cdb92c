# Exercise stub generated from solutions/pipeline_parallel.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
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
    raise NotImplementedError("stage_layers: your code here")


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
    raise NotImplementedError("stage_state_dict: your code here")


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
    raise NotImplementedError("stage_forward: your code here")


def pick_virtual_engine(num_unfinished: Seq[int]) -> int:
    """The virtual engine a new request joins: the one with the fewest unfinished requests.

    Ties go to the lowest index (vLLM v0's ``add_request`` over its ``pp_size`` schedulers).
    """
    raise NotImplementedError("pick_virtual_engine: your code here")


def gpipe_bubble_fraction(pp_size: int, num_microbatches: int) -> float:
    """GPipe's idle fraction ``(p - 1) / (m + p - 1)`` for ``m`` equal micro-batches through ``p`` stages.

    Raises ``ValueError`` naming the parameter when either is below 1.
    """
    raise NotImplementedError("gpipe_bubble_fraction: your code here")


def measured_bubble_fraction(busy: Seq[Seq[tuple[float, float]]]) -> float:
    """The idle share of ``p`` stages: ``1 - total busy time / (p x makespan)``.

    ``busy[s]`` lists stage ``s``'s compute intervals ``(start, end)`` in seconds on one
    clock; the makespan runs from the earliest start to the latest end of any stage.
    """
    raise NotImplementedError("measured_bubble_fraction: your code here")

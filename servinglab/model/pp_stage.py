"""One pipeline stage of the Llama model (Part 9b), optionally tensor-parallel inside (Part 9).

A stage is the ordinary engine model built from a config with only the stage's
``num_hidden_layers`` (the student's ``stage_layers``), loaded with the student's
``stage_state_dict`` (layers renumbered from 0), then stripped: the embedding stays on
the first stage only, the final norm and the LM head on the last only. With
``tensor_parallel_size > 1`` the stage is a :class:`~servinglab.model.tp_layers.TPLlamaForCausalLM`
whose collectives run in the stage's own tensor-parallel group, and its weights are
the student's ``shard_state_dict`` of the stage's weights.

:meth:`PPStage.forward_stage` runs the stage's layers through the student's
``stage_forward``, which returns vLLM's pair ``(hidden_states, residual)``; the last
stage adds them, applies the norm and computes the logits of the sampling rows.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from servinglab.impl import load_part
from servinglab.model.llama import KVCache, LlamaForCausalLM


def pp_part() -> ModuleType:
    """The Part 9b module of the implementation :mod:`servinglab.impl` selects."""
    return load_part("pipeline_parallel")


def stage_config(full_config: LlamaConfig, pp_rank: int, pp_size: int) -> LlamaConfig:
    """The config of stage ``pp_rank``: its layer count; untied LM head when the stages are several."""
    start, end = pp_part().stage_layers(full_config.num_hidden_layers, pp_rank, pp_size)
    values = full_config.to_dict()
    values["num_hidden_layers"] = end - start
    if pp_size > 1:  # the last stage holds its own copy of a tied embedding as lm_head
        values["tie_word_embeddings"] = False
    return LlamaConfig.from_dict(values)


def max_stage_layers(num_layers: int, pp_size: int) -> int:
    """The most layers any stage holds (sizes every stage's KV pool to the same block count)."""
    return max(b - a for a, b in (pp_part().stage_layers(num_layers, r, pp_size) for r in range(pp_size)))


class PPStage:
    """Stage ``pp_rank`` of ``pp_size``, tensor-parallel rank ``tp_rank`` of ``tp_size`` inside it.

    Attributes:
        model: the stage's model (its ``model.layers`` are the stage's layers only).
        first, last: whether this stage holds the embedding / the norm and LM head.
    """

    def __init__(self, full_config: LlamaConfig, state: dict[str, torch.Tensor], pp_rank: int, pp_size: int, tp_rank: int,
                 tp_size: int, tp_group: dist.ProcessGroup | None, device: torch.device, dtype: torch.dtype) -> None:
        pp = pp_part()
        self.first, self.last = pp_rank == 0, pp_rank == pp_size - 1
        config = stage_config(full_config, pp_rank, pp_size)
        tied = bool(getattr(full_config, "tie_word_embeddings", False))
        weights = pp.stage_state_dict(state, full_config.num_hidden_layers, pp_rank, pp_size, tied)
        with torch.device("meta"):
            if tp_size > 1:
                from servinglab.model.tp_layers import TPLlamaForCausalLM, shard_for_rank

                model: LlamaForCausalLM = TPLlamaForCausalLM(config, tp_rank, tp_size, tp_group)
            else:
                model = LlamaForCausalLM(config)
        if tp_size > 1:
            weights = shard_for_rank(weights, config, tp_rank, tp_size)
        if not self.first:
            model.model.embed_tokens = None
        if not self.last:
            model.model.norm = None
            model.lm_head = None
        elif pp_size > 1 and "lm_head.weight" not in weights:
            raise ValueError("stage_state_dict must give the last stage an lm_head.weight")
        weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        model.load_state_dict(weights, strict=True, assign=True)
        self.model = model.eval()

    def forward_stage(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: Any, kv_caches: list[KVCache],
                      hidden: torch.Tensor | None, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """This stage's ``(hidden, residual)`` from the previous stage's (the first stage embeds ``input_ids``)."""
        if self.first:
            hidden, residual = self.model.model.embed_tokens(input_ids), None
        assert hidden is not None
        cos, sin = self.model.rotary_emb.cos_sin(positions, hidden.dtype)
        return pp_part().stage_forward(self.model.model.layers, hidden, residual, cos, sin, metadata, kv_caches)

    def logits(self, hidden: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Last stage: ``norm(hidden + residual)`` of the sampling rows through the LM head (float32)."""
        return self.model.compute_logits(self.model.model.norm((hidden + residual)[rows]))

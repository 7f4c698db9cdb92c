"""One rank's shard of the Llama model: the engine's decoder with parallel layers swapped in.

The sharded model is the ordinary :class:`~servinglab.model.llama.LlamaForCausalLM`
built from a *per-rank config* (``num_attention_heads / k`` heads, ``num_key_value_heads
/ k`` KV heads, ``intermediate_size / k``, ``vocab_size / k``, an explicit ``head_dim``),
so the column-parallel layers (``qkv_proj``, ``gate_up_proj``) are just smaller
``nn.Linear`` modules and attention runs unchanged on the local heads. Three kinds of
module are then swapped in, each calling the student's Part 9
(``load_part("tensor_parallel")``):

* :class:`RowParallelLinear` for ``o_proj`` and ``down_proj``: partial product, one
  all-reduce (``row_parallel_linear``);
* :class:`VocabParallelEmbedding` for ``embed_tokens``: masked lookup, one all-reduce;
* :meth:`TPLlamaForCausalLM.compute_logits`: the local vocabulary slice of the logits,
  then ``gather_logits`` (one ``all_gather_into_tensor``).

Per token and layer that is 2 all-reduces of ``hidden`` elements (Megatron's count),
plus one embedding all-reduce and one logits gather per step.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaConfig

from servinglab.impl import load_part
from servinglab.model.llama import LlamaForCausalLM


def tp_part() -> ModuleType:
    """The Part 9 module of the implementation :mod:`servinglab.impl` selects."""
    return load_part("tensor_parallel")


def local_config(config: LlamaConfig, tp_size: int) -> LlamaConfig:
    """The config one of ``tp_size`` ranks builds its model from (raises Part 9's divisibility errors)."""
    tp = tp_part()
    shape = tp.TPShape.from_config(config)
    local = tp.local_shape(shape, tp_size)
    values = config.to_dict()
    values.update(
        num_attention_heads=local.num_heads,
        num_key_value_heads=local.num_kv_heads,
        intermediate_size=local.intermediate_size,
        vocab_size=local.vocab_size,
        head_dim=shape.head_dim,  # explicit: hidden_size // local heads would be wrong
    )
    return LlamaConfig.from_dict(values)


class RowParallelLinear(nn.Module):
    """``o_proj`` / ``down_proj`` on one rank: ``[T, in/k] -> [T, out]`` with one all-reduce.

    The weight is a plain parameter (not an ``nn.Linear``), so the CPU kernel packing of
    :mod:`servinglab.model.cpu_gemm` leaves it alone and the student's function runs.
    """

    def __init__(self, in_local: int, out_features: int, bias: bool, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_part().row_parallel_linear(x, self.weight, self.bias, self.group)


class VocabParallelEmbedding(nn.Module):
    """``embed_tokens`` on one rank: rows ``vocab_start .. vocab_start + V/k - 1`` of the table."""

    def __init__(self, local_vocab: int, hidden: int, vocab_start: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(local_vocab, hidden))
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return tp_part().vocab_parallel_embedding(input_ids, self.weight, self.vocab_start, self.group)


class TPLlamaForCausalLM(LlamaForCausalLM):
    """Rank ``rank`` of ``tp_size``: the decoder on its local heads and features.

    Args:
        full_config: the whole model's config (the per-rank one is derived from it).
        rank, tp_size: this rank and the tensor-parallel size.
        group: the tensor-parallel process group (``None``: the default group).

    Load the rank's weights with ``load_state_dict(shard_state_dict(full_state, ...))``:
    parameter names and the fused ``qkv_proj`` / ``gate_up_proj`` layout are the
    unsharded model's.
    """

    def __init__(self, full_config: LlamaConfig, rank: int, tp_size: int, group: dist.ProcessGroup | None = None,
                 attention: ModuleType | None = None) -> None:
        config = local_config(full_config, tp_size)
        super().__init__(config, attention)
        self.full_config, self.rank, self.tp_size, self.group = full_config, rank, tp_size, group
        hidden = config.hidden_size
        self.vocab_start = rank * config.vocab_size
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, self.vocab_start, group)
        attn_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.o_proj = RowParallelLinear(attn.num_heads * attn.head_dim, hidden, attn_bias, group)
            layer.mlp.down_proj = RowParallelLinear(config.intermediate_size, hidden, mlp_bias, group)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[S, hidden]`` -> float32 ``[S, vocab]`` on every rank: local slice, then the gather."""
        local = super().compute_logits(hidden)  # [S, vocab / k]: this rank's rows of the LM head
        return tp_part().gather_logits(local.contiguous(), self.group)


def shard_for_rank(state: dict[str, torch.Tensor], full_config: LlamaConfig, rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """The student's ``shard_state_dict`` of a full engine state dict, for ``rank`` of ``tp_size``."""
    tp = tp_part()
    return tp.shard_state_dict(state, tp.TPShape.from_config(full_config), rank, tp_size)


def replicated_names(model: nn.Module) -> list[str]:
    """Parameters every rank holds whole: the RMSNorm weights and row-parallel biases."""
    return [n for n, _ in model.named_parameters() if n.endswith(("norm.weight", "o_proj.bias", "down_proj.bias"))]


def shard_footprint(full_config: LlamaConfig, tp_size: int, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Bytes one rank holds, from the rank's own model built on the meta device (no memory used).

    Returns ``weight_bytes`` (all of the rank's parameters), ``replicated_bytes`` (the
    part every rank holds whole) and ``kv_bytes_per_token`` (K and V of the rank's KV
    heads over all layers): the numbers the engine's workers report, for any config.
    """
    with torch.device("meta"):
        model = TPLlamaForCausalLM(full_config, 0, tp_size).to(dtype)
    params = dict(model.named_parameters())
    size = torch.empty((), dtype=dtype).element_size()
    local = model.config
    kv_heads = local.num_key_value_heads
    return {
        "weight_bytes": sum(p.numel() for p in params.values()) * size,
        "replicated_bytes": sum(params[n].numel() for n in replicated_names(model)) * size,
        "kv_bytes_per_token": 2 * local.num_hidden_layers * kv_heads * local.head_dim * size,
    }

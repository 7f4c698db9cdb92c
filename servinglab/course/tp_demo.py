"""Rank functions for notebook 09: the student's Part 9 shards running on real gloo ranks.

:func:`servinglab.model.distributed.run_on_ranks` starts processes with the ``spawn``
method, which imports the function to run by its module name: a function defined in a
notebook cell cannot be found that way, so the notebook's rank functions live here.

:func:`layer_rank` runs one tiny Llama decoder layer twice on every rank: whole (the
full weights, plain ``F.linear``) and sharded (the student's ``shard_state_dict`` and
``row_parallel_linear``), and counts the collectives the sharded one made.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from servinglab import impl

SHAPE = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=256)


def tiny_layer_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of one decoder layer (engine names, fused qkv and gate_up), float32."""
    g = torch.Generator().manual_seed(seed)
    h, d, inter = SHAPE["hidden_size"], SHAPE["head_dim"], SHAPE["intermediate_size"]
    qkv = (SHAPE["num_heads"] + 2 * SHAPE["num_kv_heads"]) * d
    p = "model.layers.0."
    return {
        p + "input_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        p + "self_attn.qkv_proj.weight": torch.randn(qkv, h, generator=g) / h**0.5,
        p + "self_attn.o_proj.weight": torch.randn(h, SHAPE["num_heads"] * d, generator=g) / h**0.5,
        p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        p + "mlp.gate_up_proj.weight": torch.randn(2 * inter, h, generator=g) / h**0.5,
        p + "mlp.down_proj.weight": torch.randn(h, inter, generator=g) / inter**0.5,
    }


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def layer(x: torch.Tensor, sd: dict[str, torch.Tensor], heads: int, kv_heads: int, row_linear) -> torch.Tensor:
    """One decoder layer (no RoPE: it acts per head and does not change how heads split)."""
    t, d, p = x.shape[0], SHAPE["head_dim"], "model.layers.0."
    qkv = F.linear(_rms(x, sd[p + "input_layernorm.weight"]), sd[p + "self_attn.qkv_proj.weight"])
    q, k, v = (z.view(t, -1, d).transpose(0, 1) for z in qkv.split([heads * d, kv_heads * d, kv_heads * d], -1))
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(t, heads * d)
    x = x + row_linear(att, sd[p + "self_attn.o_proj.weight"], None)
    gate, up = F.linear(_rms(x, sd[p + "post_attention_layernorm.weight"]), sd[p + "mlp.gate_up_proj.weight"]).chunk(2, -1)
    return x + row_linear(F.silu(gate) * up, sd[p + "mlp.down_proj.weight"], None)


def layer_rank(rank: int, world: int, impl_name: str, num_tokens: int = 8) -> dict[str, Any]:
    """On one rank: the sharded layer vs the whole layer, and the collectives it used."""
    tp = impl.load_part("tensor_parallel", impl_name)
    sd = tiny_layer_state()
    x = torch.randn(num_tokens, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(1))
    whole = layer(x, sd, SHAPE["num_heads"], SHAPE["num_kv_heads"], lambda a, w, b: F.linear(a, w, b))
    calls = {"all_reduce": 0, "elements": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls["all_reduce"] += 1
        calls["elements"] += tensor.numel()
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # this process only: count what the student's code sends
    try:
        local = tp.shard_state_dict(sd, tp.TPShape(**SHAPE), rank, world)
        sharded = layer(x, local, SHAPE["num_heads"] // world, SHAPE["num_kv_heads"] // world, tp.row_parallel_linear)
    finally:
        dist.all_reduce = real_all_reduce
    return {
        "rank": rank,
        "max_abs_error": float((sharded - whole).abs().max()),
        "all_reduce_calls": calls["all_reduce"],
        "all_reduce_elements": calls["elements"],
        "local_weight_elements": sum(v.numel() for v in local.values()),
        "whole_weight_elements": sum(v.numel() for v in sd.values()),
    }

"""The decoder's forward pass on CUDA, with fused kernels (the CPU path never comes here).

:class:`~servinglab.model.llama.LlamaForCausalLM` written layer by layer in PyTorch
launches about 44 kernels per layer (RMSNorm alone is six element-wise ops); on a GPU
each launch costs microseconds of host time while a small model's kernels run for less
than that, so the step is host-bound. This forward runs the *same parameters* with
about ten launches per layer (vLLM's layout):

``qkv GEMM -> RoPE in place -> KV write -> attention -> o GEMM -> add+RMSNorm ->
gate_up GEMM -> SiLU*up -> down GEMM -> add+RMSNorm``

with the residual stream carried beside the hidden state, so each residual add is
fused into the next norm (:mod:`servinglab.model.triton.rmsnorm`). Attention goes
through :mod:`servinglab.model.attention_backend` (Triton, block tables read in place).
Nothing here reads a device tensor on the host, so a decode step can be captured as one
CUDA graph (:mod:`servinglab.model.cuda_graphs`).
"""

from __future__ import annotations

import torch

from servinglab.interfaces import AttentionMetadata
from servinglab.model import attention_backend
from servinglab.model.llama import KVCache, LlamaForCausalLM, rope_theta_of
from servinglab.model.triton.rmsnorm import rms_norm
from servinglab.model.triton.rope import apply_rope_, rope_cos_sin_cache
from servinglab.model.triton.silu_mul import silu_and_mul


class FusedForward:
    """``forward(input_ids, positions, metadata, kv_caches) -> hidden`` of a model, fused.

    Args:
        model: the model on a CUDA device (weights loaded).
    """

    def __init__(self, model: LlamaForCausalLM) -> None:
        config = model.config
        first = model.model.layers[0].self_attn
        self.model = model
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        device = model.lm_head_weight.device
        max_pos = int(getattr(config, "max_position_embeddings", 8192))
        self.cos, self.sin = rope_cos_sin_cache(self.head_dim, rope_theta_of(config), max_pos, device)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata, kv_caches: list[KVCache]
    ) -> torch.Tensor:
        layers = self.model.model.layers
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        residual = self.model.model.embed_tokens(input_ids)
        first_norm = layers[0].input_layernorm
        hidden = rms_norm(residual, first_norm.weight, first_norm.eps)
        num_tokens = residual.shape[0]
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches)):
            attn = layer.self_attn
            qkv = attn.qkv_proj(hidden)
            apply_rope_(qkv, positions, self.cos, self.sin, heads + kv_heads, dim)
            q = qkv[:, : heads * dim].view(num_tokens, heads, dim)
            k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(num_tokens, kv_heads, dim)
            v = qkv[:, (heads + kv_heads) * dim :].view(num_tokens, kv_heads, dim)
            attention_backend.write_to_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
            out = attention_backend.paged_attention(q, k_cache, v_cache, metadata, attn.scale)
            out = attn.o_proj(out.view(num_tokens, heads * dim))
            norm = layer.post_attention_layernorm
            hidden = rms_norm(out, norm.weight, norm.eps, residual=residual)  # residual += attention
            mlp = layer.mlp
            out = mlp.down_proj(silu_and_mul(mlp.gate_up_proj(hidden)))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.model.norm
            hidden = rms_norm(out, norm.weight, norm.eps, residual=residual)  # residual += mlp
        return hidden


def enable_gpu_kernels(model: LlamaForCausalLM) -> FusedForward:
    """Switch a CUDA model to the Triton attention backend and the fused forward; return it."""
    if model.lm_head_weight.device.type != "cuda":
        raise ValueError(f"enable_gpu_kernels needs the model on a CUDA device, it is on {model.lm_head_weight.device}")
    model.set_attention(attention_backend)
    fused = FusedForward(model)
    model.set_fused_forward(fused)
    return fused

"""The decoder's forward pass on CUDA, with fused kernels (the CPU path never comes here).

:class:`~servinglab.model.llama.LlamaForCausalLM` written layer by layer in PyTorch
launches about 44 kernels per layer (RMSNorm alone is six element-wise ops); on a GPU
each launch costs microseconds of host time while a small model's kernels run for less
than that, so the step is host-bound. This forward runs the *same parameters* with
eight or nine launches per layer (vLLM's layout, two fusions further):

``qkv GEMM -> RoPE in place + KV write -> attention -> o GEMM -> add+RMSNorm ->
gate_up GEMM (+ SiLU*up at small batch) [-> SiLU*up] -> down GEMM -> add+RMSNorm``

with the residual stream carried beside the hidden state, so each residual add is
fused into the next norm (:mod:`servinglab.model.triton.rmsnorm`). At batch 1..16 the
projections whose weights are small run :mod:`servinglab.model.triton.small_gemm`
instead of cuBLAS (``worth_it`` holds the measured rule); quantized projections run the
fused dequantizing kernel (:mod:`servinglab.model.quant_gemm`, Part 8b). Attention goes
through :mod:`servinglab.model.attention_backend` (Triton, block tables read in place).
Nothing here reads a device tensor on the host, so a decode step can be captured as one
CUDA graph (:mod:`servinglab.model.cuda_graphs`).
"""

from __future__ import annotations

import torch

from servinglab.interfaces import AttentionMetadata
from servinglab.model import attention_backend
from servinglab.model.llama import KVCache, LlamaForCausalLM, rope_theta_of
from servinglab.model.fp8_linear import fp8_linear
from servinglab.model.quant_gemm import is_quantized, quant_linear
from servinglab.model.triton.interpret import interpreting
from servinglab.model.triton.rmsnorm import rms_norm
from servinglab.model.triton.rope import rope_cos_sin_cache
from servinglab.model.triton.rope_cache import rope_and_cache_
from servinglab.model.triton.silu_mul import silu_and_mul
from servinglab.model.triton.small_gemm import small_gemm, worth_it


def _small(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """A plain bias-free half-precision ``nn.Linear`` on a shape where :func:`small_gemm` wins."""
    if type(layer) is not torch.nn.Linear or layer.bias is not None or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return worth_it(x.shape[0], layer.out_features, layer.in_features)


def project(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, through the small-batch kernel where it wins (:func:`~.small_gemm.worth_it`).

    Quantized layers (Part 8a's codes) run the fused dequantizing kernel of Part 8b
    (:mod:`servinglab.model.quant_gemm`); tensor-parallel layers keep their own forward.
    """
    if is_quantized(layer):
        return quant_linear(layer, x)
    if getattr(layer, "method", None) == "fp8":  # quantization="fp8" (servinglab.model.fp8_linear)
        return fp8_linear(layer, x)
    return small_gemm(x, layer.weight) if _small(layer, x) else layer(x)


def gated_mlp_input(gate_up: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up(x)``: one kernel at small batch, else the GEMM then :func:`silu_and_mul`."""
    return small_gemm(x, gate_up.weight, gated=True) if _small(gate_up, x) else silu_and_mul(project(gate_up, x))


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
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata, kv_caches: list[KVCache],
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """The hidden states after the final norm; ``num_layers``: an early exit after that many layers."""
        layers = self.model.model.layers
        if num_layers is not None:  # (slicing a ModuleList builds a new one: not on every plain step)
            layers = layers[:num_layers]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        residual = self.model.model.embed_tokens(input_ids)
        first_norm = layers[0].input_layernorm
        hidden = rms_norm(residual, first_norm.weight, first_norm.eps)
        num_tokens = residual.shape[0]
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches)):
            attn = layer.self_attn
            qkv = project(attn.qkv_proj, hidden)
            # RoPE on q and k, then k and v to their slots: one kernel (rope_cache.py).
            rope_and_cache_(qkv, positions, self.cos, self.sin, k_cache, v_cache, metadata.slot_mapping, heads, kv_heads)
            q = qkv[:, : heads * dim].view(num_tokens, heads, dim)
            out = attention_backend.paged_attention(q, k_cache, v_cache, metadata, attn.scale)
            out = project(attn.o_proj, out.view(num_tokens, heads * dim))
            norm = layer.post_attention_layernorm
            hidden = rms_norm(out, norm.weight, norm.eps, residual=residual)  # residual += attention
            mlp = layer.mlp
            out = project(mlp.down_proj, gated_mlp_input(mlp.gate_up_proj, hidden))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.model.norm
            hidden = rms_norm(out, norm.weight, norm.eps, residual=residual)  # residual += mlp
        return hidden


def enable_gpu_kernels(model: LlamaForCausalLM) -> FusedForward:
    """Switch a CUDA model to the Triton attention backend and the fused forward; return it."""
    if model.lm_head_weight.device.type != "cuda" and not interpreting():
        raise ValueError(f"enable_gpu_kernels needs the model on a CUDA device, it is on {model.lm_head_weight.device}")
    model.set_attention(attention_backend)
    fused = FusedForward(model)
    model.set_fused_forward(fused)
    return fused

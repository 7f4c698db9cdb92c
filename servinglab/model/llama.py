"""A Llama-family decoder (SmolLM2, Llama, Qwen2-like shapes) that runs over the paged KV cache.

The model sees one *flattened* batch: ``T`` new tokens from any mix of sequences, with
their positions. Everything about how those tokens are grouped into sequences lives in
an :class:`~servinglab.interfaces.AttentionMetadata`, which only the attention layers
read, and they hand it straight to Part 3 (``write_to_kv_cache`` then
``paged_attention``). Every other layer is per-token, so batching is invisible to it:
the split nano-vllm and vLLM use.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` except two fused projections,
as in vLLM: ``qkv_proj`` (q, k and v stacked) and ``gate_up_proj`` (gate and up stacked),
which turn seven small matrix products per layer into four
(:func:`servinglab.weights.hf_to_fused` maps the names).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

from servinglab import impl
from servinglab.model import cpu_gemm
from servinglab.interfaces import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]


def rope_theta_of(config: LlamaConfig) -> float:
    """Return the RoPE base of a config; raise for RoPE variants this model does not implement."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported (config.rope_parameters / rope_scaling); "
            "only the default RoPE (rope_scaling=None) is implemented"
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32 like transformers."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``[T, hidden]`` rows to unit RMS, then scale by the learned weight."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight multiply: transformers' order, so bf16 results match.
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021, "RoFormer"), transformers' rotate-half layout.

    Dimension pairs are ``(i, i + head_dim/2)``, not adjacent ones: Llama checkpoints are
    stored for this layout, so the pairing must match them exactly.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # Kept out of the state dict and out of .to(dtype): the frequencies stay float32
        # even when the weights are bfloat16 (transformers computes them the same way).
        self._inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` of ``position * inv_freq``, each ``[T, 1, head_dim/2]`` in ``dtype``."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[T, heads, head_dim]``: each pair ``(x1, x2)`` turns by its angle."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention (Ainslie et al., 2023) whose K/V live in the paged cache."""

    def __init__(self, config: LlamaConfig, attention: ModuleType) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        self.scale = self.head_dim**-0.5
        bias = bool(getattr(config, "attention_bias", False))
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attention = attention  # Part 3's module: write_to_kv_cache, paged_attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metadata: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """``[T, hidden]`` -> ``[T, hidden]``; writes this step's K/V into ``kv_cache`` first."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k sit side by side in the fused output: rotate them with one call.
        qk_heads = self.num_heads + self.num_kv_heads
        qk = RotaryEmbedding.apply(qkv[:, : qk_heads * self.head_dim].view(num_tokens, qk_heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, qk_heads * self.head_dim :].view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        self.attention.write_to_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        out = self.attention.paged_attention(q, k_cache, v_cache, metadata, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SiLU-gated feed-forward block (SwiGLU, Shazeer, 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported; only 'silu'")
        bias = bool(getattr(config, "mlp_bias", False))
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, hidden]`` -> ``[T, hidden]``."""
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, attention: ModuleType) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, metadata: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """One decoder layer over the flattened batch."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, metadata, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm (Hugging Face's ``model.*`` prefix)."""

    def __init__(self, config: LlamaConfig, attention: ModuleType) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attention) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache.

    Args:
        config: a transformers ``LlamaConfig`` (SmolLM2-135M-Instruct's, or a tiny one).
        attention: the Part 3 module to call; ``None`` loads ``paged_attention`` from the
            implementation :mod:`servinglab.impl` selects (student's or reference).

    Call :meth:`forward` for the hidden states of a flattened batch and
    :meth:`compute_logits` on the rows that sample a token.
    """

    def __init__(self, config: LlamaConfig, attention: ModuleType | None = None) -> None:
        super().__init__()
        self.config = config
        self.attention = attention if attention is not None else impl.load_part("paged_attention")
        self.model = LlamaModel(config, self.attention)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(head_dim, rope_theta_of(config))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Tied embeddings (SmolLM2): the output projection *is* the embedding matrix, so
        # there is no separate lm_head parameter to load or store.
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._cpu_lm_head: cpu_gemm.CpuLinear | None = None  # set by prepack_cpu_weights
        self._fused_forward: Callable[..., torch.Tensor] | None = None  # set by set_fused_forward (CUDA)

    def set_attention(self, attention: ModuleType) -> None:
        """Route every layer's attention through ``attention`` (Part 3's two functions).

        On CUDA the engine passes :mod:`servinglab.model.attention_backend` (Triton kernels).
        """
        self.attention = attention
        for layer in self.model.layers:
            layer.self_attn.attention = attention

    def set_fused_forward(self, forward: Callable[..., torch.Tensor] | None) -> None:
        """Let :meth:`forward` call ``forward`` instead (same arguments and result; ``None``: the
        PyTorch layers). :func:`servinglab.model.gpu_ops.enable_gpu_kernels` installs the fused
        CUDA forward here; kept out of the module tree, so it is no submodule or state."""
        self.__dict__["_fused_forward"] = forward

    def prepack_cpu_weights(self, mode: str | None = None) -> int:
        """Pre-pack the matrix-product weights for oneDNN (bfloat16/float16 on a CPU).

        Call it after the weights are loaded; it is a no-op elsewhere. See
        :mod:`servinglab.model.cpu_gemm` for the kernels and why they are faster.

        Args:
            mode: ``auto``, ``onednn`` or ``torch`` (``None``: ``SERVINGLAB_CPU_GEMM``).

        Returns:
            How many linear layers were packed (0 when packing does not apply).
        """
        packed = cpu_gemm.prepack_linears(self.model, mode)
        if packed:
            # Logits rows are few (one per sampling sequence): the packed bf16 copy is
            # the fast one, and a float32 copy of the 49152-row head would cost 113 MB.
            self.__dict__["_cpu_lm_head"] = cpu_gemm.CpuLinear.from_weight(self.lm_head_weight, None, sgemm=False)
        return packed

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[vocab, hidden]``: the embedding matrix when tied, else ``lm_head.weight``."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_caches: list[KVCache],
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Run the decoder over ``T`` new tokens of a flattened batch.

        Args:
            input_ids: ``[T]`` int64 token ids.
            positions: ``[T]`` int64, each token's position in its own sequence (RoPE angle).
            metadata: slot mapping, block tables and lengths for Part 3.
            kv_caches: one ``(k_cache, v_cache)`` per layer; this step's K/V are written in.
            num_layers: run only the first ``num_layers`` decoder layers, then the final norm
                (an *early exit*, the draft of self-speculative decoding: its K/V for those
                layers are the target's own, written into the same caches); ``None``: all.

        Returns:
            ``[T, hidden]`` hidden states after the final norm.
        """
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model has {len(self.model.layers)}")
        if num_layers is not None and not 1 <= num_layers <= len(self.model.layers):
            raise ValueError(f"num_layers must be in [1, {len(self.model.layers)}] or None, got {num_layers!r}")
        if self._fused_forward is not None:
            return self._fused_forward(input_ids, positions, metadata, kv_caches, num_layers)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, x.dtype)  # shared by every layer
        for layer, kv_cache in zip(self.model.layers[:num_layers], kv_caches):
            x = layer(x, cos, sin, metadata, kv_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[S, hidden]`` -> float32 ``[S, vocab]`` (call it only on rows that sample)."""
        if self._cpu_lm_head is not None:
            return self._cpu_lm_head(hidden).float()
        return F.linear(hidden, self.lm_head_weight).float()

"""Weights for :class:`servinglab.model.LlamaForCausalLM`: load a Hugging Face folder, make tiny random models.

Hugging Face stores q/k/v and gate/up as separate matrices; our model keeps them stacked
(``qkv_proj``, ``gate_up_proj``, as vLLM does), so loading concatenates them along the
output dimension and :func:`fused_to_hf` splits them back. With tied embeddings the
checkpoint's ``lm_head.weight`` (if present) is the embedding matrix and is dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import LlamaConfig

from servinglab.model.llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)$")
_STACKS = {"self_attn": ("qkv_proj", ("q", "k", "v")), "mlp": ("gate_up_proj", ("gate", "up"))}


def hf_to_fused(hf_state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face ``LlamaForCausalLM`` parameter names onto ours (stacking q/k/v and gate/up)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed from the config / the same matrix as the embedding
        m = _LAYER.match(name)
        if m is None:
            out[name] = tensor
            continue
        layer, block, proj, kind = m.groups()
        key = f"model.layers.{layer}.{block}.{_STACKS[block][0]}.{kind}"
        parts.setdefault(key, {})[proj] = tensor
    for key, pieces in parts.items():
        order = _STACKS[key.split(".")[3]][1]  # the stacking order is the model's split order
        missing = [p for p in order if p not in pieces]
        if missing:
            raise KeyError(f"checkpoint lacks {missing} projections for {key}")
        out[key] = torch.cat([pieces[p] for p in order], dim=0)
    return out


def fused_to_hf(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_fused`: our state dict in Hugging Face names."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qkv_sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".qkv_proj." in name:
            for proj, piece in zip("qkv", tensor.split(qkv_sizes, dim=0)):
                out[name.replace("qkv_proj", f"{proj}_proj")] = piece.clone()
        elif ".gate_up_proj." in name:
            for proj, piece in zip(("gate", "up"), tensor.chunk(2, dim=0)):
                out[name.replace("gate_up_proj", f"{proj}_proj")] = piece.clone()
        else:
            out[name] = tensor
    if getattr(config, "tie_word_embeddings", False):
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def load_config(model_dir: str | Path) -> LlamaConfig:
    """Read ``config.json`` of a Llama-family folder; raise if it is another architecture."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir} (run `servinglab prepare-model` for the course model)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "llama":
        raise ValueError(f"model_type must be 'llama' (LlamaForCausalLM), got {raw.get('model_type')!r} in {path}")
    return LlamaConfig.from_pretrained(model_dir)


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Build our model from a Hugging Face folder (``config.json`` + ``*.safetensors``).

    Args:
        model_dir: the folder ``servinglab prepare-model`` wrote, or any Llama checkpoint.
        dtype: parameter dtype (bfloat16 by default; float32 for exact comparisons).
        device: where the parameters go.

    Returns:
        ``(model, config)``, the model in eval mode.
    """
    from safetensors.torch import load_file

    config = load_config(model_dir)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        hf_state.update(load_file(str(f)))
    state = {k: v.to(device=device, dtype=dtype) for k, v in hf_to_fused(hf_state, config).items()}
    # Built on the meta device: no time spent initialising weights that are overwritten.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), config


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A small Llama config for fast tests: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256."""
    values: dict[str, object] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def random_model(config: LlamaConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """Our model with seeded random weights, scaled so activations and logits stay O(1).

    Norm weights are ``1 + N(0, 0.1)`` rather than ones so a bug that skips a norm's
    weight shows up in comparisons.
    """
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model.to(dtype).eval()


def hf_model_from_state_dict(config: LlamaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """A transformers ``LlamaForCausalLM`` with the weights of ``state`` (our names or Hugging Face's).

    This is the oracle the runtime tests compare against.
    """
    from transformers import LlamaForCausalLM as HFLlamaForCausalLM

    if any(".qkv_proj." in k or ".gate_up_proj." in k for k in state):
        state = fused_to_hf(state, config)
    elif getattr(config, "tie_word_embeddings", False):
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    # Eager attention: the plainest reference (matmul, softmax, matmul).
    config = LlamaConfig.from_dict(config.to_dict(), attn_implementation="eager")
    with torch.device("meta"):
        hf = HFLlamaForCausalLM(config)
    hf.load_state_dict({k: v.detach().to(dtype).clone() for k, v in state.items()}, strict=True, assign=True)
    hf.tie_weights()
    # inv_freq is a non-persistent buffer, left on meta by the meta-device build: recompute it.
    rot = hf.model.rotary_emb
    inv_freq, rot.attention_scaling = rot.compute_default_rope_parameters(config)
    rot.inv_freq = inv_freq
    rot.original_inv_freq = inv_freq.clone()
    return hf.eval()


def to_transformers(model: LlamaForCausalLM, dtype: torch.dtype | None = None):
    """A transformers ``LlamaForCausalLM`` holding the same weights as ``model`` (same dtype by default)."""
    dtype = dtype or next(model.parameters()).dtype
    return hf_model_from_state_dict(model.config, model.state_dict(), dtype)

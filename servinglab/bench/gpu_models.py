"""Random-weight models of real configs, built straight on a GPU (for benchmarks only).

A decode step's speed does not depend on the weights' values, so a GPU machine without
the checkpoints can still measure the real shapes. Configs from each model's
``config.json`` on the Hugging Face Hub (HuggingFaceTB/SmolLM2-135M-Instruct and
HuggingFaceTB/SmolLM2-1.7B; the table in ``docs/references.md``).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from servinglab.model.llama import LlamaForCausalLM
from servinglab.model.weights import fused_to_hf

CONFIGS: dict[str, dict[str, object]] = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    "smollm2-1.7b": dict(
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=130000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
}


def random_config(name: str) -> LlamaConfig:
    """The ``LlamaConfig`` of ``name`` (one of :data:`CONFIGS`)."""
    if name not in CONFIGS:
        raise ValueError(f"random weights must be one of {sorted(CONFIGS)}, got {name!r}")
    return LlamaConfig(**CONFIGS[name])


@torch.no_grad()
def random_gpu_model(name: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cuda") -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Our model with seeded random weights, created on ``device`` (no CPU copy of 1.7B parameters)."""
    config = random_config(name)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for pname, p in model.named_parameters():
        if pname.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
        elif "embed_tokens" in pname:
            p.copy_(torch.randn(p.shape, generator=gen, device=device))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=device) / p.shape[1] ** 0.5)
    return model.eval(), config


def transformers_twin(model: LlamaForCausalLM, config: LlamaConfig):
    """transformers' ``LlamaForCausalLM`` (SDPA attention) holding the same weights, on the same device."""
    from transformers import LlamaForCausalLM as HFLlamaForCausalLM

    state = fused_to_hf(model.state_dict(), config)
    device = model.lm_head_weight.device
    with torch.device(device):
        hf = HFLlamaForCausalLM(LlamaConfig.from_dict(config.to_dict(), attn_implementation="sdpa"))
    hf = hf.to(model.lm_head_weight.dtype)
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf.eval()

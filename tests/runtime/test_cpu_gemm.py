"""The CPU matrix-product kernels (servinglab.model.cpu_gemm): same products, same model, same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from servinglab.model import cpu_gemm
from servinglab.engine.config import EngineConfig
from servinglab.interfaces import AttentionMetadata
from servinglab import LLM, SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config

needs_packing = pytest.mark.skipif(
    not cpu_gemm.packing_supported(torch.bfloat16, torch.device("cpu")),
    reason="this PyTorch build cannot pack bfloat16 weights for oneDNN on this CPU",
)


def bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to bfloat16 rounding of the outputs (a few units in the last place)."""
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@needs_packing
@pytest.mark.parametrize("rows", [1, 7, cpu_gemm.SGEMM_MIN_ROWS - 1, cpu_gemm.SGEMM_MIN_ROWS, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_equals_f_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    fast = cpu_gemm.CpuLinear.from_linear(linear, sgemm=True)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    with torch.inference_mode():
        out = fast(x)
        want = F.linear(x, linear.weight, linear.bias)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 160)
        bf16_close(out, want)
        # Both kernels, whichever one the row count picks.
        bf16_close(fast.forward_packed(x), want)
        bf16_close(fast.forward_sgemm(x), want)
        # The sgemm path is the bf16 product computed exactly, then rounded once.
        exact = (x.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)).to(torch.bfloat16)
        assert (fast.forward_sgemm(x).float() - exact.float()).abs().max() <= exact.float().abs().max() * 2**-7


@needs_packing
def test_packing_keeps_state_dict_and_outputs():
    config = tiny_llama_config()
    model = random_model(config, dtype=torch.bfloat16, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(10, 22)
    meta_args = dict(slot_mapping=torch.arange(12), block_tables=torch.tensor([[0, 1, 2]], dtype=torch.int32),
                     context_lens=torch.tensor([12], dtype=torch.int32), query_start_loc=torch.tensor([0, 12], dtype=torch.int32),
                     max_query_len=12, max_context_len=12, context_lens_list=[12], query_lens_list=[12])

    def logits() -> torch.Tensor:
        shape = (3, 4, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
        caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)) for _ in model.model.layers]
        with torch.inference_mode():
            hidden = model(ids, torch.arange(12), AttentionMetadata(**meta_args), caches)
            return model.compute_logits(hidden)

    before = logits()
    packed = model.prepack_cpu_weights("auto")
    assert packed == 4 * config.num_hidden_layers  # qkv, o, gate_up, down in every layer
    assert all(isinstance(layer.mlp.down_proj, cpu_gemm.CpuLinear) for layer in model.model.layers)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    bf16_close(logits(), before)


def test_float32_and_torch_mode_change_nothing():
    config = tiny_llama_config()
    fp32 = random_model(config, dtype=torch.float32, seed=0)
    assert fp32.prepack_cpu_weights("auto") == 0
    bf16 = random_model(config, dtype=torch.bfloat16, seed=0)
    assert bf16.prepack_cpu_weights("torch") == 0
    assert type(bf16.model.layers[0].self_attn.qkv_proj) is nn.Linear


def test_unknown_mode_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        EngineConfig(cpu_gemm="fast")
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=cpu_gemm.ENV_VAR):
        cpu_gemm.gemm_mode()


@needs_packing
def test_engine_outputs_agree_across_kernels():
    """The same bf16 engine with each strategy: greedy tokens of a tiny model agree."""
    config = tiny_llama_config()
    prompts = [list(range(5 + i, 30 + 3 * i)) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for mode in ("torch", "onednn", "auto"):
        llm = LLM(model_obj=random_model(config, dtype=torch.bfloat16, seed=0), hf_config=config,
                  dtype="bfloat16", cpu_gemm=mode, num_kv_blocks=64, block_size=4, device="cpu")
        layer = llm.engine.model.model.layers[0].self_attn.qkv_proj
        assert isinstance(layer, cpu_gemm.CpuLinear) == (mode != "torch")
        tokens[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for mode in ("onednn", "auto"):
        # Kernels differ only in summation order: a near-tie may flip one greedy choice.
        same = sum(a == b for a, b in zip(tokens["torch"], tokens[mode]))
        assert same >= len(prompts) - 1, f"cpu_gemm={mode}: {same}/{len(prompts)} requests agree with plain F.linear"

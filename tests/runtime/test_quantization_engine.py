"""``LLM(..., quantization="int8" | "int4")`` end to end, and torchao as the library reference.

On the tiny random Llama in float32 the quantized engine must give exactly the greedy
tokens of transformers running the *dequantized* weights (the quantized model computes
with those weights, so any difference is an engine bug, not rounding). Weight bytes must
shrink by the factor the storage formats predict. torchao 0.18 quantizes the same
weights: its INT8 codes use the same per-row symmetric scale, so both dequantized
weights lie within one quantization step of each other; its INT4 kernels do not run on a
CPU, which the skip reason reports as measured.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oracle import hf_greedy
from servinglab import LLM, SamplingParams, impl
from servinglab.engine.config import EngineConfig
from servinglab.model.quant import dequantized_state_dict, quantize_model, weight_bytes
from servinglab.model.weights import hf_model_from_state_dict, random_model, tiny_llama_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPT_LENS = [4, 11, 23]


@pytest.fixture(scope="module")
def tiny():
    config = tiny_llama_config()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    return config, prompts


@pytest.mark.parametrize("method,group_size", [("int8", 64), ("int4", 32), ("int4", 64)])
def test_quantized_engine_matches_transformers_on_dequantized_weights(tiny, method, group_size):
    config, prompts = tiny
    llm = LLM(model_obj=random_model(config, seed=0), hf_config=config, dtype="float32", block_size=4,
              quantization=method, quantization_group_size=group_size)
    quant_linear = impl.load_part("quantization").QuantLinear
    swapped = [m for m in llm.engine.model.modules() if isinstance(m, quant_linear)]
    assert len(swapped) == 4 * config.num_hidden_layers, "every decoder projection should be a QuantLinear"
    hf = hf_model_from_state_dict(config, dequantized_state_dict(llm.engine.model))
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_weight_bytes_shrink_as_the_formats_predict(tiny):
    config, _ = tiny
    dense = weight_bytes(random_model(config, seed=0))
    shapes = [(lin.out_features, lin.in_features) for lin in random_model(config).modules()
              if type(lin) is torch.nn.Linear]
    for method, group in (("int8", 64), ("int4", 32), ("int4", 64)):
        model = random_model(config, seed=0)
        assert quantize_model(model, method, group) == len(shapes)
        got = weight_bytes(model)
        if method == "int8":  # 1 byte a weight + one float32 scale a row
            want = sum(n * k + 4 * n for n, k in shapes)
        else:  # half a byte a weight + one float32 scale a group
            want = sum(n * k // 2 + 4 * n * (k // group) for n, k in shapes)
        assert got.quantized == want and got.dense_linear == 0
        assert got.other == dense.other, "embedding and norms stay as they were"
        assert got.linear < dense.linear / (3.5 if method == "int8" else 6.0)  # from 4-byte float32 weights


def test_bfloat16_cpu_packing_leaves_quantized_layers_alone(tiny):
    config, prompts = tiny
    llm = LLM(model_obj=random_model(config, dtype=torch.bfloat16, seed=0), hf_config=config, dtype="bfloat16", block_size=4,
              device="cpu", quantization="int8", cpu_gemm="auto")
    kinds = {type(m).__name__ for m in llm.engine.model.modules()}
    assert "QuantLinear" in kinds and "CpuLinear" not in kinds
    out = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == GREEDY.max_tokens and all(0 <= t < config.vocab_size for t in out)


def test_cpu_int8pack_for_bfloat16_only():
    """bf16 INT8 layers on a CPU run ``_weight_int8pack_mm`` (close to the float64 product, within bf16
    rounding of the output); float32 layers keep ``QuantLinear.forward`` (exact)."""
    from servinglab.model.quant import use_cpu_int8pack

    q = impl.load_part("quantization")
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(192, 96, bias=False).requires_grad_(False)
    lin.weight.copy_(torch.randn(96, 192, generator=gen) / 14)
    x = torch.randn(5, 192, generator=gen)
    for dtype, used in ((torch.float32, 0), (torch.bfloat16, 1)):
        layer = q.QuantLinear.from_linear(lin, "int8")
        assert use_cpu_int8pack(torch.nn.Sequential(layer), dtype) == used
        out = layer(x.to(dtype))
        expected = x.to(dtype).double() @ layer.dequantized_weight().double().T
        bound = 2 ** -7 * float(expected.abs().max()) if used else 1e-5
        assert out.dtype == dtype and float((out.double() - expected).abs().max()) <= bound


def test_bad_quantization_settings_name_the_parameter(tiny):
    config, _ = tiny
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="nf4")
    with pytest.raises(ValueError, match="quantization_group_size must be one of"):
        EngineConfig(quantization="int4", quantization_group_size=48)
    model = random_model(config, seed=0)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="quantization_group_size=128 must divide"):
        LLM(model_obj=model, hf_config=config, dtype="float32", quantization="int4", quantization_group_size=128)
    assert [type(m) for m in model.modules()] == before, "a rejected group size must leave the model unchanged"


def test_int8_agrees_with_torchao():
    from servinglab.bench.torchao_ref import torchao_dequantized, torchao_int8_linear

    q = impl.load_part("quantization")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(192, 576, generator=gen) / 24
    ours = q.QuantLinear.from_linear(torch.nn.Linear(576, 192, bias=False).requires_grad_(False), "int8")
    ours.qweight, ours.scales = q.quantize_int8(weight)
    ao = torchao_int8_linear(weight)
    w_ours, w_ao = ours.dequantized_weight(), torchao_dequantized(ao)
    step = ours.scales[:, None]
    assert bool(((w_ours - w_ao).abs() <= step * 1.001).all()), "both are round-to-nearest on (nearly) the same grid"
    assert bool(((w_ao - weight).abs() <= step * 0.501).all()), "torchao's error is half a step too"
    x = torch.randn(8, 576, generator=gen)
    dense = F.linear(x, weight)
    err_ours = (ours(x) - dense).abs().max()
    err_ao = (ao(x).float() - dense).abs().max()
    assert err_ours < 2 * err_ao and err_ao < 2 * err_ours, (err_ours, err_ao)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_agrees_with_torchao_where_it_runs(group_size):
    from servinglab.bench.torchao_ref import TorchaoUnavailable, torchao_dequantized, torchao_int4_linear

    q = impl.load_part("quantization")
    gen = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = (torch.randn(192, 576, generator=gen) / 24).to(device, torch.bfloat16)
    try:
        ao = torchao_int4_linear(weight, group_size)
    except TorchaoUnavailable as exc:
        pytest.skip(str(exc))
    packed, scales = q.quantize_int4(weight.float().cpu(), group_size)
    w_ours = q.dequantize_int4(packed, scales, group_size)
    w_ao = torchao_dequantized(ao).cpu()
    step = scales.repeat_interleave(group_size, dim=1)
    # torchao's int4 is asymmetric (a zero point, 16 levels): its error is at most our step.
    assert bool(((w_ao - weight.float().cpu()).abs() <= step * 0.51 + 1e-2 * step.max()).all())
    assert bool(((w_ours - w_ao).abs() <= step * 1.01 + 1e-2 * step.max()).all())

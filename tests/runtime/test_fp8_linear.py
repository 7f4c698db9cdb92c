"""``quantization="fp8"`` (servinglab.model.fp8_linear): e4m3 codes, per-channel scales, two routes on CUDA.

Everywhere: the codes and scales follow the definition (each row's largest weight lands
on 448; every weight within half an e4m3 step), the engine refuses a device or dtype that
cannot run it, naming the parameter, and quantizing onto a device in row blocks gives the
same module, and the one-row route (the GEMV on e4m3 codes) equals the dequantized product
(through Triton's interpreter on a CPU). On a GPU with FP8 (compute capability >= 8.9): one row takes the weight-only
GEMV and equals the dequantized product; more rows take per-token W8A8 ``_scaled_mm`` and
equal the product of the quantized operands; an engine's decode steps replay CUDA graphs
with the eager tokens, and its projections hold one byte a weight.
"""

from __future__ import annotations

import pytest
import torch

from servinglab.engine.config import EngineConfig
from servinglab.engine.sampling import SamplingParams
from servinglab.model.fp8_linear import Fp8Linear
from servinglab.model.quant import quantize_model, weight_bytes
from servinglab.model.weights import random_model, tiny_llama_config

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8 = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")


def _linear(n: int = 48, k: int = 128, seed: int = 0) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False).requires_grad_(False)
    lin.weight.copy_(torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, n)[:, None])  # rows of very different range
    return lin


def test_codes_and_scales_follow_the_definition():
    lin = _linear()
    lin.weight[5] = 0.0  # an all-zero row: no division by zero
    layer = Fp8Linear.from_linear(lin)
    w = lin.weight.float()
    assert layer.qweight.dtype == torch.float8_e4m3fn and layer.scales.dtype == torch.float32
    nonzero = torch.arange(48) != 5
    torch.testing.assert_close(layer.scales[nonzero], w[nonzero].abs().amax(1) / 448)
    assert torch.equal(layer.qweight.float()[nonzero].abs().amax(1), torch.full((47,), 448.0)), "each row's max must be 448"
    assert torch.isfinite(layer.scales).all() and not layer.qweight.float()[5].any()
    # e4m3: 3 mantissa bits, so round-to-nearest is within 2^-4 of |w| (normals), 2^-10 * s below 2^-6 (subnormals)
    err = (layer.dequantized_weight() - w).abs()
    assert bool((err <= 2**-4 * w.abs() + 2**-10 * layer.scales[:, None] + 1e-12).all())
    assert layer.weight_nbytes() == 48 * 128 + 4 * 48
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T)


def test_fp8_needs_a_gpu_with_fp8_and_bfloat16():
    with pytest.raises(ValueError, match="quantization='fp8' needs a CUDA GPU"):
        EngineConfig(quantization="fp8", device="cpu")
    if FP8_GPU:
        with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
            EngineConfig(quantization="fp8", device="cuda", dtype="float32")


def test_row_blocks_give_the_same_fp8_module():
    import servinglab.model.quant as quant

    config = tiny_llama_config()
    whole, blocks = random_model(config, seed=3), random_model(config, seed=3)
    assert quantize_model(whole, "fp8") == 4 * config.num_hidden_layers
    old, quant.CHUNK_ELEMENTS = quant.CHUNK_ELEMENTS, 1000
    try:
        quantize_model(blocks, "fp8", device="cpu")
    finally:
        quant.CHUNK_ELEMENTS = old
    a, b = whole.state_dict(), blocks.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    wb = weight_bytes(whole)
    assert wb.dense_linear == 0 and wb.quantized == sum(m.weight_nbytes() for m in whole.modules() if isinstance(m, Fp8Linear))


@pytest.mark.parametrize("n,split_k", [(96, 1), (40, 3)])
def test_one_row_route_is_the_gemv_on_e4m3_codes(n, split_k):
    """Everywhere (Triton's interpreter on a CPU), float32: the one-row GEMV reads the e4m3 codes
    as they are (rows past N masked, split-K merged) and equals the dequantized product."""
    from servinglab.model.fp8_linear import fp8_linear
    from servinglab.model.triton.quant_gemv import quant_gemv

    device = "cuda" if FP8_GPU else "cpu"
    layer = Fp8Linear.from_linear(_linear(n=n, k=576, seed=1)).to(device)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(2)).to(device)
    expected = x.double() @ layer.dequantized_weight().double().T
    counters = torch.zeros(8, dtype=torch.int32, device=device)
    out = quant_gemv(x, layer.qweight, layer.scales, None, counters, block_n=16, block_k=64, split_k=split_k)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    assert int(counters.abs().sum()) == 0
    # the route the engine takes for one row (on a CPU the tuner's first GEMV choice, no timing)
    torch.testing.assert_close(fp8_linear(layer, x).double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@needs_fp8
@pytest.mark.parametrize("rows", [1, 37])
def test_both_routes_compute_their_definition(rows):
    from servinglab.model.fp8_linear import fp8_linear
    from servinglab.model.triton.fp8_quant import quantize_rows_fp8

    layer = Fp8Linear.from_linear(_linear(n=96, k=576)).cuda()  # K = 576: SmolLM2-135M's hidden width
    x = torch.randn(rows, 576, device="cuda").to(torch.bfloat16)
    out = fp8_linear(layer, x)
    if rows == 1:  # weight-only: bf16 activation times the dequantized weight
        expected = x.double() @ layer.dequantized_weight().double().T
    else:  # W8A8: the activation's own e4m3 codes and per-row scales
        x8, xs = quantize_rows_fp8(x)
        expected = (x8.double() * xs.double()) @ layer.dequantized_weight().double().T
    # exact products summed in float32, then one rounding to bfloat16 (2^-8 of the largest output)
    bound = 2**-8 * float(expected.abs().max()) + 1e-6
    assert out.dtype == torch.bfloat16 and float((out.double() - expected).abs().max()) <= bound


def _llm(enforce_eager: bool):
    from servinglab.engine.llm import LLM

    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=4, vocab_size=2048, max_position_embeddings=1024)
    model = random_model(config, dtype=torch.bfloat16, seed=1)
    return LLM(model_obj=model, hf_config=config, dtype="bfloat16", device="cuda", enforce_eager=enforce_eager,
               max_num_seqs=16, num_kv_blocks=256, quantization="fp8")


@pytest.mark.gpu
@needs_fp8
def test_fp8_decode_replays_graphs_with_the_eager_tokens(monkeypatch):
    def refuse(self, dtype=torch.float32):
        raise AssertionError("the CUDA path must not dequantize a weight")

    monkeypatch.setattr(Fp8Linear, "dequantized_weight", refuse)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 2048, (n,), generator=gen).tolist() for n in (5, 40, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for eager in (True, False):  # batch 1 (the GEMV route), then batch 2 (W8A8): the same shapes in both modes
        llm = _llm(eager)
        outs = llm.generate(prompts[:1], params, use_tqdm=False) + llm.generate(prompts[1:], params, use_tqdm=False)
        tokens[eager] = [o.outputs[0].token_ids for o in outs]
    graphs_llm = llm
    assert graphs_llm.engine.runner.num_graph_steps > 0, "decode steps should replay CUDA graphs"
    assert tokens[True] == tokens[False]
    model = graphs_llm.engine.model
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 16 and weight_bytes(model).dense_linear == 0

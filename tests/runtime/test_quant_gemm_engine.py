"""Quantized projections in the engine's fused CUDA forward (Part 8b's kernel), graphs included.

Everywhere (the kernels run through Triton's interpreter on a CPU): the fused forward of a
quantized tiny model equals the PyTorch layers' forward (``QuantLinear.forward``, which
dequantizes) in float32, and never calls ``dequantized_weight``. On a GPU: decode steps
of an int8 / int4 engine replay CUDA graphs, give the same greedy tokens as eager steps,
and the GPU never holds the unquantized projections.
"""

from __future__ import annotations

import pytest
import torch

from servinglab import impl
from servinglab.engine.sampling import SamplingParams
from servinglab.interfaces import AttentionMetadata
from servinglab.model.cache import KVCacheSpec, allocate_kv_cache
from servinglab.model.gpu_ops import FusedForward
from servinglab.model.quant import quantize_model, weight_bytes
from servinglab.model.weights import random_model, tiny_llama_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs, GPU memory)")


def _no_dequantize(monkeypatch) -> None:
    def refuse(self, dtype=torch.float32):
        raise AssertionError("the fused path must not dequantize a weight")

    with impl.use_impl("solutions"):
        monkeypatch.setattr(impl.load_part("quantization").QuantLinear, "dequantized_weight", refuse)


@pytest.mark.parametrize("method,group", [("int8", 64), ("int4", 32)])
def test_fused_forward_of_quantized_model_matches_quantlinear(monkeypatch, method, group):
    """A 9-token prefill and a decode row, float32: fused kernels = dequantize + F.linear."""
    config = tiny_llama_config()
    with impl.use_impl("solutions"):
        model = random_model(config, dtype=torch.float32, seed=4)
        quantize_model(model, method, group)
        model = model.to(DEVICE)
        spec = KVCacheSpec.from_hf_config(config)
        caches = [allocate_kv_cache(spec, 4, 16, torch.float32, DEVICE) for _ in range(2)]
        metadata = AttentionMetadata(
            slot_mapping=torch.arange(10, device=DEVICE), block_tables=torch.tensor([[0], [1]], dtype=torch.int32, device=DEVICE),
            context_lens=torch.tensor([9, 1], dtype=torch.int32, device=DEVICE),
            query_start_loc=torch.tensor([0, 9, 10], dtype=torch.int32, device=DEVICE), max_query_len=9, max_context_len=9,
            context_lens_list=[9, 1], query_lens_list=[9, 1],
        )
        metadata.slot_mapping[9] = 16  # the decode row's slot: block 1, position 0
        ids = torch.randint(0, config.vocab_size, (10,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        positions = torch.tensor([*range(9), 0], device=DEVICE)
        with torch.inference_mode():
            expected = model(ids, positions, metadata, caches[0])
            _no_dequantize(monkeypatch)
            fused = FusedForward(model)(ids, positions, metadata, caches[1])
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group,split_k,block_k,grouped", [(None, 1, 64, 0), (None, 3, 64, 0), (32, 2, 64, 0), (64, 1, 64, 0),
                                                          (32, 1, 128, 1), (64, 2, 128, 1), (32, 1, 64, 1)])
def test_one_row_gemv_candidate(group, split_k, block_k, grouped):
    """The batch-1 GEMV the engine's tuner may pick gives Part 8a's dequantize + matmul (float32)."""
    from servinglab.model.triton.quant_gemv import quant_gemv

    with impl.use_impl("solutions"):
        q = impl.load_part("quantization")
        w = torch.randn(40, 256, generator=torch.Generator().manual_seed(5)) * torch.logspace(-2, 1, 40)[:, None]
        codes, scales = q.quantize_int8(w) if group is None else q.quantize_int4(w, group)
        w_hat = q.dequantize_int8(codes, scales) if group is None else q.dequantize_int4(codes, scales, group)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6))
    counters = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the counters must be left at zero for the next call
        out = quant_gemv(x.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE), group, counters, block_n=16, block_k=block_k,
                         split_k=split_k, grouped=grouped)
        torch.testing.assert_close(out.cpu(), x @ w_hat.T, atol=1e-4, rtol=1e-5)
    assert int(counters.abs().sum()) == 0


def _llm(method: str | None, enforce_eager: bool):
    from servinglab.engine.llm import LLM

    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=4, vocab_size=2048, max_position_embeddings=1024)
    model = random_model(config, dtype=torch.bfloat16, seed=1)
    return LLM(model_obj=model, hf_config=config, dtype="bfloat16", device="cuda", enforce_eager=enforce_eager,
               max_num_seqs=16, num_kv_blocks=256, quantization=method, quantization_group_size=64)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_decode_replays_graphs_with_the_eager_tokens(monkeypatch, method):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 2048, (n,), generator=gen).tolist() for n in (5, 40, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with impl.use_impl("solutions"):
        _no_dequantize(monkeypatch)
        eager = _llm(method, True).generate(prompts, params, use_tqdm=False)
        graphs_llm = _llm(method, False)
        graphs = graphs_llm.generate(prompts, params, use_tqdm=False)
    assert graphs_llm.engine.runner.num_graph_steps > 0, "decode steps should replay CUDA graphs"
    assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in graphs]


def test_quantizing_onto_a_device_in_row_blocks_gives_the_same_codes():
    """Row blocks (``CHUNK_ELEMENTS``) quantized one by one = the whole layer at once."""
    config = tiny_llama_config()
    whole, blocks = random_model(config, seed=2), random_model(config, seed=2)
    with impl.use_impl("solutions"):
        quantize_model(whole, "int4", 32)
        import servinglab.model.quant as quant

        old, quant.CHUNK_ELEMENTS = quant.CHUNK_ELEMENTS, 1000  # 15 rows of 64: several blocks a layer
        try:
            quantize_model(blocks, "int4", 32, device="cpu")
        finally:
            quant.CHUNK_ELEMENTS = old
    a, b = whole.state_dict(), blocks.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@needs_cuda
def test_gpu_never_holds_the_unquantized_projections():
    config = tiny_llama_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, vocab_size=256)
    model = random_model(config, dtype=torch.bfloat16, seed=2)
    dense = weight_bytes(model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with impl.use_impl("solutions"):
        quantize_model(model, "int4", 64, device="cuda")
        model.to("cuda")
    peak = torch.cuda.max_memory_allocated() - base
    # int4 g64 stores 0.5 + 4/64 bytes a weight (0.28x of bf16), plus one row block's temporaries
    assert peak < 0.4 * dense.total, f"peak {peak} bytes while quantizing onto the GPU; bf16 weights are {dense.total}"


def test_grouped_gemv_rejects_a_block_that_splits_groups():
    from servinglab.model.triton.quant_gemv import quant_gemv

    x, codes = torch.zeros(1, 256), torch.zeros(8, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="grouped needs INT4"):
        quant_gemv(x, codes, torch.ones(8, 4), 64, torch.zeros(8, dtype=torch.int32), block_k=32, grouped=1)
    with pytest.raises(ValueError, match="grouped needs INT4"):
        quant_gemv(x, torch.zeros(8, 256, dtype=torch.int8), torch.ones(8), None, torch.zeros(8, dtype=torch.int32), grouped=1)

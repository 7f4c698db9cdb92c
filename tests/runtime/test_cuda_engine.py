"""The engine's CUDA path: fused forward, pinned uploads, CUDA-graph decode.

On every machine the fused forward (Triton kernels, through the interpreter on a CPU)
must give the PyTorch forward's hidden states in float32. On a GPU: greedy tokens are
identical with and without CUDA graphs (same kernels, same order: a graph replays
exactly the eager launches), sampling with seeds is reproducible through graphs, and
the graph path really runs.
"""

from __future__ import annotations

import pytest
import torch

from servinglab.engine.sampling import SamplingParams
from servinglab.interfaces import AttentionMetadata
from servinglab.model.cache import KVCacheSpec, allocate_kv_cache
from servinglab.model.cuda_graphs import default_capture_sizes
from servinglab.model.gpu_ops import FusedForward
from servinglab.model.weights import random_model, tiny_llama_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def test_capture_sizes_follow_vllm():
    assert default_capture_sizes(256)[:5] == [1, 2, 4, 8, 16]
    assert default_capture_sizes(256)[-1] == 256 and 248 in default_capture_sizes(256)
    assert default_capture_sizes(10) == [1, 2, 4, 8]
    assert default_capture_sizes(512)[-2:] == [496, 512]
    with pytest.raises(ValueError, match="max_num_seqs"):
        default_capture_sizes(0)


def test_fused_forward_matches_pytorch_layers():
    """Two sequences: a 9-token prefill and a decode row over a 20-token context."""
    config = tiny_llama_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    model = random_model(config, dtype=torch.float32, seed=3).to(DEVICE)
    block_size, spec = 16, KVCacheSpec.from_hf_config(config)
    caches_a = allocate_kv_cache(spec, 8, block_size, torch.float32, DEVICE)
    caches_b = allocate_kv_cache(spec, 8, block_size, torch.float32, DEVICE)
    gen = torch.Generator().manual_seed(0)
    for (ka, va), (kb, vb) in zip(caches_a, caches_b):  # the decode row's 19 cached positions
        ka.copy_(torch.randn(ka.shape, generator=gen)); va.copy_(torch.randn(va.shape, generator=gen))
        kb.copy_(ka); vb.copy_(va)
    tables = torch.tensor([[3, 0], [5, 6]], dtype=torch.int32, device=DEVICE)
    positions = torch.tensor([*range(9), 19], device=DEVICE)
    slots = torch.tensor([3 * 16 + p for p in range(9)] + [6 * 16 + 3], device=DEVICE)
    metadata = AttentionMetadata(
        slot_mapping=slots, block_tables=tables, context_lens=torch.tensor([9, 20], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, 9, 10], dtype=torch.int32, device=DEVICE), max_query_len=9, max_context_len=20,
        context_lens_list=[9, 20], query_lens_list=[9, 1],
    )
    ids = torch.randint(0, config.vocab_size, (10,), generator=gen).to(DEVICE)
    with torch.inference_mode():
        expected = model(ids, positions, metadata, caches_a)
        fused = FusedForward(model)(ids, positions, metadata, caches_b)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    for (ka, va), (kb, vb) in zip(caches_a, caches_b):
        torch.testing.assert_close(kb, ka, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vb, va, atol=1e-5, rtol=1e-5)


def _llm(enforce_eager: bool, dtype: str = "bfloat16", **kwargs):
    from servinglab.engine.llm import LLM

    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=4, vocab_size=2048, max_position_embeddings=1024)
    model = random_model(config, dtype=getattr(torch, dtype), seed=1)
    return LLM(model_obj=model, hf_config=config, dtype=dtype, device="cuda", enforce_eager=enforce_eager,
               max_num_seqs=32, num_kv_blocks=512, **kwargs)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2048, (int(torch.randint(4, 200, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs)")
def test_greedy_identical_with_and_without_cuda_graphs():
    prompts = _prompts(40)
    params = [SamplingParams(temperature=0.0, max_tokens=20 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    eager = _llm(True).generate(prompts, params, use_tqdm=False)
    graphs_llm = _llm(False)
    graphs = graphs_llm.generate(prompts, params, use_tqdm=False)
    assert graphs_llm.engine.runner.num_graph_steps > 0, "decode steps should replay CUDA graphs"
    for i, (a, b) in enumerate(zip(eager, graphs)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"request {i}: graphs changed the greedy tokens"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs)")
def test_seeded_sampling_through_graphs_is_reproducible():
    prompts = _prompts(6, seed=1)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=24, ignore_eos=True)
    first = _llm(False).generate(prompts, params, use_tqdm=False)
    second = _llm(True).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_engine_matches_the_cpu_engine_in_float32():
    """float32: the CUDA engine (fused kernels, graphs) gives the CPU engine's greedy tokens
    (PyTorch layers, Part 3 reference); in float32 a flip would need a top-2 logit gap of
    about 1e-5, which random logits of unit scale almost never have."""
    from servinglab.engine.llm import LLM

    prompts = _prompts(8, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    fused = _llm(False, dtype="float32").generate(prompts, params, use_tqdm=False)
    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=4, vocab_size=2048, max_position_embeddings=1024)
    cpu = LLM(model_obj=random_model(config, dtype=torch.float32, seed=1), hf_config=config, dtype="float32",
              device="cpu", max_num_seqs=32, num_kv_blocks=512)
    plain = cpu.generate(prompts, params, use_tqdm=False)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(fused, plain))
    assert same == len(prompts), f"only {same}/{len(prompts)} requests agree in float32"

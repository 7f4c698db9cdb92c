"""Pipeline parallelism in the engine (Part 9b) on CPU ranks over gloo.

A tiny random Llama at ``tensor_parallel_size=2 x pipeline_parallel_size=2`` (four
ranks) must give the greedy float32 tokens of one rank; bad sizes are refused before
any process starts; the bubble measurement returns one row per micro-batch count. The
real SmolLM2-135M (30 layers, 9 heads) runs at PP=2 and at TP=3 x PP=2 in the slow tier,
and each PP=2 rank holds about half the layers (the embedding on stage 0, a copy of the
tied embedding as the LM head on stage 1).
"""

from __future__ import annotations

import pytest
import torch

from servinglab import LLM, SamplingParams
from servinglab.model.prepare import default_model_dir, is_prepared
from servinglab.model.weights import random_model, tiny_llama_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_tp2_x_pp2_equals_one_rank():
    config = tiny_llama_config(num_hidden_layers=3)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 19, 33, 8)]
    common = dict(hf_config=config, dtype="float32", block_size=4, max_num_batched_tokens=16, max_model_len=64)
    want = LLM(model_obj=random_model(config, seed=0), num_kv_blocks=100, **common).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(model_obj=random_model(config, seed=0), num_kv_blocks=32, tensor_parallel_size=2, pipeline_parallel_size=2, **common)
    try:
        got = llm.generate(prompts, GREEDY, use_tqdm=False)
        ranks = llm.engine.tp_executor.rank_stats()
    finally:
        llm.engine.tp_executor.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [(r["pp_rank"], r["tp_rank"], r["num_layers"], r["num_kv_heads"]) for r in ranks] == [
        (0, 0, 2, 1), (0, 1, 2, 1), (1, 0, 1, 1), (1, 1, 1, 1)]
    assert ranks[0]["p2p_elements"] > 0 and ranks[2]["p2p_elements"] == 0, "only stage 0 sends"


def test_bad_pipeline_sizes_are_refused():
    config = tiny_llama_config()
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(model_obj=random_model(config), hf_config=config, pipeline_parallel_size=0)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(3\) must be <= num_hidden_layers \(2\)"):
        LLM(model_obj=random_model(config), hf_config=config, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="preemption_mode='swap' is not supported with pipeline_parallel_size"):
        LLM(model_obj=random_model(config), hf_config=config, pipeline_parallel_size=2, preemption_mode="swap")


REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three prime numbers:"]


@pytest.mark.slow
@pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`")
def test_smollm2_pp2_and_tp3_x_pp2_equal_one_rank_in_float32():
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    kwargs = dict(dtype="float32", num_kv_blocks=32, max_model_len=128)
    one = LLM(str(default_model_dir()), **kwargs)
    want = [o.outputs[0].token_ids for o in one.generate(REAL_PROMPTS, params, use_tqdm=False)]
    total = sum(p.numel() * p.element_size() for p in one.engine.model.parameters())
    embed = one.engine.model.model.embed_tokens.weight
    embed_bytes = embed.numel() * embed.element_size()
    del one
    for tp, pp in ((1, 2), (3, 2)):
        llm = LLM(str(default_model_dir()), tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)
        try:
            got = [o.outputs[0].token_ids for o in llm.generate(REAL_PROMPTS, params, use_tqdm=False)]
            ranks = llm.engine.tp_executor.rank_stats()
        finally:
            llm.engine.tp_executor.shutdown()
        assert got == want, f"TP={tp} x PP={pp}"
        assert [r["num_layers"] for r in ranks] == [15] * tp + [15] * tp
        if tp == 1:  # half the layers each; the tied embedding sits on stage 0 and again as stage 1's LM head
            layer_bytes = (total - embed_bytes) / 2
            for r in ranks:
                assert abs(r["weight_bytes"] - (layer_bytes + embed_bytes)) < 0.01 * total, r

"""Overlap scheduling on CUDA: graph replays fed by the previous step's tokens on the device.

float32 so that the comparison with the synchronous loop is exact (batch compositions differ
by the sequences dropped one step late; in bf16 a near-tie could flip with the batch size).
"""

from __future__ import annotations

import pytest
import torch

from servinglab import LLM, SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs)")]


def test_async_scheduling_on_cuda_graphs_matches_the_synchronous_loop() -> None:
    cfg = tiny_llama_config()
    prompts = [[3 + (7 * i + j) % 250 for j in range(5 + 3 * i)] for i in range(12)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=8 + 5 * (i % 4), ignore_eos=True) for i in range(12)]
    outs, engines = {}, {}
    for mode in (False, True):
        llm = LLM(model_obj=random_model(cfg, dtype=torch.float32, seed=0), hf_config=cfg, dtype="float32", device="cuda",
                  block_size=16, num_kv_blocks=128, max_num_seqs=16, async_scheduling=mode)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        engines[mode] = llm.engine
    assert outs[True] == outs[False]
    assert engines[True].runner.num_graph_steps > 0, "decode steps replayed CUDA graphs"
    assert engines[True].async_loop.num_overlapped > 0, "and were launched before the previous tokens reached the host"

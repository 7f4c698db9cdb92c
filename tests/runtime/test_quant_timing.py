"""``bench quant``'s timing helpers measure what they say: prefill runs never reuse cached prompts."""

from __future__ import annotations

import math

import torch

from servinglab import LLM
from servinglab.bench.quant_timing import prefill_tok_s
from servinglab.model.weights import random_model, tiny_llama_config


def _llm_with_spy() -> tuple[LLM, list[int], int]:
    config = tiny_llama_config()
    llm = LLM(model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config, dtype="float32",
              device="cpu", block_size=4, num_kv_blocks=256)
    cached: list[int] = []
    real = llm.generate

    def spy(prompts, params, **kwargs):
        outs = real(prompts, params, **kwargs)
        cached.extend(o.metrics.num_cached_tokens for o in outs)
        return outs

    llm.generate = spy
    return llm, cached, config.vocab_size


def test_prefill_runs_never_hit_the_prefix_cache():
    llm, cached, vocab = _llm_with_spy()
    rate = prefill_tok_s(llm, vocab, prompts=3, prompt_len=24)
    assert math.isfinite(rate) and rate > 0
    assert len(cached) == 2 + 3 * 3 and max(cached) == 0, f"a timed prefill reused cached blocks: {cached}"


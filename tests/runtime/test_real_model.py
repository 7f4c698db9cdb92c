"""The lab engine on the real SmolLM2-135M-Instruct: exact float32 parity with transformers,
text-level stopping, and bfloat16 agreement with the real vLLM.

Skipped with the reason when the model folder is not prepared (``servinglab prepare-model``).
"""

from __future__ import annotations

import pytest
import torch

from oracle import hf_greedy as hf_greedy_decode
from servinglab.model.prepare import default_model_dir, is_prepared
from servinglab import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`"),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Explain in one sentence why the sky is blue. The sky is blue because",
    "Q: What is 12 times 12?\nA:",
]
NUM_TOKENS = 24


@pytest.fixture(scope="module")
def hf_greedy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    return ids, [hf_greedy_decode(model, p, NUM_TOKENS) for p in ids]


def lab(**kwargs):
    from servinglab import LLM

    kwargs.setdefault("dtype", "float32")
    return LLM(model=str(default_model_dir()), **kwargs)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_num_batched_tokens": 16},  # every prompt split into chunks
        {"num_kv_blocks": 12, "max_num_batched_tokens": 64, "max_model_len": 128},  # forced preemption
    ],
    ids=["batched", "chunked_prefill", "preemption"],
)
def test_float32_greedy_equals_transformers(hf_greedy, kwargs):
    ids, want = hf_greedy
    outs = lab(**kwargs).generate(ids, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    if "num_kv_blocks" in kwargs:
        assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_prefix_cache_hits_and_parallel_sampling(hf_greedy):
    ids, want = hf_greedy
    llm = lab(enable_prefix_caching=True)
    llm.generate(ids[4:5], GREEDY, use_tqdm=False)
    again = llm.generate(ids[4:6], SamplingParams(n=2, temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)
    assert again[0].metrics.num_cached_tokens > 0
    assert [[c.token_ids for c in o.outputs] for o in again] == [[want[4]] * 2, [want[5]] * 2]


def test_text_prompts_and_stop_strings():
    llm = lab()
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=16, stop=["\n"]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == " Paris." and c.finish_reason == "stop" and c.stop_reason == "\n"


@pytest.mark.vllm
def test_bfloat16_agrees_with_vllm():
    """bf16 rounding differs between kernels, so a near-tie can flip a greedy token; the
    issue's bar is that at least 95% of requests agree on their first 32 tokens."""
    pytest.importorskip("vllm")
    from servinglab import LLM
    from servinglab.bench.vllm_baseline import vllm_generate
    from servinglab.bench.workloads import few_shot_prompts

    prompts = PROMPTS + few_shot_prompts(12)
    llm = LLM(model=str(default_model_dir()), dtype="bfloat16")
    tok = llm.get_tokenizer()
    ids = [tok(p)["input_ids"] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    mine = [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]
    theirs = vllm_generate(default_model_dir(), ids, {"temperature": 0.0, "max_tokens": 32, "ignore_eos": True})["token_ids"]
    same = sum(a == b for a, b in zip(mine, theirs)) / len(ids)
    print(f"lab vs vLLM bf16: {same:.0%} of {len(ids)} requests agree on 32 greedy tokens")
    assert same >= 0.95

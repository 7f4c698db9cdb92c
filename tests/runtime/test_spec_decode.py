"""Speculative decoding in the paged engine: greedy output identical to the plain engine
under batching, preemption, chunked prefill and prefix caching; stop conditions inside an
accepted run; no leaked or stale blocks; sampling within max_tokens; config errors.

The tiny Llama has untied embeddings: with tied ones a random model mostly repeats its
last token and every draft is accepted, which would leave the rejection paths untested.
Runs on the reference parts (``tests/runtime/conftest.py``) like ``test_engine.py``.
"""

from __future__ import annotations

import pytest
import torch

from servinglab import LLM
from servinglab.model.prepare import default_model_dir, is_prepared
from servinglab import SamplingParams
from servinglab.engine.spec_decode import generate_with_speculation
from servinglab.model.weights import random_model, tiny_llama_config, to_transformers

MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
DRAFT = {"method": "draft", "num_speculative_tokens": 3, "draft_num_layers": 1}


@pytest.fixture(scope="module")
def tiny():
    config = tiny_llama_config(tie_word_embeddings=False)
    model = random_model(config, dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(1)
    base = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in (3, 9, 17, 30)]
    # Repetitive prompts make the n-gram proposer fire from the first decode step.
    prompts = base + [base[1] * 3, base[2] * 2, [5, 6, 7] * 10]
    plain = LLM(model_obj=model, hf_config=config, dtype="float32", block_size=4)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    return config, model, prompts, expected


def make_llm(tiny, **kwargs) -> LLM:
    config, model, _, _ = tiny
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("block_size", 4)
    return LLM(model_obj=model, hf_config=config, **kwargs)


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.block_manager.get_stats()
    assert stats.num_free_blocks == stats.num_blocks, "blocks leaked after every request finished"


SCHEDULES = {
    "ngram": {"speculative_config": NGRAM},
    "ngram_k1": {"speculative_config": {**NGRAM, "num_speculative_tokens": 1}},
    "ngram_preemption": {"speculative_config": NGRAM, "num_kv_blocks": 40, "max_num_batched_tokens": 16, "max_model_len": 128},
    "ngram_chunked_budget": {"speculative_config": NGRAM, "max_num_batched_tokens": 12},
    "ngram_no_prefix_cache": {"speculative_config": NGRAM, "enable_prefix_caching": False},
    "draft_early_exit": {"speculative_config": DRAFT},
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_greedy_speculation_matches_plain(tiny, name):
    _, _, prompts, expected = tiny
    llm = make_llm(tiny, **SCHEDULES[name])
    outs, per_request = generate_with_speculation(llm, prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_all_blocks_free(llm)
    stats = llm.engine.spec_decoder.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, "both accepted and rejected drafts should occur"
    assert stats.mean_tokens_per_step > 1.0
    assert sum(s.num_draft_tokens for s in per_request) == stats.num_draft_tokens
    assert sum(stats.drafts_per_pos) == stats.num_draft_tokens and sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    if name == "ngram_preemption":
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the tiny pool should have forced preemption"


def test_separate_draft_model_with_temperature(tiny):
    """A different random model as the draft: few acceptances, exact greedy, bounded sampling."""
    config, _, prompts, expected = tiny
    draft = to_transformers(random_model(config, dtype=torch.float32, seed=1))
    llm = make_llm(tiny, speculative_config={"method": "draft", "num_speculative_tokens": 3, "model": draft})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=17, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 17 for o in outs)
    assert_all_blocks_free(llm)


def test_temperature_sampling_and_seeded_batch_independence(tiny):
    _, _, prompts, _ = tiny
    seeded = SamplingParams(temperature=0.8, top_k=50, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = make_llm(tiny, speculative_config=NGRAM).generate(prompts[5], seeded, use_tqdm=False)[0].outputs[0].token_ids
    # A roomy pool: under memory pressure drafts are cut short, which changes how many random
    # numbers a step draws (the output law stays exact, the seeded stream does not).
    llm = make_llm(tiny, speculative_config=NGRAM)
    unseeded = SamplingParams(temperature=1.0, max_tokens=23, ignore_eos=True)
    mixed = llm.generate(prompts, [unseeded] * 5 + [seeded, unseeded], use_tqdm=False)
    assert mixed[5].outputs[0].token_ids == alone, "a seeded request must not depend on its batch"
    assert all(len(o.outputs[0].token_ids) == 23 for i, o in enumerate(mixed) if i != 5)
    assert llm.engine.spec_decoder.stats.num_draft_tokens > 0
    assert_all_blocks_free(llm)


def test_stop_inside_an_accepted_run(tiny):
    """The cycle in prompt 5's output is drafted whole; a stop token inside it cuts the run."""
    _, _, prompts, expected = tiny
    want = expected[5]
    stop_at = want[12]
    llm = make_llm(tiny, speculative_config=NGRAM)
    llm.engine.record_steps = True
    outs = llm.generate([prompts[5]] * 2, [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_at]),
                                            SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)], use_tqdm=False)
    stopped, short = outs[0].outputs[0], outs[1].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == want[: want.index(stop_at) + 1]
    assert short.finish_reason == "length" and short.token_ids == want[:13]
    assert any(n > 1 and not prefill for rec in llm.engine.step_log for _, n, prefill in rec.scheduled), "decode steps verify 1 + d tokens"
    assert_all_blocks_free(llm)


def test_prefix_cache_never_publishes_rejected_drafts(tiny):
    """Plain requests that extend finished speculative ones reuse their published blocks,
    and must still produce what a fresh engine produces."""
    _, _, prompts, expected = tiny
    llm = make_llm(tiny, speculative_config=NGRAM)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    extended = [p + e[:-3] for p, e in zip(prompts, expected)]
    short = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    fresh = make_llm(tiny).generate(extended, short, use_tqdm=False)
    reused = llm.generate(extended, short, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in reused] == [o.outputs[0].token_ids for o in fresh]
    assert sum(o.metrics.num_cached_tokens for o in reused) > sum(len(p) for p in prompts), "decode blocks should be reused"


def test_parallel_sampling_with_speculation(tiny):
    _, _, prompts, expected = tiny
    llm = make_llm(tiny, speculative_config=NGRAM)
    out = llm.generate(prompts[6], SamplingParams(n=3, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [expected[6]] * 3
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({**NGRAM, "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({**NGRAM, "num_speculative_tokens": -2}, "num_speculative_tokens"),
        ({**NGRAM, "method": "eagle"}, "method"),
        ({"num_speculative_tokens": 2}, "method"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({**NGRAM, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_max"),
        ({**NGRAM, "prompt_lookup_min": 0}, "prompt_lookup_min"),
        ({**NGRAM, "lookahead": 3}, "lookahead"),
        ({**DRAFT, "draft_num_layers": 2}, "draft_num_layers"),
        ("ngram", "speculative_config"),
    ],
)
def test_speculative_config_validation(tiny, spec, match):
    with pytest.raises(ValueError, match=match):
        make_llm(tiny, speculative_config=spec)


def test_draft_with_another_vocabulary_is_refused(tiny):
    config, _, _, _ = tiny
    other = to_transformers(random_model(tiny_llama_config(vocab_size=300), dtype=torch.float32, seed=2))
    with pytest.raises(ValueError, match="model.*vocab_size 300"):
        make_llm(tiny, speculative_config={"method": "draft", "num_speculative_tokens": 2, "model": other})
    with pytest.raises(ValueError, match="speculative_config"):
        generate_with_speculation(make_llm(tiny), [[5, 6]], GREEDY)


@pytest.mark.slow
@pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`")
def test_real_model_ngram_matches_plain_fp32():
    """SmolLM2-135M-Instruct, fp32, chat template: input-grounded edits, greedy, with and without prompt lookup."""
    from servinglab.bench.spec_prompts import GROUNDED, chat_prompts

    params = SamplingParams(temperature=0.0, max_tokens=48)
    plain = LLM(model=str(default_model_dir()), dtype="float32", max_model_len=512)
    prompts = chat_prompts(plain.get_tokenizer(), [GROUNDED[0], GROUNDED[1], GROUNDED[3]])
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = LLM(model=str(default_model_dir()), dtype="float32", max_model_len=512, speculative_config=NGRAM)
    outs, per_request = generate_with_speculation(llm, prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.spec_decoder.stats.mean_tokens_per_step > 1.5, per_request
    assert_all_blocks_free(llm)

"""Overlap scheduling (``async_scheduling=True``, servinglab.engine.async_scheduling) against the synchronous loop.

The host runs one step ahead of the device; outputs must not change: greedy and seeded
sampling, several completions per request, stop tokens, ``max_tokens``, preemption by
recompute and by swap, chunked prefill, the prefix cache, and requests aborted mid-way.
On a CPU the steps do not overlap in time, but every placeholder, device-side token patch
and one-step-late finish runs exactly as on a GPU.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from servinglab import LLM, SamplingParams
from servinglab.engine.async_scheduling import PLACEHOLDER
from servinglab.model.weights import random_model, tiny_llama_config

CFG = tiny_llama_config()


def make(async_scheduling: bool, **kwargs) -> LLM:
    base = dict(hf_config=CFG, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_num_seqs=8)
    return LLM(model_obj=random_model(CFG, dtype=torch.float32, seed=0), async_scheduling=async_scheduling, **{**base, **kwargs})


def run(async_scheduling: bool, prompts, params, **kwargs) -> list[list[list[int]]]:
    llm = make(async_scheduling, **kwargs)
    outs = llm.generate(prompts, params, use_tqdm=False)
    if async_scheduling:  # the overlapped path ran (a placeholder reaching the model would fail the embedding)
        assert llm.engine.async_loop.num_overlapped > 0
    else:
        assert llm.engine.async_loop is None
    return [[c.token_ids for c in o.outputs] for o in outs]


def workload(seed: int, n: int = 10) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(1, 30))] for _ in range(n)]
    params = []
    for i in range(n):
        kind = rng.randrange(4)
        common = dict(max_tokens=rng.randrange(1, 24), ignore_eos=rng.random() < 0.5)
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, **common))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=seed * 100 + i, **common))
        elif kind == 2:
            params.append(SamplingParams(temperature=0.7, top_k=20, seed=i, n=2, **common))
        else:
            params.append(SamplingParams(temperature=0.0, stop_token_ids=[rng.randrange(3, 256) for _ in range(30)], **common))
    return prompts, params


@pytest.mark.parametrize("seed", range(3))
def test_same_outputs_as_the_synchronous_loop(seed: int) -> None:
    prompts, params = workload(seed)
    assert run(True, prompts, params) == run(False, prompts, params)


@pytest.mark.parametrize("extra", [
    dict(num_kv_blocks=14, max_num_seqs=6),                                   # preemption by recompute
    dict(num_kv_blocks=14, max_num_seqs=6, preemption_mode="swap", swap_space=0.01),  # by swap
    dict(max_num_batched_tokens=8),                                           # chunked prefill
], ids=["recompute", "swap", "chunked"])
def test_same_outputs_under_preemption_and_chunking(extra: dict) -> None:
    prompts, params = workload(7, n=8)
    assert run(True, prompts, params, **extra) == run(False, prompts, params, **extra)


def test_prefix_cache_hits_and_outputs_unchanged() -> None:
    shared = list(range(10, 42))
    prompts = [shared + [100 + i] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results = {}
    for mode in (False, True):
        llm = make(mode)
        first = llm.generate(prompts[:1], params, use_tqdm=False)
        rest = llm.generate(prompts[1:], params, use_tqdm=False)
        # A next turn: the first prompt, its answer and a new question. The answer's blocks were
        # published after their placeholders were replaced, so they are found too.
        turn = prompts[0] + list(first[0].outputs[0].token_ids) + [7, 8, 9]
        again = llm.generate([turn], params, use_tqdm=False)
        results[mode] = ([o.outputs[0].token_ids for o in first + rest + again],
                         [o.metrics.num_cached_tokens for o in rest + again])
    assert results[True] == results[False]
    assert all(c >= 32 for c in results[True][1][:-1]), "the shared prefix is found in the cache"
    assert results[True][1][-1] >= 40, "and the previous turn's answer"


def test_abort_mid_way_and_no_placeholder_leaks() -> None:
    engines = {mode: make(mode).engine for mode in (False, True)}
    got = {}
    for mode, eng in engines.items():
        ids = [eng.add_request([5 + i, 9, 11], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)) for i in range(4)]
        finished: dict[str, list[int]] = {}
        steps = 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                assert PLACEHOLDER not in out.outputs[0].token_ids
                if out.finished:
                    finished[out.request_id] = out.outputs[0].token_ids
            steps += 1
            if steps == 6:
                eng.abort_request(ids[1])
        got[mode] = ([finished[i] for i in ids if i != ids[1]], eng.block_manager.get_stats().usage)
        assert ids[1] not in finished and not eng.scheduler.running and not eng.scheduler.waiting
    assert got[True] == got[False]  # the same tokens, and every block given back alike


def test_generate_returns_with_nothing_in_flight() -> None:
    """The step launched after the last token (its lanes all finished) is committed before generate returns,
    so nothing of one call reaches the next call's step log (notebook 04 plots that log)."""
    llm = make(True)
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([[1, 2, 3]], greedy, use_tqdm=False)
    engine = llm.engine
    assert engine.async_loop.in_flight is None and not engine.has_unfinished_requests()
    assert engine.async_loop.num_launched == engine.num_steps, "every launched step was committed"
    engine.record_steps, engine.step_log = True, []
    rid = engine.add_request([4, 5, 6, 7], greedy)
    mine = {s.seq_id for s in engine.requests[rid].seqs}
    while engine.has_unfinished_requests():
        engine.step()
    logged = {seq_id for rec in engine.step_log for seq_id, _, _ in rec.scheduled}
    assert logged == mine


def test_config_rejects_what_it_cannot_overlap() -> None:
    with pytest.raises(ValueError, match="async_scheduling must be True, False or None"):
        make("yes")
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1"):
        make(True, pipeline_parallel_size=2)


@pytest.mark.parametrize("pattern", [(True,), (False, True), (True, False, False)])
def test_speculation_with_overlapped_plain_steps(pattern: tuple[bool, ...]) -> None:
    """Plain steps of a speculative engine run overlapped; a speculative step first drains the step in
    flight (drafts need real tokens). The per-step decision is scripted; greedy output stays plain greedy."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 40) for _ in range(4)] * 3 for _ in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=5 + 4 * i, ignore_eos=i % 2 == 0,
                             stop_token_ids=[] if i % 3 else [rng.randrange(3, 40)]) for i in range(6)]
    want = run(False, prompts, params)
    llm = make(True, speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                         "prompt_lookup_max": 3})
    decisions = itertools.cycle(pattern)
    llm.engine.spec_decoder.policy.should_speculate = lambda batch: next(decisions)
    assert [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert llm.engine.spec_decoder.stats.num_draft_tokens > 0, "speculative steps ran"
    assert (llm.engine.async_loop.num_overlapped > 0) == (pattern == (True, False, False)), "only plain after plain overlaps"
    assert llm.engine.async_loop.in_flight is None and not llm.engine.has_unfinished_requests()


def test_default_is_on_for_cuda_only_where_supported() -> None:
    from servinglab.engine.config import EngineConfig

    assert not EngineConfig(device="cpu").use_async_scheduling, "the CPU path stays the synchronous loop"
    assert EngineConfig(device="cpu", async_scheduling=True).use_async_scheduling
    auto = EngineConfig(device="cpu")
    auto.device = "cuda"  # what the default means on a CUDA box, without needing one
    assert auto.use_async_scheduling
    auto.speculative_config = {"method": "ngram", "num_speculative_tokens": 2}
    assert auto.use_async_scheduling, "speculation's plain steps overlap"
    auto.pipeline_parallel_size = 2
    assert not auto.use_async_scheduling, "None turns it off where it is unsupported instead of failing"
    auto.pipeline_parallel_size, auto.extra = 1, {"distributed_executor_backend": "mp"}
    assert not auto.use_async_scheduling, "a worker rank executes the step: no overlap there"
    assert make(None).engine.async_loop is None


def test_the_cuda_runner_path_interpreted_on_a_cpu(monkeypatch) -> None:
    """The CUDA runner's decode path (static graph buffers, pinned uploads, the token patch written
    into the graph inputs) run eagerly with Triton's interpreter: what a GPU replays, minus the graph."""
    from servinglab.engine.cuda_runner import CudaModelRunner

    prompts, params = workload(3, n=4)
    params = [SamplingParams(**{**vars(p), "max_tokens": min(p.max_tokens, 8)}) for p in params]
    outs, patched = {}, []
    for mode in (False, True):
        llm = make(mode, block_size=16, num_kv_blocks=32)
        eng = llm.engine
        runner = CudaModelRunner(eng.model, eng.runner.kv_caches, 16, "cpu", 8, eng.max_model_len, enforce_eager=True)
        runner.slot_of = eng.block_manager.get_slot
        replay = runner.graphs.replay

        def counting(*args, patch=None, _replay=replay):
            patched.append(patch is not None and mode)
            return _replay(*args, patch=patch)

        monkeypatch.setattr(runner.graphs, "replay", counting)
        eng.runner = runner
        outs[mode] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[True] == outs[False]
    assert any(patched), "decode steps took the graph inputs' path with the previous step's tokens patched in"


def test_a_server_with_async_scheduling_answers_as_the_synchronous_one() -> None:
    """Concurrent completions (greedy and seeded, n = 2) through the HTTP server, batched together."""
    import asyncio
    import sys
    from pathlib import Path

    import httpx

    sys.path.insert(0, str(Path(__file__).parent))
    from serving_helpers import InProcessServer, completion, tiny_state, wait_idle

    bodies = [completion(f"Hello {i}", 6 + i, stream=False, temperature=0.0 if i % 2 else 0.8, seed=i, n=1 + i % 2)
              for i in range(4)]
    # The tiny model's greedy text is "000...": "00" ends it after one token; sampled ones end at some "0".
    bodies += [completion("Stop", 24, stream=False, temperature=0.0, stop=["00"])]
    bodies += [completion(f"Stop {i}", 24, stream=False, temperature=1.0, seed=i, stop=["0"]) for i in range(3)]
    answers = {}
    for mode in (False, True):
        with InProcessServer(tiny_state(async_scheduling=mode)) as srv:
            async def all_at_once() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    return await asyncio.gather(*(client.post(f"{srv.base_url}/v1/completions", json=b) for b in bodies))

            got = asyncio.run(all_at_once())
            assert all(r.status_code == 200 for r in got), [r.text for r in got]
            answers[mode] = [[(c["text"], c["finish_reason"]) for c in r.json()["choices"]] for r in got]
            wait_idle(srv.base_url)
    assert answers[True] == answers[False]
    assert any(reason == "stop" for choices in answers[True][4:] for _, reason in choices), "a stop string ended some"

"""Tensor parallelism in the engine (Part 9) on CPU ranks over gloo.

A tiny random Llama (4 heads, 2 KV heads) at ``tensor_parallel_size=2`` must give the
same greedy tokens as at TP=1, exactly, in float32, through batching, chunked prefill
and preemption; every rank must hold 1/k of the weights and KV cache (plus the
replicated norms); a step that fails on the ranks must not hang them; and no worker
process may outlive its engine, nor a driver that dies. The real SmolLM2-135M runs at
TP=3 (9 heads, 3 KV heads) in the slow tier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from servinglab import LLM, SamplingParams
from servinglab.engine.tp_executor import TPWorkerError
from servinglab.impl import load_part
from servinglab.model.prepare import default_model_dir, is_prepared
from servinglab.model.weights import random_model, tiny_llama_config

PROMPT_LENS = [3, 9, 17, 30, 44, 5]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# 20 blocks of 4 tokens for 6 prompts up to 44 + 12 tokens forces preemption; a budget of
# 16 tokens a step splits the 17-, 30- and 44-token prompts into chunks.
SCHEDULE = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, max_model_len=64)
NUM_BLOCKS = 20
BLOCK_BYTES_TP1 = 2 * 2 * 2 * 16 * 4 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16 x 4 tokens x float32


def tiny_llm(tp: int, **kwargs) -> LLM:
    config = tiny_llama_config()
    return LLM(model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config,
               tensor_parallel_size=tp, **{**SCHEDULE, **kwargs})


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def tp1(prompts):
    llm = tiny_llm(1, num_kv_blocks=NUM_BLOCKS)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def tp2():
    """One TP=2 engine for the module; its workers are stopped at teardown whatever happened."""
    # The same 20 blocks per rank, asked for as memory: each rank's block is half the TP=1 block.
    llm = tiny_llm(2, kv_cache_memory_gib=NUM_BLOCKS * (BLOCK_BYTES_TP1 // 2) / 2**30)
    yield llm
    llm.engine.tp_executor.shutdown()


def test_tp2_greedy_tokens_equal_tp1_with_chunked_prefill_and_preemption(tp1, tp2, prompts):
    _, want = tp1
    tp2.engine.record_steps = True
    outs = tp2.generate(prompts, GREEDY, use_tqdm=False)
    tp2.engine.record_steps = False
    assert [o.outputs[0].token_ids for o in outs] == want
    assert sum(o.metrics.num_preemptions for o in outs) > 0, "the 20-block pool should have forced preemption"
    chunks = [n for rec in tp2.engine.step_log for _, n, prefill in rec.scheduled if prefill]
    assert any(0 < n < 17 for n in chunks) and max(len(rec.scheduled) for rec in tp2.engine.step_log) > 1
    stats = tp2.engine.block_manager.get_stats()
    assert stats.num_free_blocks == stats.num_blocks, "blocks leaked after every request finished"


def test_per_rank_weights_and_kv_are_a_kth(tp1, tp2):
    llm1, _ = tp1
    ranks = tp2.engine.tp_executor.rank_stats()
    params = dict(llm1.engine.model.named_parameters())
    total = sum(p.numel() * p.element_size() for p in params.values())
    replicated = sum(p.numel() * p.element_size() for n, p in params.items() if n.endswith("norm.weight"))
    kv1 = NUM_BLOCKS * BLOCK_BYTES_TP1
    for r in ranks:
        assert r["weight_bytes"] == (total - replicated) // 2 + replicated, r
        assert r["replicated_bytes"] == replicated
        assert (r["num_kv_heads"], r["num_kv_blocks"], r["kv_bytes"]) == (1, NUM_BLOCKS, kv1 // 2), r
    assert len({r["pid"] for r in ranks}) == 2 and os.getpid() not in {r["pid"] for r in ranks}


def test_kv_blocks_per_rank_match_part1_capacity_math(tp2):
    kv_cache = load_part("kv_cache")
    config = tiny_llama_config()
    shape = kv_cache.ModelShape.from_config(config.to_dict())
    gib = tp2.engine.config.kv_cache_memory_gib
    part1 = kv_cache.num_kv_blocks(shape, gpu_memory_bytes=int(gib * 2**30), gpu_memory_utilization=1.0, block_size=4,
                                   dtype="float32", weight_bytes=0, tensor_parallel_size=2)
    assert tp2.engine.num_kv_blocks == part1 == NUM_BLOCKS
    same_memory_tp1 = tiny_llm(1, kv_cache_memory_gib=gib).engine.num_kv_blocks
    assert tp2.engine.num_kv_blocks == 2 * same_memory_tp1, "the same memory per rank holds k times the TP=1 blocks"


def test_a_failing_step_does_not_hang_the_workers(tp1, tp2, prompts, monkeypatch):
    engine = tp2.engine
    runner = engine.runner
    real_prepare = runner.prepare_inputs

    def broken(*args, **kwargs):
        batch = real_prepare(*args, **kwargs)
        batch.metadata.slot_mapping[:] = 10**9  # every rank fails at the same KV write
        return batch

    monkeypatch.setattr(runner, "prepare_inputs", broken)
    start = time.perf_counter()
    with pytest.raises(TPWorkerError, match="rank 0"):
        tp2.generate(prompts[:2], GREEDY, use_tqdm=False)
    assert time.perf_counter() - start < 120, "the failure must come back as an error, not a hang"
    monkeypatch.setattr(runner, "prepare_inputs", real_prepare)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    assert all(psutil.pid_exists(pid) for pid in runner.worker_pids), "the workers must survive a failed step"
    outs = tp2.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == tp1[1], "the engine must keep serving after a failed step"


def test_divisibility_error_names_the_parameter_before_any_process_starts():
    config = tiny_llama_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    before = psutil.Process().children(recursive=True)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\)"):
        LLM(model_obj=random_model(config), hf_config=config, tensor_parallel_size=2, dtype="float32")
    assert psutil.Process().children(recursive=True) == before
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        tiny_llm(0)


def test_shutdown_stops_every_worker():
    llm = tiny_llm(2, num_kv_blocks=8)
    pids = llm.engine.tp_executor.worker_pids
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    llm.engine.tp_executor.shutdown()
    llm.engine.tp_executor.shutdown()  # twice is fine
    assert not any(psutil.pid_exists(p) for p in pids), "workers must be gone after shutdown()"
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)


DRIVER = textwrap.dedent("""
    import os, sys, torch
    from servinglab import LLM, impl
    from servinglab.model.weights import random_model, tiny_llama_config
    if __name__ == "__main__":
        impl.set_impl("solutions")
        c = tiny_llama_config()
        llm = LLM(model_obj=random_model(c), hf_config=c, tensor_parallel_size=2, dtype="float32", num_kv_blocks=8)
        print(*llm.engine.tp_executor.worker_pids, flush=True)
        sys.stdin.read()  # wait to be killed
""")


def test_workers_exit_when_the_driver_is_killed(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, f"the driver should print two worker pids, got {pids}"
        proc.send_signal(signal.SIGKILL)  # no atexit, no finalizer: the workers must notice on their own
        proc.wait(timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            time.sleep(0.5)
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"workers {alive} outlived their driver"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_no_worker_outlives_the_tests(tp2):
    ours = [c for c in psutil.Process().children(recursive=True) if c.pid in tp2.engine.tp_executor.worker_pids]
    tp2.engine.tp_executor.shutdown()
    for child in ours:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, f"worker {child.pid} still running"


# ---------------------------------------------------------------- the real model
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three prime numbers:"]


@pytest.mark.slow
@pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`")
def test_smollm2_tp3_equals_tp1_in_float32():
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kwargs = dict(dtype="float32", num_kv_blocks=64, max_model_len=256)
    want = [o.outputs[0].token_ids for o in LLM(str(default_model_dir()), **kwargs).generate(REAL_PROMPTS, params, use_tqdm=False)]
    llm = LLM(str(default_model_dir()), tensor_parallel_size=3, **kwargs)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(REAL_PROMPTS, params, use_tqdm=False)]
        ranks = llm.engine.tp_executor.rank_stats()
    finally:
        llm.engine.tp_executor.shutdown()
    assert got == want
    assert [r["num_kv_heads"] for r in ranks] == [1, 1, 1], "SmolLM2's 3 KV heads: one per rank"
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\).*\[1, 3\]"):
        LLM(str(default_model_dir()), tensor_parallel_size=2, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the NCCL path needs at least one GPU")
def test_one_nccl_rank_on_one_gpu_equals_tp1(prompts):
    """World size 1 over NCCL runs the whole multi-GPU path: spawn, NCCL init, every step broadcast to a rank."""
    want = [o.outputs[0].token_ids for o in tiny_llm(1, num_kv_blocks=NUM_BLOCKS, device="cpu").generate(prompts, GREEDY, use_tqdm=False)]
    llm = tiny_llm(1, num_kv_blocks=NUM_BLOCKS, device="cuda", extra={"distributed_executor_backend": "mp"})
    try:
        assert llm.engine.tp_executor is not None, "distributed_executor_backend='mp' must start a worker rank"
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        stats = llm.engine.tp_executor.rank_stats()
    finally:
        llm.engine.tp_executor.shutdown()
    assert got == want
    print(f"NCCL world size 1: {stats}")

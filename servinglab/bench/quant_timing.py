"""Tokens per second of an engine, for ``servinglab bench quant``: decode at a batch size, and prefill.

Both time whole ``generate`` calls (every variant pays the same scheduling), take the best
of a few runs after a warm-up, and synchronize the device before reading the clock.
"""

from __future__ import annotations

import math
import time
import warnings

import torch


def _timed_generate(llm, prompts: list[list[int]], tokens: int) -> float:
    """Seconds of one greedy ``generate`` of ``tokens`` new tokens per prompt (EOS ignored)."""
    from servinglab.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _random_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def decode_tok_s(llm, vocab: int, batch: int, steps: int, prompt_len: int = 16) -> float:
    """Decode tokens/s of ``batch`` sequences: ``N`` steps timed, the prefill run subtracted.

    On a busy machine a short run can time no longer than the prefill alone; the
    measurement is then repeated with twice the steps (twice at most), and if it still
    fails the result is ``nan`` with a warning, so a table (or a notebook cell) that
    reports it still completes.
    """
    prompts = _random_prompts(vocab, batch, prompt_len, seed=batch)
    _timed_generate(llm, prompts, 2)  # warm-up at this batch size (allocations, compiled graphs, caches)
    for _ in range(3):
        prefill_only = min(_timed_generate(llm, prompts, 1) for _ in range(2))
        with_decode = min(_timed_generate(llm, prompts, 1 + steps) for _ in range(2))
        if with_decode > prefill_only:
            return batch * steps / (with_decode - prefill_only)
        steps *= 2
    warnings.warn(f"timing failed at batch {batch}: {steps // 2} decode steps measured no time "
                  f"({with_decode:.4f} s <= {prefill_only:.4f} s; a busy machine?); reporting nan, raise --steps", stacklevel=2)
    return math.nan


def prefill_tok_s(llm, vocab: int, prompts: int = 16, prompt_len: int = 1000) -> float:
    """Prompt tokens/s of ``prompts`` prompts of ``prompt_len`` tokens, one output token each.

    Each step multiplies up to ``max_num_batched_tokens`` rows (2,048 by default): the
    compute-bound regime, where FP8 GEMMs can win and weight-only formats cannot. Every
    run has prompts of its own: the same prompts again would hit the prefix cache.
    """
    _timed_generate(llm, _random_prompts(vocab, 2, prompt_len, seed=7), 1)  # warm-up: the prefill shapes
    runs = [_timed_generate(llm, _random_prompts(vocab, prompts, prompt_len, seed=8 + i), 1) for i in range(3)]
    return prompts * prompt_len / min(runs)

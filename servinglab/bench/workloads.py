"""Seeded benchmark workloads: the same requests for every system compared."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    """One benchmark request: prompt token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


def random_workload(
    num_requests: int = 64,
    prompt_len: tuple[int, int] = (16, 128),
    output_len: tuple[int, int] = (16, 128),
    vocab_size: int = 49152,
    seed: int = 0,
    min_token_id: int = 100,
) -> list[Request]:
    """Random token prompts with lengths uniform in the inclusive ranges (vLLM's ``random`` dataset).

    Token ids start at ``min_token_id`` so no special token (BOS/EOS/chat markers) lands in a prompt.
    """
    rng = np.random.default_rng(seed)
    p_lens = rng.integers(prompt_len[0], prompt_len[1] + 1, num_requests)
    o_lens = rng.integers(output_len[0], output_len[1] + 1, num_requests)
    return [
        Request(rng.integers(min_token_id, vocab_size, int(p)).tolist(), int(o))
        for p, o in zip(p_lens, o_lens)
    ]


def sharegpt_like_lengths(num_requests: int, seed: int = 0, max_len: int = 2048) -> list[tuple[int, int]]:
    """(prompt, output) lengths with ShareGPT-like long tails (log-normal; the vLLM paper's
    ShareGPT trace has mean input 161 and mean output 338 tokens, Fig. 11)."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(110), 0.9, num_requests), 4, max_len // 2).astype(int)
    outputs = np.clip(rng.lognormal(np.log(230), 0.9, num_requests), 4, max_len // 2).astype(int)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs)]


FEW_SHOT_PREFIX = """You are a careful assistant. Answer each geography question with the capital city only.

Q: What is the capital of Italy?
A: Rome
Q: What is the capital of Spain?
A: Madrid
Q: What is the capital of Germany?
A: Berlin
Q: What is the capital of Portugal?
A: Lisbon
Q: What is the capital of Austria?
A: Vienna
Q: What is the capital of Poland?
A: Warsaw
Q: What is the capital of Greece?
A: Athens
Q: What is the capital of Sweden?
A: Stockholm
Q: What is the capital of Norway?
A: Oslo
Q: What is the capital of Finland?
A: Helsinki
Q: What is the capital of Ireland?
A: Dublin
Q: What is the capital of Hungary?
A: Budapest
Q: What is the capital of Romania?
A: Bucharest
Q: What is the capital of Bulgaria?
A: Sofia
Q: What is the capital of Croatia?
A: Zagreb
Q: What is the capital of Denmark?
A: Copenhagen
"""

COUNTRIES = [
    "France", "Belgium", "the Netherlands", "Switzerland", "Czechia", "Slovakia", "Slovenia", "Serbia",
    "Estonia", "Latvia", "Lithuania", "Iceland", "Canada", "Mexico", "Brazil", "Argentina", "Chile", "Peru",
    "Japan", "China", "India", "Egypt", "Kenya", "Morocco", "Australia", "Turkey", "Ukraine", "Georgia",
    "Vietnam", "Thailand", "Indonesia", "Colombia",
]


def few_shot_prompts(num_requests: int = 32) -> list[str]:
    """Prompts sharing one long few-shot prefix (the paper's shared-prefix experiment, §6.5)."""
    return [f"{FEW_SHOT_PREFIX}Q: What is the capital of {COUNTRIES[i % len(COUNTRIES)]}?\nA:" for i in range(num_requests)]

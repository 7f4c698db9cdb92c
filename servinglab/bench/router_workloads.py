"""Seeded prompt sets for comparing routing policies (the simulator and ``bench router``).

* :func:`shared_prefix_workload`: few-shot style. ``num_prefixes`` long "system prompt +
  examples" prefixes, each followed by a short distinct question; requests of one prefix
  are spread through the run, as many users of a few applications would send them. This is
  the case SGLang's cache-aware router was built for (a prefix cached on one replica is
  recomputed on every other replica it lands on).
* :func:`unique_workload`: the same prompt lengths, no shared prefix: the cache cannot
  help, so only balance matters.

Prompts are random words from a fixed list (about 1.3 tokens a word for SmolLM2's
tokenizer), so each seed gives new prefixes: one run never warms the next run's cache.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "number", "group", "problem", "fact", "river", "garden", "window", "engine", "signal", "market", "letter", "forest", "answer", "reason", "summer", "winter", "paper", "music", "table", "light", "stone", "bridge", "island", "rocket", "planet", "yellow", "silver", "quiet", "gentle", "rapid", "bright", "simple", "careful"]


@dataclass(frozen=True)
class RoutedPrompt:
    """One request: its text, the shared prefix it starts with (-1: none) and that prefix's length in words."""

    text: str
    prefix_id: int
    prefix_words: int
    question_words: int


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def shared_prefix_workload(num: int, num_prefixes: int = 6, prefix_words: int = 200, question_words: int = 12,
                           seed: int = 0) -> list[RoutedPrompt]:
    """``num`` prompts over ``num_prefixes`` long shared prefixes (round-robin order, shuffled)."""
    if num < 1 or num_prefixes < 1 or prefix_words < 1 or question_words < 1:
        raise ValueError(f"num, num_prefixes, prefix_words, question_words must be >= 1, got {num}, {num_prefixes}, {prefix_words}, {question_words}")
    rng = random.Random(seed)
    prefixes = [f"[app {seed}-{p}] You answer in the style of these examples. {_words(rng, prefix_words)}\nQ: " for p in range(num_prefixes)]
    ids = [i % num_prefixes for i in range(num)]
    rng.shuffle(ids)
    return [RoutedPrompt(prefixes[p] + _words(rng, question_words) + "?\nA:", p, prefix_words, question_words) for p in ids]


def unique_workload(num: int, prefix_words: int = 200, question_words: int = 12, seed: int = 0) -> list[RoutedPrompt]:
    """``num`` prompts of the same length as :func:`shared_prefix_workload`'s, sharing nothing."""
    if num < 1 or prefix_words < 1 or question_words < 1:
        raise ValueError(f"num, prefix_words, question_words must be >= 1, got {num}, {prefix_words}, {question_words}")
    rng = random.Random(seed)
    return [RoutedPrompt(f"[{seed}-{i}] " + _words(rng, prefix_words + question_words) + "?\nA:", -1, 0, prefix_words + question_words)
            for i in range(num)]

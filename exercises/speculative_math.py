# Exercise stub generated from solutions/speculative_math.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 5 (analysis): Leviathan et al.'s expected acceptance, tokens per step and speedup.

Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
ICML 2023 (arXiv 2211.17192), section 3: with acceptance rate ``a`` and ``k`` drafts a
target pass yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average, and with a draft that
costs ``c`` target passes per token the wall-time speedup is that divided by ``k c + 1``.
"""

from __future__ import annotations

import torch


def expected_acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """``sum_x min(p(x), q(x))`` over the last dim: the chance one draft is accepted (1 - TV distance)."""
    raise NotImplementedError("expected_acceptance_rate: your code here")


def expected_tokens_per_step(a: float, k: int) -> float:
    """Tokens one target pass yields, ``(1 - a^(k+1)) / (1 - a)`` (Leviathan et al. 2023; ``k + 1`` at a = 1)."""
    raise NotImplementedError("expected_tokens_per_step: your code here")


def expected_speedup(a: float, k: int, c: float) -> float:
    """Wall-time speedup ``(1 - a^(k+1)) / ((1 - a)(k c + 1))``, ``c`` = draft cost / target cost (Leviathan et al. 2023)."""
    raise NotImplementedError("expected_speedup: your code here")

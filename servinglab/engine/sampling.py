"""Sampling parameters (vLLM's names and defaults) and the seeded sampler.

``SamplingParams`` validates itself: a bad value raises ``ValueError`` naming the field
and the allowed range, never a silent clamp. The sampler turns a step's logits into one
token per sequence: greedy when ``temperature == 0``, otherwise temperature, top-k and
top-p (nucleus, Holtzman et al. 2020) filtering, then a draw from the sequence's own
``torch.Generator`` so a seeded request gives the same tokens whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_GREEDY_EPS = 1e-5  # vLLM treats temperatures below this as greedy
# vLLM's seed range: a signed 64-bit integer (torch.iinfo(torch.long)). Completion i of a
# request seeds its generator with seed + i, which stays inside what manual_seed accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    """How to sample one request (a subset of ``vllm.SamplingParams``, same meanings).

    Attributes:
        n: completions per prompt (they share the prompt's KV blocks: copy-on-write).
        temperature: 0 for greedy; higher flattens the distribution.
        top_p: keep the smallest set of tokens whose probability sums to at least top_p.
        top_k: keep the k most likely tokens; 0 or -1 keeps all.
        seed: per-request seed for reproducible sampling.
        max_tokens: most tokens to generate.
        min_tokens: EOS and stop strings are ignored before this many tokens.
        stop: strings that end generation (not included in the text).
        stop_token_ids: token ids that end generation (in addition to EOS).
        ignore_eos: keep going past EOS (benchmarks).
        skip_special_tokens: drop special tokens when detokenizing.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not (self.temperature >= 0.0):  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def make_generator(params: SamplingParams, index: int, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for one sequence of a seeded request (``index``: which of the ``n``)."""
    if params.seed is None or params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed + index)
    return gen


def apply_filters(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p on one row of logits; filtered entries become -inf."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sequence samples from (a one-hot argmax for greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    return torch.softmax(apply_filters(logits.float(), params.temperature, params.top_k, params.top_p), dim=-1)


def sample_tensor(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits`` ([S, vocab], float32) as an int64 tensor on ``logits``' device.

    Nothing here waits for the device (no ``.item()``, no ``.tolist()``): overlap scheduling
    (:mod:`servinglab.engine.async_scheduling`) samples step ``n`` while the host prepares
    step ``n + 1``. :func:`sample` is this, then one copy to the host: the same draws.
    """
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"need one SamplingParams and generator per logits row ({logits.shape[0]}), got {len(params)} and {len(generators)}")
    tokens = logits.argmax(dim=-1)  # greedy rows are done; sampled rows overwrite
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = probabilities(logits[i], p)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` ([S, vocab], float32)."""
    return sample_tensor(logits, params, generators).tolist()


def sample_each(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int | Exception]:
    """:func:`sample`, but a row whose draw raises gets its exception instead of failing the batch.

    Rows are drawn one by one only after a batched draw failed (rare): seeded rows of that
    one step may then draw differently from a failure-free run.
    """
    try:
        return list(sample(logits, params, generators))
    except Exception:
        pass
    rows: list[int | Exception] = []
    for i in range(logits.shape[0]):
        try:
            rows.append(sample(logits[i : i + 1], params[i : i + 1], generators[i : i + 1])[0])
        except Exception as exc:
            rows.append(exc)
    return rows

"""Speculative decoding's settings and counters (vLLM's ``speculative_config`` and spec-decode metrics).

Kept apart from :mod:`.spec_decode` (the step itself) so benchmarks, the server's metrics
and notebooks can read the counters without importing the decoding machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

METHODS = ("ngram", "draft", "custom")
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "draft_num_layers", "model",
         "proposer", "disable_by_batch_size", "adaptive")


@dataclass(frozen=True)
class SpeculativeConfig:
    """A validated ``speculative_config`` (vLLM's dict shape).

    Attributes:
        method: ``ngram`` (prompt lookup), ``draft`` (an early exit of the target, or
            ``model``) or ``custom`` (``proposer``: any object with ``propose(token_ids) ->
            list[int]``, e.g. the benchmark's controlled-acceptance proposer).
        num_speculative_tokens: ``k``, the most drafts verified per sequence per step.
        prompt_lookup_min, prompt_lookup_max: n-gram sizes the ``ngram`` proposer tries.
        draft_num_layers: layers of the early-exit draft (default: a quarter of the target's).
        model: a separate draft: a Hugging Face folder or a transformers causal LM (``draft`` only).
        proposer: the ``custom`` method's proposer.
        disable_by_batch_size: no speculation in steps of at least this many decoding
            sequences (vLLM's key; :mod:`servinglab.engine.spec_policy`).
        adaptive: the measured per-step rule of :mod:`servinglab.engine.spec_policy`
            (``None``: on with CUDA, off on a CPU).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    draft_num_layers: int | None = None
    model: Any = None
    proposer: Any = None
    disable_by_batch_size: int | None = None
    adaptive: bool | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SpeculativeConfig:
        """Check every key and value; raise ``ValueError`` naming the offending key."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"speculative_config must be a dict, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; allowed: {list(_KEYS)}")
        if raw.get("method") not in METHODS:
            raise ValueError(f"speculative_config['method'] must be one of {METHODS}, got {raw.get('method')!r}")
        if "num_speculative_tokens" not in raw:
            raise ValueError("speculative_config['num_speculative_tokens'] (k, drafts per step) is required")
        cfg = cls(**dict(raw))
        for key in ("num_speculative_tokens", "prompt_lookup_min"):
            value = getattr(cfg, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config['{key}'] must be an integer >= 1, got {value!r}")
        if not isinstance(cfg.prompt_lookup_max, int) or cfg.prompt_lookup_max < cfg.prompt_lookup_min:
            raise ValueError(f"speculative_config['prompt_lookup_max'] must be an integer >= prompt_lookup_min "
                             f"({cfg.prompt_lookup_min}), got {cfg.prompt_lookup_max!r}")
        if cfg.method != "draft" and (cfg.model is not None or cfg.draft_num_layers is not None):
            raise ValueError("speculative_config['model'] and ['draft_num_layers'] need method 'draft'")
        if (cfg.method == "custom") != (cfg.proposer is not None) or (cfg.proposer is not None and not callable(getattr(cfg.proposer, "propose", None))):
            raise ValueError("speculative_config['proposer'] (an object with propose(token_ids) -> list[int]) goes with method 'custom', and only there")
        limit = cfg.disable_by_batch_size
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"speculative_config['disable_by_batch_size'] must be an integer >= 1 or None, got {limit!r}")
        if cfg.adaptive is not None and not isinstance(cfg.adaptive, bool):
            raise ValueError(f"speculative_config['adaptive'] must be True, False or None, got {cfg.adaptive!r}")
        return cfg


@dataclass
class SpecDecodeStats:
    """vLLM's spec-decode counters (``vllm:spec_decode_num_drafts`` and friends), plus target passes.

    ``num_steps`` counts target passes of decoding sequences (with or without drafts) and
    ``num_emitted_tokens`` the tokens those passes produced, so ``mean_tokens_per_step`` is
    the measured counterpart of Leviathan's ``(1 - a^(k+1)) / (1 - a)``.
    """

    num_speculative_tokens: int
    num_drafts: int = 0  # verifications with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_steps: int = 0
    num_emitted_tokens: int = 0
    drafts_per_pos: list[int] = field(init=False)  # verified drafts at position 1..k
    accepted_per_pos: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.drafts_per_pos, self.accepted_per_pos = [0] * self.num_speculative_tokens, [0] * self.num_speculative_tokens

    def record(self, num_verified: int, num_accepted: int, num_emitted: int) -> None:
        """One target pass of one sequence that verified ``num_verified`` drafts."""
        self.num_steps += 1
        self.num_emitted_tokens += num_emitted
        if num_verified:
            self.num_drafts += 1
            self.num_draft_tokens += num_verified
            self.num_accepted_tokens += num_accepted
            for i in range(num_verified):
                self.drafts_per_pos[i] += 1
                self.accepted_per_pos[i] += i < num_accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / verified drafts (vLLM's draft acceptance rate)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """Share of drafts at position ``i + 1`` that were accepted; one needs all before it accepted too."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_pos, self.drafts_per_pos)]

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens emitted per target pass of a decoding sequence (1.0 without speculation)."""
        return self.num_emitted_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """vLLM's mean acceptance length: 1 + accepted drafts per verification."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


def generate_with_speculation(llm: Any, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False) -> tuple[list[Any], list[SpecDecodeStats]]:
    """``llm.generate`` on an ``LLM`` built with ``speculative_config``, plus each request's counters.

    Raises:
        ValueError: the engine was built without ``speculative_config``.
    """
    decoder = getattr(llm.engine, "spec_decoder", None)
    if decoder is None:
        raise ValueError("generate_with_speculation needs an LLM built with speculative_config={'method': ..., 'num_speculative_tokens': k}")
    outs = llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
    return outs, [decoder.request_stats.get(o.request_id, SpecDecodeStats(decoder.k)) for o in outs]

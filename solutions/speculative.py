"""Part 5: speculative decoding - rejection sampling, an n-gram proposer, a batch-1 loop.

A cheap *proposer* guesses the next ``k`` tokens; the target model scores all of them in
ONE forward pass (decode is memory-bound, so k + 1 positions cost about what one does);
a *rejection sampler* keeps the longest prefix the target agrees with and adds one token
of its own. Leviathan et al. (ICML 2023, arXiv 2211.17192) show the output is distributed
exactly as if the target had sampled alone. The pieces mirror vLLM v1:
``sample/rejection_sampler.py`` (:func:`rejection_sample`) and
``spec_decode/ngram_proposer.py`` (:class:`NgramProposer`, in :mod:`.ngram_proposer`;
the formulas are in :mod:`.speculative_math`; both are re-exported here).

Why the rule is exact (one position, target ``p``, draft ``q``, drafted ``x ~ q``):
accept ``x`` with probability ``min(1, p(x)/q(x))``; on rejection draw from
``r = norm(max(0, p - q))``. The rejection probability is
``1 - sum_y q(y) min(1, p(y)/q(y)) = 1 - sum_y min(p(y), q(y)) = sum_y max(0, p(y) - q(y))``,
which is exactly r's normaliser, so for every token ``x``::

    P(emit x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p, q)(y)) * r(x)
              = min(p(x), q(x))      + max(0, p(x) - q(x))          = p(x).

Later positions are only reached after every earlier token was accepted, i.e. emitted
with the target's own conditional law, so the argument repeats position by position.
If all ``k`` drafts pass, the target's row ``k`` is free: sample a *bonus* token from it.
The acceptance rate of one draft is ``sum_x min(p(x), q(x))`` (Leviathan's beta).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from servinglab.engine.sampling import SamplingParams, probabilities

from .ngram_proposer import NgramProposer
from .speculative_math import expected_acceptance_rate, expected_speedup, expected_tokens_per_step

__all__ = ["DraftModelProposer", "NgramProposer", "PLACEHOLDER_TOKEN_ID", "Proposer", "SpeculativeDecoding", "SpeculativeOutput",
           "expected_acceptance_rate", "expected_speedup", "expected_tokens_per_step", "rejection_sample"]

PLACEHOLDER_TOKEN_ID = -1  # pads output rows past the emitted tokens (vLLM uses -1 too)
# token ids -> logits [n, V] for the last n positions: all of them, or (a KV-cached model, see
# servinglab.draft_model.cached_logits_fn) at least the positions not seen in the previous call.
LogitsFn = Callable[[list[int]], torch.Tensor]


class Proposer(Protocol):
    """Guesses the next tokens of one sequence. A deterministic proposer (n-gram) only
    needs ``propose``; a sampling one (a draft model) also has ``propose_with_probs``."""

    num_speculative_tokens: int

    def propose(self, token_ids: list[int]) -> list[int]: ...


def rejection_sample(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    num_draft_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``k`` drafted tokens per request against the target, batched over requests.

    Args:
        draft_token_ids: ``[B, k]`` long, the proposed tokens.
        draft_probs: ``[B, k, V]`` float, the draft distribution each token was sampled
            from, or ``None`` for a deterministic proposer (``q`` one-hot on the token).
        target_probs: ``[B, k + 1, V]`` float; row ``i`` is the target's distribution for
            the token after ``i`` drafts (row ``k`` gives the bonus token).
        generator: the random source (``None``: torch's global one).
        num_draft_tokens: optional ``[B]`` long, how many leading drafts of each row are
            real (a proposer may find fewer than ``k``); the rest is padding and the
            token at position ``num_draft_tokens[b]`` comes from ``p`` as a bonus.

    Returns:
        ``(output_token_ids [B, k + 1] long, num_accepted [B] long)``: row ``b`` holds its
        ``num_accepted[b]`` accepted drafts, one recovered or bonus token, then ``-1``s.

    Raises:
        ValueError: naming the parameter, for wrong ranks, mismatched ``B``, ``k`` or
        vocabulary sizes, ``k < 1`` or (for CPU tensors) draft token ids outside ``[0, V)``.

    Batched tensor code: the same tensor operations whatever ``B`` and ``k`` (no Python
    loop over rows or tokens) and no ``.item()`` / ``int(t)`` / ``.tolist()`` on device
    tensors, so on a GPU the whole batch is a handful of kernels with no stall. The
    engine checks this at start-up and falls back to a slow path (and says so) otherwise.
    """
    # Hints: gather p(x_i) and q(x_i); accept iff u_i * q(x_i) < p(x_i) with u_i ~ U[0, 1)
    # (no division, q(x_i) = 0 counts as p/q = inf); a row's accepted count is the length
    # of its leading run of accepts (cumprod); build the recovery distribution only at
    # that one position per row; draw one token per row with the exponential race
    # argmax(dist / Exp(1)) (torch.multinomial runs host-side checks: a GPU stall).
    ### BEGIN SOLUTION
    if draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be [B, k], got shape {tuple(draft_token_ids.shape)}")
    batch, k = draft_token_ids.shape
    if k < 1:
        raise ValueError(f"draft_token_ids must hold k >= 1 drafts per row, got k = {k}")
    if target_probs.dim() != 3 or target_probs.shape[:2] != (batch, k + 1):
        raise ValueError(f"target_probs must be [B, k + 1, V] = [{batch}, {k + 1}, V], got {tuple(target_probs.shape)}")
    vocab = target_probs.shape[-1]
    if draft_probs is not None and tuple(draft_probs.shape) != (batch, k, vocab):
        raise ValueError(f"draft_probs must be [B, k, V] = [{batch}, {k}, {vocab}] (V from target_probs), got {tuple(draft_probs.shape)}")
    if num_draft_tokens is not None and num_draft_tokens.shape != (batch,):
        raise ValueError(f"num_draft_tokens must be [B] = [{batch}], got {tuple(num_draft_tokens.shape)}")
    # Value checks read tensors on the host: free for CPU tensors, a GPU stall for device ones (skipped there).
    if draft_token_ids.device.type == "cpu" and draft_token_ids.numel() and not (0 <= int(draft_token_ids.min()) and int(draft_token_ids.max()) < vocab):
        raise ValueError(f"draft_token_ids must lie in [0, {vocab}) (the target's vocabulary)")
    if num_draft_tokens is not None and num_draft_tokens.device.type == "cpu" and not bool(((num_draft_tokens >= 0) & (num_draft_tokens <= k)).all()):
        raise ValueError(f"num_draft_tokens must hold values in [0, {k}]")
    device = target_probs.device
    ids = draft_token_ids.to(device=device, dtype=torch.long)
    p = target_probs.float()
    p_x = p[:, :k].gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, k]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.float().gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(batch, k, generator=generator, device=device)
    accepted = u * q_x < p_x  # probability min(1, p/q)
    positions = torch.arange(k, device=device)
    n_real = torch.full((batch,), k, device=device) if num_draft_tokens is None else num_draft_tokens.to(device)
    accepted &= positions < n_real.unsqueeze(1)
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # leading run of accepts
    rows = torch.arange(batch, device=device)
    p_at = p[rows, num_accepted]  # [B, V], the target row where this step ends
    q_full = torch.nn.functional.one_hot(ids, vocab).float() if draft_probs is None else draft_probs.float()
    q_full = torch.cat([q_full, torch.zeros(batch, 1, vocab, device=device)], dim=1)  # row k: no draft
    residual = (p_at - q_full[rows, num_accepted]).clamp_min(0.0)
    is_bonus = (num_accepted == n_real).unsqueeze(1)
    # A bonus position (no draft there) samples p itself; a zero residual can only arise
    # when p == q up to rounding, where p is the right law anyway.
    dist = torch.where(is_bonus | (residual.sum(-1, keepdim=True) <= 0), p_at, residual)
    # One draw per row by the exponential race: argmax_x dist(x) / E_x with E_x ~ Exp(1) picks x with
    # probability dist(x) / sum(dist). torch.multinomial does the same inside, after host-side
    # validity checks that stall a GPU (two .item() calls).
    race = torch.empty_like(dist).exponential_(1.0, generator=generator).clamp_min_(1e-30)  # never 0: 0/0 would be NaN
    extra = (dist / race).argmax(dim=-1)
    out = torch.full((batch, k + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=device)
    keep = positions.unsqueeze(0) < num_accepted.unsqueeze(1)
    out[:, :k] = torch.where(keep, ids, out[:, :k])
    out[rows, num_accepted] = extra
    return out, num_accepted
    ### END SOLUTION


class DraftModelProposer:
    """A small draft model (a :data:`LogitsFn`) proposes by sampling ``num_speculative_tokens``
    tokens one at a time from ``q = probabilities(draft logits, params)``."""

    def __init__(self, model: LogitsFn, num_speculative_tokens: int) -> None:
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {num_speculative_tokens!r}")
        self.model = model
        self.num_speculative_tokens = num_speculative_tokens

    def propose_with_probs(
        self, token_ids: Sequence[int], params: SamplingParams, generator: torch.Generator | None = None, num_tokens: int | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """Sample ``num_tokens`` drafts from ``q`` (the draft's logits under ``params``);
        return them and the ``[n, V]`` distributions they came from."""
        ids, rows = list(token_ids), []
        for _ in range(self.num_speculative_tokens if num_tokens is None else num_tokens):
            q = probabilities(self.model(ids)[-1], params)
            rows.append(q)
            ids.append(int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=generator)))
        return ids[len(token_ids) :], torch.stack(rows)

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """Greedy drafts."""
        return self.propose_with_probs(token_ids, SamplingParams(temperature=0.0))[0]


@dataclass
class SpeculativeOutput:
    """Generated tokens and vLLM's spec-decode counters."""

    token_ids: list[int]
    num_steps: int  # target forward passes
    num_draft_tokens: int  # drafts verified
    num_accepted_tokens: int  # drafts accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return len(self.token_ids) / self.num_steps if self.num_steps else 0.0


class SpeculativeDecoding:
    """Speculative decoding for one request (the course's public interface, docs/references.md section 2).

    Args:
        num_speculative_tokens: default ``k`` for :meth:`generate_with_speculation`.
        seed: seeds this object's generator (used when ``params.seed`` is ``None``).
    """

    def __init__(self, num_speculative_tokens: int = 4, seed: int | None = None) -> None:
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {num_speculative_tokens!r}")
        self.num_speculative_tokens = num_speculative_tokens
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def verify_candidates(
        self, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`rejection_sample` with this object's generator by default."""
        return rejection_sample(draft_token_ids, draft_probs, target_probs, generator if generator is not None else self.generator)

    def generate_with_speculation(
        self,
        target: LogitsFn,
        proposer: Proposer,
        prompt_ids: Sequence[int],
        max_tokens: int,
        params: SamplingParams | None = None,
        k: int | None = None,
        eos_token_id: int | None = None,
    ) -> SpeculativeOutput:
        """Generate up to ``max_tokens`` tokens after ``prompt_ids``, ``k`` drafts per target pass.

        Each step: draft ``min(k, tokens still wanted - 1)`` tokens, run the target once on
        the sequence plus the drafts, keep its last ``d + 1`` rows as ``target_probs``
        (``probabilities(logits, params)``: one-hot for greedy), verify, append. With
        no drafts the step is a plain decode step. Stops after ``eos_token_id`` or a token
        in ``params.stop_token_ids`` (unless ``params.ignore_eos``).

        Raises:
            ValueError: ``k < 1``, ``max_tokens < 1``, an empty prompt, or (from
            :func:`rejection_sample`) a draft vocabulary unlike the target's.
        """
        ### BEGIN SOLUTION
        k = self.num_speculative_tokens if k is None else k
        params = params or SamplingParams(temperature=0.0)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids must hold at least one token")
        gen = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed)
        stops = set(params.stop_token_ids) | ({eos_token_id} if eos_token_id is not None and not params.ignore_eos else set())
        tokens, out = list(prompt_ids), SpeculativeOutput([], 0, 0, 0)
        while len(out.token_ids) < max_tokens:
            want = min(k, max_tokens - len(out.token_ids) - 1)
            drafts, draft_probs = [], None
            if want > 0 and hasattr(proposer, "propose_with_probs"):
                drafts, draft_probs = proposer.propose_with_probs(tokens, params, gen, num_tokens=want)
            elif want > 0:
                drafts = list(proposer.propose(tokens))[:want]
            logits = target(tokens + drafts)[-(len(drafts) + 1) :]
            p = probabilities(logits, params)
            out.num_steps += 1
            if drafts:
                ids = torch.tensor([drafts])
                q = None if draft_probs is None else draft_probs.unsqueeze(0)
                row, acc = rejection_sample(ids, q, p.unsqueeze(0), gen)
                new = row[0, : int(acc[0]) + 1].tolist()
                out.num_draft_tokens += len(drafts)
                out.num_accepted_tokens += int(acc[0])
            else:
                new = [int(p[-1].argmax()) if params.greedy else int(torch.multinomial(p[-1], 1, generator=gen))]
            for t in new:
                out.token_ids.append(t)
                tokens.append(t)
                if t in stops:
                    return out
        return out
        ### END SOLUTION

"""When to speculate: per step, only where it is expected to pay (vLLM's ``disable_by_batch_size``, SGLang's adaptive speculation).

A speculative step of a batch of ``B`` decoding sequences takes ``t_spec(B)`` seconds and
emits ``T`` tokens per sequence on average (``T = 1 + accepted drafts``; Leviathan et al.
predict ``(1 - a^(k+1)) / (1 - a)`` for acceptance ``a``); a plain step takes
``t_plain(B)`` and emits one. **The rule: speculate in a step iff**

    ``B < disable_by_batch_size``  (when set)  and  ``T * t_plain(B) >= t_spec(B)``,

i.e. iff speculation's tokens per second beat plain decoding's at this batch size. ``T``
is a running average over the workload (acceptance is a property of the text,
exponentially weighted, ``EWMA`` for the newest step); the two step times are the
medians of the last ``WINDOW`` steps of each kind per batch-size bucket (powers of two),
so one slow step (a collection, a page fault) cannot flip the decision.

Estimates come from running both kinds: a bucket starts with ``MIN_SAMPLES`` plain steps,
then ``MIN_SAMPLES`` speculative ones; after that the kind the rule did not pick still
runs now and then as a *probe*, so the estimates follow the workload. Each probe's cost is
bounded: with ``r = t_spec / (T t_plain)`` (a speculative step's cost per token, in plain
steps' units),

- while speculating (``r <= 1``), a plain probe emits 1 token in ``t_plain`` where
  speculation would have needed ``r t_plain``: it loses ``(1 - r) / (r T)`` speculative
  steps, so it comes every ``max(PROBE_EVERY, (1 - r) / (r T MAX_PROBE_COST))`` steps;
- while not (``r > 1``), a speculative probe takes ``t_spec = r T t_plain`` for ``T``
  tokens: it loses ``T (r - 1)`` plain steps, so it comes every
  ``max(PROBE_EVERY, T (r - 1) / MAX_PROBE_COST)`` steps;

both capped at ``MAX_PROBE_EVERY``. Probes then cost at most ``MAX_PROBE_COST`` of the
throughput wherever one probe loses at most ``MAX_PROBE_COST x MAX_PROBE_EVERY`` = 5 steps
(beyond that, e.g. acceptance 0 with a verification 6x a plain step, the cap wins) (1%: with acceptance 0 and a verification step 2.5x a plain one, as for
the 1.7B config at batch 64 on an H100, one speculative probe in 150 steps; at 2.7x
speed-up, one plain probe in 50), and where acceptance recovers speculation comes back at
the next probe.

With the measured rule on, a step that also prefills (a sequence running or waiting has
prompt tokens left) never speculates: it runs eagerly anyway, and its timing says nothing
about decoding. Only steps whose sequences all decode are timed (a prefill inside a step says nothing
about decoding). Step times are wall times on the host, measured after the step's
device-to-host copy, so they include everything a user waits for: proposing,
verification, rejection sampling and bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EWMA = 0.25  # weight of the newest acceptance measurement
WINDOW = 8  # step times per bucket and kind whose median is the estimate
PROBE_EVERY = 16  # at most one probe step (the kind the rule did not pick) in 16
MIN_SAMPLES = 3  # steps of each kind a bucket starts with
MAX_PROBE_COST = 0.01  # probes (either kind) cost at most this share of the throughput
MAX_PROBE_EVERY = 512  # ... and come at least this often, so the estimates follow the workload


def probe_interval(loss: float) -> int:
    """Steps between probes when one probe loses ``loss`` steps of the chosen kind (module docstring)."""
    return min(MAX_PROBE_EVERY, max(PROBE_EVERY, math.ceil(loss / MAX_PROBE_COST - 1e-9)))  # (- 1e-9: 0.3 / 0.01 is 30.000000000000004)


def bucket_of(batch: int) -> int:
    """The power of two ``>= batch``: steps of similar cost share their estimates."""
    return 1 << max(0, batch - 1).bit_length()


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


def _median(times: list[float] | None) -> float | None:
    return None if not times else sorted(times)[len(times) // 2]


def _push(times: dict[int, list[float]], bucket: int, seconds: float) -> None:
    window = times.setdefault(bucket, [])
    window.append(seconds)
    del window[:-WINDOW]


@dataclass
class SpecPolicy:
    """The per-step on/off rule (see the module docstring).

    Args:
        disable_by_batch_size: speculation is off for batches of at least this many
            decoding sequences (``None``: no fixed limit, the measured rule alone).
        adaptive: apply the measured rule; ``False``: speculate in every step below the
            batch limit (the CPU default, where each step is compute-bound and the course
            shows the raw effect).
    """

    disable_by_batch_size: int | None = None
    adaptive: bool = True
    tokens_per_step: float | None = None  # T: running average of tokens per sequence per speculative step
    t_plain: dict[int, list[float]] = field(default_factory=dict)  # bucket -> last WINDOW plain step times
    t_spec: dict[int, list[float]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    num_spec_steps: int = 0
    num_plain_steps: int = 0

    def should_speculate(self, batch: int) -> bool:
        """Whether the next step of ``batch`` decoding sequences speculates."""
        if batch < 1 or (self.disable_by_batch_size is not None and batch >= self.disable_by_batch_size):
            return False
        if not self.adaptive:
            return True
        b = bucket_of(batch)
        n = self.steps.get(b, 0)
        self.steps[b] = n + 1
        plains, specs = self.t_plain.get(b, []), self.t_spec.get(b, [])
        if len(plains) < MIN_SAMPLES:
            return False
        if len(specs) < MIN_SAMPLES or self.tokens_per_step is None:
            return True
        plain, spec, tokens = _median(plains), _median(specs), self.tokens_per_step
        ratio = spec / (tokens * plain)  # r: a speculative step's cost per token, in plain steps
        if ratio <= 1.0:  # speculate; a plain probe now and then
            every = probe_interval((1.0 - ratio) / (ratio * tokens))
            return n % every != every - 1
        every = probe_interval(tokens * (ratio - 1.0))
        return n % every == every - 1  # plain; a speculative probe now and then

    def record(self, batch: int, speculated: bool, seconds: float, tokens_per_seq: float | None = None) -> None:
        """One all-decode step of ``batch`` sequences took ``seconds``; a speculative one emitted ``tokens_per_seq`` on average."""
        b = bucket_of(batch)
        if speculated:
            self.num_spec_steps += 1
            _push(self.t_spec, b, seconds)
            if tokens_per_seq is not None:
                self.tokens_per_step = _ewma(self.tokens_per_step, tokens_per_seq)
        else:
            self.num_plain_steps += 1
            _push(self.t_plain, b, seconds)

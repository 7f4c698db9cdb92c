"""Verifying drafts with the student's ``rejection_sample``: per group of rows, or the whole batch on the device.

Two callers (:mod:`servinglab.engine.spec_decode`):

- :func:`verify_rows` takes each speculating sequence's own logits rows (the eager path,
  as on a CPU): it pads them into one call per group and reads each row's result back;
- :func:`verify_batch` takes a verification step that ran as one CUDA-graph replay:
  logits ``[n, 1 + k, V]`` already padded, draft ids and counts already on the device.
  Target distributions are built for the whole batch at once, the student's sampler
  runs over the whole batch, and the step reads its result back with ONE device-to-host
  copy (tokens and accepted counts together).

Rows are grouped as before: unseeded rows share one call (with the device's default
generator); a seeded row gets its own call, so its random stream never depends on its
batch. :func:`check_batched` tells whether a ``rejection_sample`` is batched tensor code,
which the device path needs: the engine runs it once at start-up and reports a
per-token loop (or a ``.item()``) instead of silently running it over a GPU batch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence as Seq

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from servinglab.engine.sampling import SamplingParams, apply_filters, probabilities

RejectionSampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def verify_rows(rejection_sample: RejectionSampler, drafts: Seq[tuple[list[int], torch.Tensor | None]],
                logits: Seq[torch.Tensor], params: Seq[SamplingParams], gens: Seq[torch.Generator | None]
                ) -> list[tuple[list[int], int]]:
    """Rejection-sample each row ``(draft tokens, draft probs [d, V] or None)`` against its ``logits [v + 1, V]``.

    Returns ``(emitted tokens, accepted drafts)`` per row.
    """
    groups: dict[object, list[int]] = collections.defaultdict(list)
    for i, ((_, probs), gen) in enumerate(zip(drafts, gens)):
        groups[("shared", probs is None) if gen is None else ("own", i)].append(i)
    results: list[tuple[list[int], int]] = [([], 0)] * len(drafts)
    for rows in groups.values():
        vs = [logits[i].shape[0] - 1 for i in rows]
        width, (_, vocab), dev = max(vs), logits[rows[0]].shape, logits[rows[0]].device
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
        target = torch.zeros(len(rows), width + 1, vocab, device=dev)
        q = None if drafts[rows[0]][1] is None else torch.zeros(len(rows), width, vocab, device=dev)
        for b, (i, v) in enumerate(zip(rows, vs)):
            tokens, probs = drafts[i]
            ids[b, :v] = torch.tensor(tokens[:v])
            target[b, : v + 1] = probabilities(logits[i], params[i])
            if q is not None:
                q[b, :v] = probs[:v]
        out, acc = rejection_sample(ids, q, target, gens[rows[0]], torch.tensor(vs, device=dev))
        for b, i in enumerate(rows):
            n = int(acc[b])
            results[i] = (out[b, : n + 1].tolist(), n)
    return results


def target_probs(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """``probabilities`` for every row of ``logits [n, q, V]`` at once, row ``i`` under ``params[i]``.

    Greedy rows are one-hot argmax; sampled rows with the same (temperature, top_k, top_p)
    are filtered and normalised as one tensor.
    """
    n, _, vocab = logits.shape
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == n:
        return torch.nn.functional.one_hot(logits.argmax(-1), vocab).to(torch.float32)
    out = torch.empty_like(logits, dtype=torch.float32)
    groups: dict[tuple[float, int, float] | None, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(params):
        groups[None if p.greedy else (p.temperature, p.top_k, p.top_p)].append(i)
    for key, rows in groups.items():
        idx = torch.tensor(rows, device=logits.device)
        part = logits.index_select(0, idx).float()
        if key is None:
            probs = torch.nn.functional.one_hot(part.argmax(-1), vocab).to(torch.float32)
        else:
            probs = torch.softmax(apply_filters(part, *key), dim=-1)
        out.index_copy_(0, idx, probs)
    return out


def verify_batch(rejection_sample: RejectionSampler, logits: torch.Tensor, draft_ids: torch.Tensor,
                 num_drafts: torch.Tensor, draft_probs: torch.Tensor | None, params: Seq[SamplingParams],
                 gens: Seq[torch.Generator | None]) -> list[tuple[list[int], int]]:
    """Verify a whole padded batch on its device: ``logits [n, 1 + k, V]``, ``draft_ids [n, k]``,
    ``num_drafts [n]``, ``draft_probs [n, k, V]`` or ``None``. One device-to-host copy.

    Returns ``(emitted tokens, accepted drafts)`` per row.
    """
    n, q, _ = logits.shape
    target = target_probs(logits, params)
    groups: dict[object, list[int]] = collections.defaultdict(list)
    for i, gen in enumerate(gens):
        groups["shared" if gen is None else ("own", i)].append(i)
    if len(groups) == 1:  # the common case: no index shuffling at all
        out, acc = rejection_sample(draft_ids, draft_probs, target, gens[0], num_drafts)
    else:
        out = torch.empty(n, q, dtype=torch.long, device=logits.device)
        acc = torch.empty(n, dtype=torch.long, device=logits.device)
        for rows in groups.values():
            idx = torch.tensor(rows, device=logits.device)
            part = (draft_ids.index_select(0, idx), None if draft_probs is None else draft_probs.index_select(0, idx),
                    target.index_select(0, idx))
            o, a = rejection_sample(*part, gens[rows[0]], num_drafts.index_select(0, idx))
            out.index_copy_(0, idx, o.long())
            acc.index_copy_(0, idx, a.long())
    flat = torch.cat([acc.long().view(n, 1), out.long()], dim=1).tolist()  # the step's one device-to-host copy
    return [(row[1 : row[0] + 2], row[0]) for row in flat]


class _CountOps(TorchDispatchMode):
    """Counts tensor operations, and those that read a device tensor's value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        self.ops += 1
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and tensors and tensors[0].device.type != "cpu":
            self.host_reads += 1
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.device.type == "cpu" and any(t.device.type != "cpu" for t in tensors):
            self.host_reads += 1  # a copy from the device to the host (.cpu(), .tolist())
        return result


def check_batched(rejection_sample: RejectionSampler, device: torch.device | str, vocab: int = 32) -> str | None:
    """``None`` if ``rejection_sample`` is batched tensor code, else why not (a sentence for the user).

    Batched means: the same tensor operations whatever the batch size ``B`` and ``k``
    (no Python loop over rows or tokens), and no device value read on the host
    (``.item()``, ``int(t)``, ``.tolist()``), so a GPU batch costs one launch sequence.
    Measured by running it on two small random batches and counting operations.
    """
    key = (rejection_sample, torch.device(device).type)
    if key not in _CHECKED:
        _CHECKED[key] = _check(rejection_sample, device, vocab)
    return _CHECKED[key]


_CHECKED: dict[tuple[RejectionSampler, str], str | None] = {}  # one probe per function and device type


def _check(rejection_sample: RejectionSampler, device: torch.device | str, vocab: int) -> str | None:
    counts = []
    for batch, k in ((2, 2), (5, 3)):
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, k), generator=gen).to(device)
        target = torch.softmax(torch.randn(batch, k + 1, vocab, generator=gen), -1).to(device)
        probs = torch.softmax(torch.randn(batch, k, vocab, generator=gen), -1).to(device)
        num = torch.full((batch,), k, dtype=torch.long).to(device)
        with _CountOps() as counter:
            rejection_sample(ids, None, target, None, num)
            rejection_sample(ids, probs, target, None, num)
        counts.append((counter.ops, counter.host_reads))
    (ops_small, reads_small), (ops_large, reads_large) = counts
    if reads_small or reads_large:
        return (f"it reads device values on the host ({reads_large} times for a batch of 5 x 3 drafts: .item(), int(...), "
                ".tolist() or .cpu()), which stalls the GPU once per value")
    if ops_small != ops_large:
        return (f"its number of tensor operations grows with the batch ({ops_small} for 2 rows x 2 drafts, {ops_large} for "
                "5 rows x 3 drafts): a Python loop over rows or tokens, one kernel launch per element on a GPU")
    return None

"""The pieces of speculative decoding's GPU fast path, checked on a CPU.

- the per-step on/off rule (:mod:`servinglab.engine.spec_policy`), fed step times;
- the check that a ``rejection_sample`` is batched tensor code, on the reference and
  on a per-token loop that is correct but not batched (it still verifies right; the
  engine reports it);
- the whole-batch verification (:func:`verify_batch`, one device-to-host copy) against
  the per-row path, greedy (exact) and seeded;
- the incremental n-gram index against Part 5's ``NgramProposer``.
"""

from __future__ import annotations

import random
import types
import warnings

import pytest
import torch

from servinglab import impl
from servinglab.engine.ngram_index import NgramIndex
from servinglab.engine.sampling import SamplingParams
from servinglab.engine.spec_policy import MAX_PROBE_COST, MAX_PROBE_EVERY, MIN_SAMPLES, PROBE_EVERY, SpecPolicy, bucket_of
from servinglab.engine.spec_verify import check_batched, verify_batch, verify_rows

REF = impl.load_part("speculative", "solutions")


def looped_rejection_sample(draft_token_ids, draft_probs, target_probs, generator=None, num_draft_tokens=None):
    """Correct, but a Python loop over rows and tokens with ``.item()``: what a first attempt often looks like."""
    batch, k = draft_token_ids.shape
    out = torch.full((batch, k + 1), -1, dtype=torch.long)
    accepted = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        n = k if num_draft_tokens is None else int(num_draft_tokens[b].item())
        i = 0
        while i < n:
            x = int(draft_token_ids[b, i].item())
            p, q = float(target_probs[b, i, x]), 1.0 if draft_probs is None else float(draft_probs[b, i, x])
            if float(torch.rand(1, generator=generator)) * q < p:
                out[b, i] = x
                i += 1
                continue
            break
        accepted[b] = i
        dist = target_probs[b, i].clone()
        if i < n:
            q = torch.nn.functional.one_hot(draft_token_ids[b, i], dist.shape[0]).float() if draft_probs is None else draft_probs[b, i]
            residual = (dist - q).clamp_min(0)
            dist = residual if residual.sum() > 0 else dist
        out[b, i] = int(torch.multinomial(dist / dist.sum(), 1, generator=generator).item())
    return out, accepted


def test_policy_warms_up_then_follows_the_measured_rule():
    policy = SpecPolicy()
    for _ in range(MIN_SAMPLES):
        assert not policy.should_speculate(1), "first plain steps, to know t_plain"
        policy.record(1, False, 1.0)
    for _ in range(MIN_SAMPLES):
        assert policy.should_speculate(1), "then speculative ones, to know t_spec and T"
        policy.record(1, True, 1.3, tokens_per_seq=3.0)  # 3 tokens in 1.3 plain steps: pays
    # r = 1.3 / 3; a plain probe loses (1 - r) / (r T) = 0.436 speculative steps: one in 44 steps.
    decisions = [policy.should_speculate(1) for _ in range(440)]
    assert decisions.count(False) == 10, "speculating, with one plain probe every 44 steps"
    low = SpecPolicy(t_plain={1: [1.0] * 3}, t_spec={1: [1.3] * 3}, tokens_per_step=1.0)  # acceptance 0: T = 1 < 1.3
    decisions = [low.should_speculate(1) for _ in range(300)]
    assert decisions.count(True) == 10, "off; a speculative probe loses 0.3 plain steps: one in 30 steps"
    costly = SpecPolicy(t_plain={1: [1.0] * 3}, t_spec={1: [4.0] * 3}, tokens_per_step=1.0)  # a probe costs 3 steps
    decisions = [costly.should_speculate(1) for _ in range(600)]
    assert decisions.count(True) == 2, "probes at most MAX_PROBE_COST of the throughput: one in 300 steps here"
    hopeless = SpecPolicy(t_plain={1: [1.0] * 3}, t_spec={1: [20.0] * 3}, tokens_per_step=1.0)
    decisions = [hopeless.should_speculate(1) for _ in range(2 * MAX_PROBE_EVERY)]
    assert decisions.count(True) == 2, "still one probe in MAX_PROBE_EVERY steps, so a change in the text is seen"
    near = SpecPolicy(t_plain={1: [1.0] * 3}, t_spec={1: [1.05] * 3}, tokens_per_step=1.0)
    decisions = [near.should_speculate(1) for _ in range(4 * PROBE_EVERY)]
    assert decisions.count(True) == 4, "and at most one probe in PROBE_EVERY steps"
    for _ in range(8):  # acceptance recovers: the probes see it and speculation comes back
        low.record(1, True, 1.3, tokens_per_seq=3.5)
    assert low.should_speculate(1)
    assert bucket_of(1) == 1 and bucket_of(5) == bucket_of(8) == 8 and bucket_of(9) == 16


@pytest.mark.parametrize("seed", range(4))
def test_policy_probes_cost_at_most_max_probe_cost(seed: int) -> None:
    """Simulated steps of fixed cost: the rule's throughput is within MAX_PROBE_COST of the better kind's."""
    rng = random.Random(seed)
    for _ in range(25):
        t_spec, tokens = rng.uniform(0.5, 6.0), rng.uniform(1.0, 5.0)
        if tokens * (t_spec / tokens - 1.0) > MAX_PROBE_COST * MAX_PROBE_EVERY:
            continue  # one probe loses more than the cap allows for: the cap wins (module docstring)
        policy = SpecPolicy(t_plain={1: [1.0] * 3}, t_spec={1: [t_spec] * 3}, tokens_per_step=tokens)
        time_spent = emitted = 0.0
        for _ in range(5000):
            spec = policy.should_speculate(1)
            time_spent += t_spec if spec else 1.0
            emitted += tokens if spec else 1.0
        best = max(1.0, tokens / t_spec)  # tokens per unit time of the better kind
        # (a whole probe more or less over 5000 steps: 2% of the bound)
        assert emitted / time_spent >= best * (1 - 1.02 * MAX_PROBE_COST), (t_spec, tokens)


def test_policy_batch_limit_and_non_adaptive_mode():
    limited = SpecPolicy(disable_by_batch_size=32, adaptive=False)
    assert limited.should_speculate(31) and not limited.should_speculate(32) and not limited.should_speculate(64)
    assert not SpecPolicy().should_speculate(0)
    fast_plain = SpecPolicy(t_plain={64: [1.0] * 3}, t_spec={64: [3.0] * 3}, tokens_per_step=2.5, steps={64: 0})
    assert not fast_plain.should_speculate(64), "2.5 tokens per step cannot pay for a step 3x as long"
    noisy = SpecPolicy(t_plain={1: [1.0] * 7}, t_spec={1: [1.3] * 3}, tokens_per_step=1.0, steps={1: 0})
    noisy.record(1, False, 5.0)  # one slow plain step (a collection): the median keeps the decision
    assert not noisy.should_speculate(1)


def test_check_batched_accepts_the_reference_and_reports_a_loop():
    assert check_batched(REF.rejection_sample, "cpu") is None
    reason = check_batched(looped_rejection_sample, "cpu")
    assert reason is not None and "grows with the batch" in reason


def test_a_looped_sampler_is_still_correct_and_the_engine_reports_it(monkeypatch):
    choice = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]])
    target = torch.nn.functional.one_hot(choice, 6).float()
    drafts = torch.tensor([[1, 2, 3], [1, 0, 3], [1, 1, 1]])
    out, acc = looped_rejection_sample(drafts, None, target)
    assert out.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [0, -1, -1, -1]] and acc.tolist() == [3, 1, 0]
    from servinglab import LLM
    from servinglab.engine import spec_decode
    from servinglab.model.weights import random_model, tiny_llama_config

    student = types.SimpleNamespace(**{n: getattr(REF, n) for n in ("NgramProposer", "DraftModelProposer")},
                                    rejection_sample=looped_rejection_sample)
    monkeypatch.setattr(spec_decode, "load_part", lambda name: student)
    config = tiny_llama_config()
    llm = LLM(model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config, dtype="float32", block_size=4,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    decoder = llm.engine.spec_decoder
    assert decoder.not_batched is not None and not decoder.graph_verify
    outs = llm.generate([[5, 6, 7] * 4], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 12, "the per-row fallback still generates"


def _batch_case(seed: int, n: int = 6, k: int = 3, vocab: int = 11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k + 1, vocab, generator=gen) * 3
    counts = torch.randint(0, k + 1, (n,), generator=gen)
    greedy_next = logits.argmax(-1)
    ids = torch.randint(0, vocab, (n, k), generator=gen)
    ids = torch.where(torch.rand(n, k, generator=gen) < 0.6, greedy_next[:, :k], ids)  # often right
    return logits, ids, counts


def test_verify_batch_matches_the_per_row_path_greedy():
    logits, ids, counts = _batch_case(0)
    params = [SamplingParams(temperature=0.0)] * len(ids)
    batch = verify_batch(REF.rejection_sample, logits, ids, counts, None, params, [None] * len(ids))
    rows = verify_rows(REF.rejection_sample, [(ids[i, : counts[i]].tolist(), None) for i in range(len(ids))],
                       [logits[i, : counts[i] + 1] for i in range(len(ids))], params, [None] * len(ids))
    assert batch == rows
    assert any(a > 0 for _, a in batch) and any(len(t) == a + 1 for t, a in batch)


def test_verify_batch_seeded_rows_do_not_depend_on_their_batch():
    logits, ids, counts = _batch_case(1)
    params = [SamplingParams(temperature=0.9, top_k=5, seed=3), SamplingParams(temperature=1.0)] * 3

    def gens():
        return [torch.Generator().manual_seed(3 + i) if p.seed is not None else None for i, p in enumerate(params)]

    whole = verify_batch(REF.rejection_sample, logits, ids, counts, None, params, gens())
    for i in (0, 2, 4):
        alone = verify_batch(REF.rejection_sample, logits[i : i + 1], ids[i : i + 1], counts[i : i + 1], None,
                             params[i : i + 1], [torch.Generator().manual_seed(3 + i)])
        assert alone[0] == whole[i]


def test_ngram_index_proposes_what_the_student_proposer_does():
    rng = random.Random(0)
    for _ in range(60):
        lo = rng.randint(1, 3)
        hi, k = rng.randint(lo, 4), rng.randint(1, 5)
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 4))]
        index, student = NgramIndex(lo, hi, k), REF.NgramProposer(lo, hi, k)
        for _ in range(12):
            assert index.propose(tokens) == student.propose(tokens), (tokens, lo, hi, k)
            tokens = tokens + [rng.randrange(4) for _ in range(rng.randint(1, 3))]


def test_disable_by_batch_size_turns_speculation_off():
    """``disable_by_batch_size=1``: every step has at least one decoding sequence, so none speculates;
    with the measured rule on (the GPU default) greedy tokens stay the plain engine's."""
    from servinglab import LLM
    from servinglab.model.weights import random_model, tiny_llama_config

    config = tiny_llama_config()
    model = random_model(config, dtype=torch.float32, seed=0)
    prompts = [[5, 6, 7] * 4, [9, 8] * 5]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = LLM(model_obj=model, hf_config=config, dtype="float32", block_size=4).generate(prompts, params, use_tqdm=False)
    llm = LLM(model_obj=model, hf_config=config, dtype="float32", block_size=4,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1})
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    stats = llm.engine.spec_decoder.stats
    assert stats.num_draft_tokens == 0 and stats.num_emitted_tokens == 20 - 2, "plain steps only (first tokens come from prefill)"
    adaptive = LLM(model_obj=model, hf_config=config, dtype="float32", block_size=4,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2, "adaptive": True})
    outs = adaptive.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    policy = adaptive.engine.spec_decoder.policy
    assert policy.num_plain_steps >= 3 and policy.num_spec_steps >= 1, "it measures both kinds of step"

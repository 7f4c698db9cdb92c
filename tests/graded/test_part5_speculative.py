"""Graded tests for Part 5: speculative decoding (rejection sampling, proposers, the loop).

The distribution tests draw many verification steps at once (one batch row per trial,
fixed seeds) and compare the empirical law of the emitted tokens with the target's law
by Pearson's chi-square test at a false-alarm rate of ALPHA = 1e-3: a correct sampler
fails a given test with probability 1e-3 over seeds, and the seeds here are fixed, so
the outcome is reproducible. Rejection rule, acceptance rate and the expected-speedup
formulas are from Leviathan et al., ICML 2023 (arXiv 2211.17192), as collected in
docs/references.md.

Bugs these tests guard against, each caught by at least two of them (hand-computed
cases, and laws or reference comparisons; ``scripts/mutation_check.py`` plants them): the
acceptance test inverted; a rejected draft resampled from the target instead of the
residual; every accepted draft counted instead of the leading run; the n-gram proposer
taking the oldest match instead of the most recent; the expected tokens per step missing
the bonus token.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

import servinglab.impl
from servinglab import SamplingParams

ALPHA = 1e-3  # chi-square false-alarm rate
N = 20_000  # trials per distribution test
P = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.08, 0.02])  # the target law on a 6-token vocabulary
DRAFTS = {  # draft laws q: close to p, bad (its mass where p is ~0), equal to p, uniform
    "close": torch.tensor([0.25, 0.30, 0.15, 0.15, 0.10, 0.05]),
    "bad": torch.tensor([0.01, 0.01, 0.01, 0.01, 0.06, 0.90]),
    "equal": P.clone(),
    "uniform": torch.full((6,), 1 / 6),
}


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: torch's thread pool only adds wake-up latency (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(name="speculative")
def speculative_module() -> ModuleType:
    return importlib.import_module(f"{servinglab.impl.current_impl()}.speculative")


def sample_drafts(q: torch.Tensor, batch: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft tokens drawn from q at each of k positions, and q broadcast to [B, k, V]."""
    ids = torch.multinomial(q.expand(batch * k, -1), 1, replacement=True, generator=gen).view(batch, k)
    return ids, q.expand(batch, k, -1).clone()


def assert_law(tokens: torch.Tensor, p: torch.Tensor, what: str) -> None:
    """Chi-square goodness of fit of `tokens` to `p` at ALPHA; zero-probability tokens must never appear."""
    counts = torch.bincount(tokens, minlength=len(p)).double()
    support = p > 0
    assert counts[~support].sum() == 0, f"{what}: emitted tokens the target gives probability 0"
    pd = p[support].double()
    expected = pd / pd.sum() * counts.sum()
    pvalue = chisquare(counts[support].numpy(), expected.numpy()).pvalue
    assert pvalue > ALPHA, f"{what}: empirical {(counts / counts.sum()).numpy().round(4)} vs target {p.numpy()} (p-value {pvalue:.2e})"


def tiny_llama(seed: int, vocab: int = 128, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def logits_fn(model: LlamaForCausalLM):
    def fn(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    return fn


def plain_greedy(fn, prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(fn(ids)[-1].argmax()))
    return ids[len(prompt):]


@pytest.mark.part(5)
@pytest.mark.points(2)
@pytest.mark.parametrize("draft", list(DRAFTS))
def test_emitted_tokens_follow_target(speculative, draft):
    """First emitted token ~ p for any q; so is the second one, given the first was accepted (ALPHA = 1e-3)."""
    gen = torch.Generator().manual_seed(1)
    p1 = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.22, 0.28])  # a different law at position 1
    ids, q = sample_drafts(DRAFTS[draft], N, 2, gen)
    target = torch.stack([P, p1, P]).expand(N, 3, -1)
    out, num_accepted = speculative.rejection_sample(ids, q, target, gen)
    assert out.shape == (N, 3) and num_accepted.shape == (N,), "rejection_sample returns (tokens [batch, k + 1], num_accepted [batch])"
    assert_law(out[:, 0], P, f"position 0, draft {draft}")
    second = out[num_accepted >= 1, 1]
    assert len(second) > 1000, "too few rows reached a second token: check that accepted rows continue"
    assert_law(second, p1, f"position 1, draft {draft}")


@pytest.mark.part(5)
@pytest.mark.points(2)
def test_acceptance_rate_is_overlap(speculative):
    """P(accept one draft) = sum_x min(p(x), q(x)) (Leviathan's beta), within 5 standard errors."""
    gen = torch.Generator().manual_seed(2)
    for name, q in DRAFTS.items():
        beta = float(torch.minimum(P, q).sum())
        assert float(speculative.expected_acceptance_rate(P, q)) == pytest.approx(beta), "expected_acceptance_rate is sum over tokens of min(p, q)"
        ids, qs = sample_drafts(q, N, 1, gen)
        _, num_accepted = speculative.rejection_sample(ids, qs, P.expand(N, 2, -1), gen)
        rate = num_accepted.double().mean().item()
        assert abs(rate - beta) < 5 * (beta * (1 - beta) / N) ** 0.5 + 1e-9, f"draft {name}: {rate:.4f} vs {beta:.4f}"


@pytest.mark.part(5)
@pytest.mark.points(2)
def test_deterministic_proposer_keeps_target_law(speculative):
    """draft_probs=None (n-gram: q one-hot on the proposal): accepted with prob p(x), output ~ p (ALPHA = 1e-3)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 5, 3]).repeat(N // 3 + 1)[:N].unsqueeze(1)
    out, num_accepted = speculative.rejection_sample(ids, None, P.expand(N, 2, -1), gen)
    for x in (0, 5, 3):
        rows = ids[:, 0] == x
        assert_law(out[rows, 0], P, f"proposal {x}")
        rate = num_accepted[rows].double().mean().item()
        assert abs(rate - float(P[x])) < 5 * (float(P[x]) * (1 - float(P[x])) / int(rows.sum())) ** 0.5, "with a one-hot (deterministic) draft, it must be accepted with probability p(x)"


@pytest.mark.part(5)
@pytest.mark.points(3)
def test_greedy_accepts_exactly_the_argmax(speculative):
    """One-hot target rows: drafts equal to the argmax are accepted, the first mismatch emits the argmax."""
    target_choice = torch.tensor([4, 1, 1, 0, 3])  # the target's argmax at rows 0..4 (row 4 is the bonus)
    target = torch.nn.functional.one_hot(target_choice, 6).float().unsqueeze(0)
    for drafts, accepted, emitted in [
        ([4, 1, 1, 0], 4, [4, 1, 1, 0, 3]),
        ([4, 1, 2, 0], 2, [4, 1, 1]),
        ([5, 1, 1, 0], 0, [4]),
    ]:
        for draft_probs in (None, torch.full((1, 4, 6), 1 / 6)):
            out, num_accepted = speculative.rejection_sample(torch.tensor([drafts]), draft_probs, target, None)
            assert int(num_accepted[0]) == accepted, "greedy: accept while the draft equals the target's argmax, stop at the first mismatch"
            assert out[0].tolist() == emitted + [-1] * (5 - len(emitted)), "after the accepted drafts emit the target's argmax, then pad with -1"


@pytest.mark.part(5)
@pytest.mark.points(2)
def test_all_accepted_adds_a_bonus_token_from_p(speculative):
    """Drafts the target is sure of are all accepted; the bonus comes from row k (ALPHA = 1e-3)."""
    gen = torch.Generator().manual_seed(4)
    sure = torch.nn.functional.one_hot(torch.tensor([2, 3]), 6).float()
    target = torch.cat([sure, P.unsqueeze(0)]).expand(N, 3, -1)
    out, num_accepted = speculative.rejection_sample(torch.tensor([[2, 3]]).expand(N, 2), None, target, gen)
    assert bool((num_accepted == 2).all()) and bool((out[:, :2] == torch.tensor([2, 3])).all()), "all drafts accepted: emit them and a bonus token sampled from the last target distribution"
    assert_law(out[:, 2], P, "bonus token")


@pytest.mark.part(5)
@pytest.mark.points(3)
def test_batch_rows_are_independent(speculative):
    """Rows with different acceptance counts are padded with -1 and match their own single-row calls."""
    choice = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0], [5, 4, 3, 2]])
    target = torch.nn.functional.one_hot(choice, 6).float()
    drafts = torch.tensor([[1, 2, 3], [1, 0, 3], [1, 1, 1], [5, 4, 3]])
    out, num_accepted = speculative.rejection_sample(drafts, None, target, None)
    assert num_accepted.tolist() == [3, 1, 0, 3], "each row stops at its own first rejection"
    assert out.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [0, -1, -1, -1], [5, 4, 3, 2]], "rows are padded with -1 after their last emitted token"
    for b in range(4):
        row, acc = speculative.rejection_sample(drafts[b : b + 1], None, target[b : b + 1], None)
        assert row[0].tolist() == out[b].tolist() and int(acc[0]) == int(num_accepted[b]), "a row verified alone must give what it gives inside the batch"
    # num_draft_tokens marks padding: a row with n real drafts ends with a bonus token from row n
    out3, acc3 = speculative.rejection_sample(drafts, None, target, None, num_draft_tokens=torch.tensor([3, 1, 0, 2]))
    assert acc3.tolist() == [3, 1, 0, 2], "rows with fewer real drafts (padding) must stop at their own length"
    assert out3.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [0, -1, -1, -1], [5, 4, 3, -1]], "rows with fewer real drafts (padding) must stop at their own length"
    # verify_candidates is the public (original guide's) wrapper around the same sampler
    out2, acc2 = speculative.SpeculativeDecoding(num_speculative_tokens=3).verify_candidates(drafts, None, target)
    assert torch.equal(out2, out) and torch.equal(acc2, num_accepted), "verify_candidates must return what rejection_sample returns for the same inputs"


@pytest.mark.part(5)
@pytest.mark.points(1)
def test_ngram_prefers_longest_then_most_recent_match(speculative):
    """vLLM-style prompt lookup: the longest suffix n-gram that occurred before; its latest earlier occurrence."""
    for tokens, lo, hi, k, expected in [
        ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 1, 3, 2, [9, 2]),  # the 3-gram [1, 2, 3] beats the later 2-gram [2, 3]
        ([4, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 1, 2, 3, [7, 5, 2]),  # most recent earlier [2, 3]
        ([5, 6, 5, 6], 2, 4, 5, [5, 6]),  # match right before the suffix: its continuation is the suffix
        ([7, 7, 7, 7], 1, 3, 2, [7]),  # longest n = 3 matches at 0, and only one token follows it
    ]:
        assert speculative.NgramProposer(lo, hi, k).propose(tokens) == expected, (tokens, lo, hi, k)


@pytest.mark.part(5)
@pytest.mark.points(1)
def test_ngram_bounds_and_no_match(speculative):
    """n stays within [prompt_lookup_min, prompt_lookup_max]; at most k tokens; [] when nothing matches."""
    for tokens, lo, hi, k, expected in [
        ([4, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 3, 3, 3, []),  # no earlier 3-gram
        ([1, 2, 3, 4, 5, 6, 1, 2, 3], 4, 5, 2, []),  # [1, 2, 3] repeats but is shorter than min
        ([1, 2, 3, 4, 5, 6, 7, 1, 2, 3], 1, 2, 4, [4, 5, 6, 7]),  # max 2: [2, 3] matches; k caps the proposal
        ([1, 2, 3, 4, 5, 6, 7, 1, 2, 3], 1, 2, 9, [4, 5, 6, 7, 1, 2, 3]),  # cut at the end of the sequence
        ([1, 2, 3, 4], 1, 3, 3, []),  # nothing repeats
        ([3], 1, 3, 3, []),  # too short
    ]:
        assert speculative.NgramProposer(lo, hi, k).propose(tokens) == expected, (tokens, lo, hi, k)


@pytest.mark.part(5)
@pytest.mark.points(1)
@pytest.mark.parametrize("proposer_kind", ["ngram", "draft_model", "target_as_draft"])
def test_greedy_generation_equals_plain_greedy(speculative, proposer_kind):
    """Greedy speculative decoding reproduces the target's own greedy tokens exactly (tiny random Llama)."""
    target = logits_fn(tiny_llama(0))
    prompt = [5, 17, 33, 5, 17, 33, 5, 17, 90, 12, 5, 17]
    proposer = {
        "ngram": lambda: speculative.NgramProposer(1, 3, 4),
        "draft_model": lambda: speculative.DraftModelProposer(logits_fn(tiny_llama(1, layers=1)), 4),
        "target_as_draft": lambda: speculative.DraftModelProposer(target, 4),
    }[proposer_kind]()
    result = speculative.SpeculativeDecoding().generate_with_speculation(
        target, proposer, prompt, max_tokens=24, params=SamplingParams(temperature=0.0), k=4)
    assert result.token_ids == plain_greedy(target, prompt, 24), "greedy speculative decoding must reproduce plain greedy decoding token for token"
    assert result.num_draft_tokens > 0, "the proposer never proposed anything: call it every step"
    if proposer_kind == "target_as_draft":  # every draft accepted: 5 tokens per target pass
        assert result.num_accepted_tokens == result.num_draft_tokens and result.num_steps == 5, "a perfect proposer: every draft accepted, k + 1 tokens per step"
    else:
        assert result.num_steps >= 24 // 5 and result.num_accepted_tokens <= result.num_draft_tokens, "counts: num_steps passes, num_accepted_tokens <= num_draft_tokens"


@pytest.mark.part(5)
@pytest.mark.points(1)
@pytest.mark.parametrize("proposer_kind", ["ngram", "draft_model"])
def test_sampled_generation_is_exact(speculative, proposer_kind):
    """The whole loop samples the target's chain: first two tokens of a bigram target (ALPHA = 1e-3)."""
    V, trials = 4, 6000
    g = torch.Generator().manual_seed(5)
    target_table, draft_table = torch.randn(V, V, generator=g), torch.randn(V, V, generator=g)
    target = lambda ids: target_table[torch.tensor(ids)]
    proposer = (speculative.NgramProposer(1, 2, 2) if proposer_kind == "ngram"
                else speculative.DraftModelProposer(lambda ids: draft_table[torch.tensor(ids)], 2))
    spec = speculative.SpeculativeDecoding(seed=6)
    params = SamplingParams(temperature=1.0)
    prompt = [0, 1, 2, 0, 1]
    pairs = []
    for _ in range(trials):
        out = spec.generate_with_speculation(target, proposer, prompt, max_tokens=3, params=params, k=2)
        assert len(out.token_ids) == 3, "max_tokens caps the generated tokens"
        pairs.append(out.token_ids[0] * V + out.token_ids[1])
    probs = torch.softmax(target_table, -1)
    joint = (probs[prompt[-1]].unsqueeze(1) * probs).reshape(-1)  # P(t1) P(t2 | t1)
    assert_law(torch.tensor(pairs), joint, f"{proposer_kind} loop")


@pytest.mark.part(5)
@pytest.mark.points(1)
def test_leviathan_formulas(speculative):
    """docs/references.md (Leviathan et al.): a=0.8, g=4 -> 3.362 tokens; speedups 1.921, 2.801, 3.413 at c=0.05."""
    assert speculative.expected_tokens_per_step(0.8, 4) == pytest.approx(3.362, abs=5e-4), "expected tokens per step = (1 - a^(k+1)) / (1 - a) (Leviathan et al.)"
    for a, want in [(0.6, 1.921), (0.8, 2.801), (0.9, 3.413)]:
        assert speculative.expected_speedup(a, 4, 0.05) == pytest.approx(want, abs=5e-4), "speedup = (1 - a^(k+1)) / ((1 - a)(k c + 1)) (Leviathan et al.)"
    assert speculative.expected_tokens_per_step(1.0, 3) == 4.0 and speculative.expected_tokens_per_step(0.0, 3) == 1.0, "the limits: a = 1 gives k + 1 tokens, a = 0 gives 1 token"
    assert speculative.expected_speedup(0.0, 2, 0.5) == pytest.approx(0.5), "speedup = tokens per step / (k c + 1)"


@pytest.mark.part(5)
@pytest.mark.points(1)
def test_expected_tokens_agree_with_the_rejection_sampler(speculative):
    # Reference comparison: a deterministic draft of token 0 that the target gives probability a is
    # accepted with probability a; a step emits the accepted drafts plus one token. The mean over
    # 20,000 rows must agree with expected_tokens_per_step (standard error about 0.01).
    gen = torch.Generator().manual_seed(5)
    for a, k in ((0.7, 4), (0.4, 2)):
        rows = 20_000
        drafts = torch.zeros(rows, k, dtype=torch.long)
        target = torch.tensor([a, 1 - a]).expand(rows, k + 1, 2).contiguous()
        _, accepted = speculative.rejection_sample(drafts, None, target, gen)
        emitted = float((accepted + 1).float().mean())
        want = speculative.expected_tokens_per_step(a, k)
        assert abs(emitted - want) < 0.05, f"a={a}, k={k}: the sampler emits {emitted:.3f} tokens a step, the formula says {want:.3f}"


@pytest.mark.part(5)
@pytest.mark.points(1)
def test_ngram_matches_a_brute_force_search(speculative):
    # Reference comparison over 300 seeded random sequences of a 3-token vocabulary (many repeats).
    def brute(tokens, lo, hi, k):
        for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
            starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == tokens[-n:]]
            if starts:
                return tokens[starts[-1] + n : starts[-1] + n + k]  # the latest earlier occurrence
        return []

    gen = torch.Generator().manual_seed(11)
    for case in range(300):
        tokens = torch.randint(0, 3, (int(torch.randint(1, 15, (1,), generator=gen)),), generator=gen).tolist()
        lo = int(torch.randint(1, 4, (1,), generator=gen))
        hi, k = lo + int(torch.randint(0, 3, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
        got = speculative.NgramProposer(lo, hi, k).propose(tokens)
        assert got == brute(tokens, lo, hi, k), f"case {case}: propose({tokens}) with n in [{lo}, {hi}], k={k} gave {got}"


@pytest.mark.part(5)
@pytest.mark.points(3)
def test_bad_input_raises_value_error(speculative):
    s = speculative
    for args, name in [((0, 2, 3), "prompt_lookup_min"), ((3, 2, 3), "prompt_lookup_max"), ((1, 2, 0), "num_speculative_tokens")]:
        with pytest.raises(ValueError, match=name):
            s.NgramProposer(*args)
    ids, target = torch.tensor([[1, 2]]), torch.full((1, 3, 6), 1 / 6)
    with pytest.raises(ValueError, match="draft_probs"):  # a draft vocabulary of 5 against the target's 6
        s.rejection_sample(ids, torch.full((1, 2, 5), 0.2), target, None)
    with pytest.raises(ValueError, match="target_probs"):
        s.rejection_sample(ids, None, target[:, :2], None)
    with pytest.raises(ValueError, match="draft_token_ids"):
        s.rejection_sample(torch.tensor([[1, 6]]), None, target, None)
    with pytest.raises(ValueError, match="draft_token_ids"):
        s.rejection_sample(torch.tensor([1, 2]), None, target, None)
    for call, name in [(lambda: s.expected_tokens_per_step(1.5, 4), "a"), (lambda: s.expected_tokens_per_step(0.5, 0), "k"),
                       (lambda: s.expected_speedup(0.5, 4, -1.0), "c")]:
        with pytest.raises(ValueError, match=name):
            call()
    target_fn = logits_fn(tiny_llama(0))
    with pytest.raises(ValueError, match="k"):
        s.SpeculativeDecoding().generate_with_speculation(target_fn, s.NgramProposer(1, 2, 3), [1, 2, 1], 5, k=0)
    small_draft = s.DraftModelProposer(logits_fn(tiny_llama(1, vocab=100)), 3)
    with pytest.raises(ValueError, match="draft_probs"):
        s.SpeculativeDecoding().generate_with_speculation(target_fn, small_draft, [1, 2, 1], 5, k=3)

"""Build notebooks/day51/05_speculative.ipynb: Part 5, speculative decoding."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("05_speculative")
nb.md("""
# Part 5 - Speculative decoding

> **Needs:** sections 1-5 and their graded cells need only Part 5 (the target model runs
> in transformers). Section 6 runs speculation inside the lab engine, so it needs **Parts
> 1-4** as well (your `num_kv_blocks` sizes the pool, your block manager, attention and
> scheduler run every step).

A decode step reads every weight of the model to produce **one** token per sequence
(Part 1: decode is memory-bound). Scoring a few more positions in the same pass costs
little extra on a GPU, so if someone *guessed* the next `k` tokens, the target model could
check all of them in one forward pass and keep the ones it agrees with.

That is speculative decoding (Leviathan, Kalman and Matias, *Fast Inference from
Transformers via Speculative Decoding*, ICML 2023, arXiv 2211.17192; Chen et al. 2023
proposed the same scheme). A cheap **proposer** guesses `k` tokens: a small draft model,
or, with no model at all, *prompt lookup*: copy what followed the last few tokens when
they occurred earlier (vLLM's `ngram` method). A **rejection sampler** keeps a prefix of
the guesses and adds one token of the target's own, and the output has exactly the
target's distribution.

You implement `exercises/speculative.py` (`rejection_sample`,
`SpeculativeDecoding.generate_with_speculation`), `exercises/ngram_proposer.py`
(`NgramProposer`) and the formulas of `exercises/speculative_math.py`
(`expected_acceptance_rate`, `expected_tokens_per_step`, `expected_speedup`). Check
yourself with `pytest tests/graded/test_part5_speculative.py`.

Sections 4-6 run the prepared model (section 4's graded cell too): code cells starting with
`# requires: ...` print why they skip on a machine without it (a GPU runner without the
model, a laptop without vLLM); the set-up cell prints what this machine has.
""")
nb.setup()
nb.code("""
import importlib, time
import matplotlib.pyplot as plt
import torch
from scipy.stats import chisquare
from servinglab import SamplingParams
spec = importlib.import_module(f"{current_impl()}.speculative")
torch.set_num_threads(1)  # batch-1 work on small tensors: one thread is as fast, and steady on a busy machine
""")

nb.md(r"""
## 1. The algorithm

For one sequence, with target distribution $p_i$ at draft position $i$ and draft
distribution $q_i$ (the proposer sampled $x_i \sim q_i$):

1. **Propose** $x_1, \dots, x_k$.
2. **Score**: one target pass over `sequence + drafts` gives $p_1, \dots, p_{k+1}$
   ($p_i$ predicts the token after $i - 1$ drafts).
3. **Verify** left to right: accept $x_i$ with probability $\min(1, p_i(x_i) / q_i(x_i))$.
   At the first rejection, emit a token drawn from $\mathrm{norm}(\max(0, p_i - q_i))$ and stop.
4. If all $k$ are accepted, the pass already computed $p_{k+1}$: emit a **bonus** token from it.

Every pass emits between 1 and $k + 1$ tokens. With greedy decoding $p_i$ is one-hot on
the target's argmax, so the rule reduces to: accept while the draft equals the target's
argmax, and at the first mismatch emit the target's argmax. An n-gram proposer has no
distribution of its own: $q_i$ is one-hot on its guess, so the guess is accepted with
probability $p_i(x_i)$.

**Why the output is exactly $p$.** Take one position, drop the index. Rejection happens with
probability $1 - \sum_y q(y) \min(1, p(y)/q(y)) = 1 - \sum_y \min(p(y), q(y)) = \sum_y \max(0, p(y) - q(y))$,
which is exactly the normaliser of the residual. So

$$P(x) = q(x)\min\Big(1, \tfrac{p(x)}{q(x)}\Big) + \Big(1 - \sum_y \min(p, q)(y)\Big)\,\frac{\max(0, p(x) - q(x))}{\sum_y \max(0, p(y) - q(y))}
= \min(p(x), q(x)) + \max(0, p(x) - q(x)) = p(x).$$

Position $i + 1$ is only reached after position $i$ emitted an accepted token, which has the
target's own conditional law, so the argument repeats down the sequence. One draft is
accepted with probability $\beta = \sum_x \min(p(x), q(x))$, one minus the total-variation
distance between $p$ and $q$.
""")

nb.md("""
## 2. Test the sampler: does it really sample from p?

Six tokens, a target `p`, and a **bad** draft `q` that puts 90% of its mass on the token
`p` likes least. Run 20,000 independent verification steps as one batch and compare the
first emitted token's frequencies with `p` by Pearson's chi-square test; at a false-alarm
rate of 1e-3 a correct sampler fails with probability 0.001 (the seed is fixed).
""")
nb.code("""
p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.08, 0.02])
q = torch.tensor([0.01, 0.01, 0.01, 0.01, 0.06, 0.90])
N, K = 20_000, 2
gen = torch.Generator().manual_seed(0)
draft_ids = torch.multinomial(q.expand(N * K, -1), 1, generator=gen).view(N, K)
draft_probs, target_probs = q.expand(N, K, -1), p.expand(N, K + 1, -1)
""")
nb.solution("""
# Verify all N rows with your rejection_sample (use `gen`). Then set
#   first_tokens: the first emitted token of every row ([N] long)
#   pvalue:       scipy.stats.chisquare of its counts against N * p
#   acceptance:   the fraction of rows whose first draft was accepted
### BEGIN SOLUTION
out, num_accepted = spec.rejection_sample(draft_ids, draft_probs, target_probs, gen)
first_tokens = out[:, 0]
counts = torch.bincount(first_tokens, minlength=6).double()
pvalue = chisquare(counts.numpy(), (p.double() / p.double().sum() * N).numpy()).pvalue
acceptance = (num_accepted >= 1).double().mean().item()
### END SOLUTION
print(f"chi-square p-value {pvalue:.3f}; acceptance {acceptance:.4f} vs sum min(p, q) = {torch.minimum(p, q).sum():.4f}")
""", "sampler_chi2")
nb.tests("""
assert first_tokens.shape == (N,)
assert pvalue > 1e-3, "the first emitted token does not follow p"
### BEGIN HIDDEN TESTS
counts = torch.bincount(first_tokens, minlength=6).double()
assert chisquare(counts.numpy(), (p.double() / p.double().sum() * N).numpy()).pvalue > 1e-3
assert abs(acceptance - 0.12) < 0.012
assert abs(float(spec.expected_acceptance_rate(p, q)) - 0.12) < 1e-6
### END HIDDEN TESTS
""", "sampler_chi2_test", points=3)
nb.code("""
emp = torch.bincount(first_tokens, minlength=6).double() / N
naive = q  # what you would get by trusting the draft
x = torch.arange(6)
fig, ax = plt.subplots(figsize=(7, 3.6))
ax.bar(x - 0.27, p, 0.27, label="target p")
ax.bar(x, emp, 0.27, label="emitted (speculative)")
ax.bar(x + 0.27, naive, 0.27, label="draft q", alpha=0.6)
ax.set_xlabel("token"); ax.set_ylabel("probability"); ax.legend()
ax.set_title(f"First emitted token over {N:,} steps (chi-square p = {pvalue:.2f})")
fig.tight_layout(); fig.savefig(OUT / "sampler_vs_target.png", dpi=120); plt.show()
""")

nb.md("""
## 3. How much does it buy? Tokens per pass and speedup against k

If every draft is accepted independently with probability `a`, one target pass yields
`(1 - a^(k+1)) / (1 - a)` tokens in expectation, and with a draft that costs `c` target
passes per token the wall-time speedup is `(1 - a^(k+1)) / ((1 - a)(k c + 1))` (Leviathan
et al.). Their worked values at c = 0.05, k = 4: 1.92x (a = 0.6), 2.80x (0.8), 3.41x (0.9).
More drafts help while they are likely to be accepted, then only cost: there is a best `k`.
""")
nb.solution("""
# best_k: the k in 1..12 with the largest expected speedup for a = 0.8, c = 0.05
### BEGIN SOLUTION
best_k = max(range(1, 13), key=lambda k: spec.expected_speedup(0.8, k, 0.05))
### END SOLUTION
print(best_k, round(spec.expected_speedup(0.8, best_k, 0.05), 3))
""", "best_k")
nb.tests("""
assert 1 <= best_k <= 12
assert round(spec.expected_speedup(0.8, 4, 0.05), 3) == 2.801
### BEGIN HIDDEN TESTS
assert best_k == 8
assert round(spec.expected_tokens_per_step(0.8, 4), 3) == 3.362
### END HIDDEN TESTS
""", "best_k_test", points=2)
nb.code("""
ks = range(1, 13)
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
for a in (0.5, 0.6, 0.8, 0.9):
    left.plot(ks, [spec.expected_tokens_per_step(a, k) for k in ks], "o-", ms=3, label=f"a = {a}")
    for c, ls in ((0.05, "-"), (0.3, "--")):
        right.plot(ks, [spec.expected_speedup(a, k, c) for k in ks], ls, color=left.lines[-1].get_color(),
                   label=f"a = {a}, c = {c}")
left.set_xlabel("k (drafts per pass)"); left.set_ylabel("expected tokens per target pass"); left.legend()
right.axhline(1, color="k", lw=0.8); right.set_xlabel("k"); right.set_ylabel("expected speedup"); right.legend(fontsize=7)
left.set_title("Leviathan et al.: (1 - a^(k+1)) / (1 - a)"); right.set_title("speedup; dashed: a draft costing c = 0.3")
fig.tight_layout(); fig.savefig(OUT / "theory_vs_k.png", dpi=120); plt.show()
""")

nb.md("""
## 4. Prompt lookup on the real model

The n-gram proposer needs no model: when the answer copies from the prompt (editing,
quoting, summarising a given text, code changes) its guesses are often right, and
proposing costs microseconds (c = 0). Here SmolLM2-135M-Instruct (transformers, fp32) edits
a short notice. `cached_logits_fn` keeps the target's KV cache between passes and crops
it back to the accepted prefix after each verification: the rollback of rejected draft
slots that the paged engine does by freeing blocks.
""")
nb.code("""
# requires: model
from transformers import AutoModelForCausalLM, AutoTokenizer
from servinglab.model.prepare import prepare_model
from servinglab.engine.draft_model import build_draft_model, cached_logits_fn
folder = prepare_model()
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

def chat(text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

NOTICE = ("The reading room on the second floor opens at nine in the morning and closes at six in the evening. "
          "Members may borrow up to five books at a time for three weeks. Members must return books to the front desk, "
          "not to the shelves. Food and drinks are not allowed in the reading room, but members may drink water.")
grounded = chat("Rewrite this notice, replacing the word 'Members' with 'Visitors':\\n\\n" + NOTICE)
open_ended = chat("Write a short story about a robot who learns to paint.")
MAX_TOKENS, GREEDY = 64, SamplingParams(temperature=0.0)

def plain_greedy(prompt):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)  # stops at EOS
    return out[0, len(prompt):].tolist()

t0 = time.perf_counter(); reference = plain_greedy(grounded); t_plain = time.perf_counter() - t0
print(tok.decode(reference))
""")
nb.solution("""
# requires: model
# Run your generate_with_speculation on `grounded` with a fresh cached_logits_fn(model) as the
# target, NgramProposer(prompt_lookup_min=1, prompt_lookup_max=3, num_speculative_tokens=4),
# max_tokens=MAX_TOKENS, GREEDY and eos_token_id=tok.eos_token_id; store the SpeculativeOutput as `ngram_run`.
t0 = time.perf_counter()
### BEGIN SOLUTION
ngram_run = spec.SpeculativeDecoding().generate_with_speculation(
    cached_logits_fn(model), spec.NgramProposer(1, 3, 4), grounded, max_tokens=MAX_TOKENS, params=GREEDY, k=4,
    eos_token_id=tok.eos_token_id)
### END SOLUTION
t_spec = time.perf_counter() - t0
print(f"acceptance {ngram_run.acceptance_rate:.2f}, {ngram_run.mean_tokens_per_step:.2f} tokens per target pass "
      f"({ngram_run.num_steps} passes for {len(ngram_run.token_ids)} tokens); "
      f"wall time {t_spec:.1f} s vs {t_plain:.1f} s plain (one run, this machine)")
""", "ngram_run")
nb.tests("""
# requires: model
# Greedy speculation must reproduce the target's greedy tokens. Exactly so in exact arithmetic;
# in floating point the k + 1 positions of one verification pass round differently from one
# position per step, so the check allows a divergence only at a near-tie of the target
# (servinglab/course/exactness.py): a kept, unverified draft diverges by whole units of logit.
from servinglab.course.exactness import causal_lm_next_logits, check_same_or_near_tie, near_tie_bound
assert 0 < len(ngram_run.token_ids) <= MAX_TOKENS
print(check_same_or_near_tie(reference, ngram_run.token_ids, causal_lm_next_logits(model, grounded),
                             near_tie_bound(model.dtype), "speculative vs plain greedy", eos_token_id=tok.eos_token_id))
### BEGIN HIDDEN TESTS
assert ngram_run.num_steps < len(reference) / 2, "prompt lookup should emit more than 2 tokens per pass on this edit"
assert ngram_run.num_accepted_tokens <= ngram_run.num_draft_tokens
### END HIDDEN TESTS
""", "ngram_run_test", points=3)
nb.code("""
# requires: model
story = spec.SpeculativeDecoding().generate_with_speculation(
    cached_logits_fn(model), spec.NgramProposer(1, 3, 4), open_ended, max_tokens=MAX_TOKENS, params=GREEDY, k=4,
    eos_token_id=tok.eos_token_id)
print(f"open-ended prompt: acceptance {story.acceptance_rate:.2f}, {story.mean_tokens_per_step:.2f} tokens per pass")
def alpha_from_tokens_per_pass(tokens, k):
    \"\"\"The alpha for which Leviathan's (1 - a^(k+1)) / (1 - a) equals `tokens` (bisection; it grows with a).\"\"\"
    lo, hi = 0.0, 0.999
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spec.expected_tokens_per_step(mid, k) < tokens else (lo, mid)
    return lo


ks = range(1, 9)
fig, ax = plt.subplots(figsize=(7, 4))
for name, run in (("edit (input-grounded)", ngram_run), ("open-ended story", story)):
    a = alpha_from_tokens_per_pass(run.mean_tokens_per_step, 4)
    print(f"{name}: accepted / drafted = {run.acceptance_rate:.2f}; alpha fitted from "
          f"{run.mean_tokens_per_step:.2f} tokens per pass = {a:.2f}")
    line, = ax.plot(ks, [spec.expected_tokens_per_step(a, k) for k in ks], "-", label=f"{name}: i.i.d. model, alpha = {a:.2f}")
    ax.plot([4], [run.mean_tokens_per_step], "*", ms=14, color=line.get_color(), label=f"{name}: measured, k = 4")
ax.set_xlabel("k"); ax.set_ylabel("tokens per target pass"); ax.legend(fontsize=8)
ax.set_title("Prompt lookup on SmolLM2-135M-Instruct (greedy)")
fig.tight_layout(); fig.savefig(OUT / "ngram_measured.png", dpi=120); plt.show()
""")
nb.md("""
Careful with what goes into the formula. Leviathan's `a` (alpha) is the probability that
*one* draft is accepted, each draft independently. The run's `acceptance_rate`
(accepted / drafted) is a different quantity: a pass stops at its first rejection, so the
drafts after it are counted as drafted but never tested, and the share comes out below
alpha even when the i.i.d. model holds exactly (`docs/references.md`, section 5). So the
cell above fits alpha the other way round: the alpha for which the formula gives the
measured tokens per pass at k = 4. The star then sits on its curve by construction, and
the curve's other points are what the i.i.d. model predicts for other k. It is only a
model: on the edit a copied span is accepted token after token and then the copy ends
(acceptances are not independent), and the proposer sometimes has nothing to propose (a
pass of 1 token), which the formula does not know about.

## 5. And a draft model?

SmolLM2-135M has no smaller sibling with its tokenizer, so the cheapest draft is the
target's own first L layers with its final norm and LM head (`build_draft_model`, an
early exit as in LayerSkip and Draft & Verify). `scripts/draft_model_study.py` measures it;
one run of it on the course's reference 2-core CPU (not your machine) gave:

| `scripts/draft_model_study.py`, reference machine | result |
| --- | --- |
| greedy match with the target on open-ended chat, exit at L <= 8 | 6-7% |
| the same at L = 12 | 11-12% |
| with a trained affine "tuned lens" on the exit | 12-20% |
| cost of one draft step / one target step | about 0.2-0.5 |

The match rates do not depend on the machine (greedy, float32); the cost ratio does. It
stays high because the 49,152-token LM head and the per-layer overhead do not shrink with
L. With those numbers no k gives a speedup (Leviathan's formula predicts under 1x); for
this model the n-gram proposer is the one worth serving. The cell below checks the early
exit's match rate along the reference continuation in one target pass, on your machine.
""")
nb.code("""
# requires: model
draft = build_draft_model(model, 8)
with torch.inference_mode():
    ids = torch.tensor([grounded + reference])
    draft_guess = draft(ids).logits[0, len(grounded) - 1 : -1].argmax(-1)
match = (draft_guess == torch.tensor(reference)).double().mean().item()
print(f"early exit at layer 8 of 30: greedy match rate {match:.2f} on the edit, vs prompt lookup {ngram_run.acceptance_rate:.2f}")
""")
nb.md("""
## 6. Speculation inside the paged engine

The loop above verifies one request at a time against a transformers KV cache. The lab
engine does the same for a whole batch over the paged cache (`servinglab/engine/spec_decode.py`),
configured like vLLM: `LLM(..., speculative_config={"method": "ngram",
"num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3})`. Each step
your `NgramProposer` drafts up to `k` tokens for every decoding sequence; they are
appended to the sequence, so your scheduler schedules `1 + k` tokens and your block
manager's `append_slots` reserves their slots; one target forward writes their K/V and
returns logits at all `1 + k` positions; your `rejection_sample` keeps the agreed prefix
plus one token; then the engine rolls back: `num_computed_tokens` drops to the kept
tokens minus one and your `trim_blocks` frees blocks that held only rejected drafts.
Blocks go to the prefix cache only after the rollback, so no cached block holds a
rejected draft. In float32 the greedy output is the plain engine's, token for token.
""")
nb.code("""
# requires: model
from servinglab import LLM
from servinglab.engine.spec_decode import generate_with_speculation
common = dict(model=str(folder), dtype="float32", max_model_len=512, enable_prefix_caching=False)
plain_llm = LLM(**common)
spec_llm = LLM(**common, speculative_config={"method": "ngram", "num_speculative_tokens": 6,
                                             "prompt_lookup_min": 1, "prompt_lookup_max": 3})
params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)  # stops at EOS, like the loop above
runs = {}
for name, prompt in (("edit (input-grounded)", grounded), ("open-ended story", open_ended)):
    t0 = time.perf_counter()
    plain_ids = plain_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs, stats = generate_with_speculation(spec_llm, [prompt], params)
    t_spec = time.perf_counter() - t0
    runs[name] = stats[0]
    # speculation must not change greedy output: identical, or a float32 near-tie of the target
    print(check_same_or_near_tie(plain_ids, outs[0].outputs[0].token_ids, causal_lm_next_logits(model, prompt),
                                 near_tie_bound("float32"), f"{name}: engine speculation vs plain", tok.eos_token_id))
    print(f"{name}: acceptance {stats[0].acceptance_rate:.2f}, {stats[0].mean_tokens_per_step:.2f} tokens per target pass, "
          f"{t_plain / t_spec:.2f}x faster than the plain engine (one run, this machine)")
bm = spec_llm.engine.block_manager
assert bm.num_free_blocks == bm.num_blocks, "every block is free again after the rollbacks"
fig, ax = plt.subplots(figsize=(7, 3.5))
for name, st in runs.items():
    ax.plot(range(1, len(st.acceptance_by_position) + 1), st.acceptance_by_position, "o-", label=name)
ax.set_xlabel("draft position i"); ax.set_ylabel("share of drafts at i accepted"); ax.set_ylim(0, 1); ax.legend()
ax.set_title("Prompt lookup in the paged engine (k = 6, greedy)")
fig.tight_layout(); fig.savefig(OUT / "engine_acceptance_by_position.png", dpi=120); plt.show()
""")
nb.md("""
Acceptance falls with the position (a draft at position i is only accepted when all
before it were), and the open-ended prompt gives the proposer little to copy.
`servinglab bench spec` measures the same thing at batch 1 and 8, greedy and sampled,
and puts it next to Leviathan's prediction. On a CPU a pass over `1 + k` tokens per
sequence can cost noticeably more than a 1-token pass (the "v" column prints that ratio
for your machine), which the formula, written for memory-bound GPUs, assumes away; and at
a larger batch a step is less memory-bound, so speculation pays less, the slowdown "at
high load" that vLLM's blog reports too.
""")
nb.md("""
## 7. On a GPU: speculation inside the CUDA-graph decode path

On a GPU a plain decode step of SmolLM2-135M is one CUDA-graph replay of about 1 ms, so
everything around it counts: an eager verification pass, a Python loop over drafts or a
`.item()` per token each cost more than the step. The lab engine keeps speculation on the
fast path (`servinglab/engine/spec_decode.py`, `spec_verify.py`, `spec_policy.py`):

- **verification as graph replays**: a decode batch where every sequence carries its last
  token and its `k` drafts is a uniform shape, captured per batch size with `k + 1` query
  rows (the paged decode kernel attends causally inside the draft window); a sequence with
  fewer drafts is padded (slot -1, masked). Prefill and mixed steps stay eager;
- **your `rejection_sample` on the device, over the whole batch**, with one device-to-host
  copy per step (accepted counts and tokens). That is why its contract is batched tensor
  code: the engine checks it (tensor operations counted at two batch sizes, no host reads)
  and, if it loops per token, warns and falls back to a per-row path that costs a host
  round trip per sequence;
- **a per-step on/off rule** (vLLM's `disable_by_batch_size`, SGLang's adaptive
  speculation): speculate only while the batch is small enough and the measured tokens
  per speculative step times the plain step time beat the speculative step's time;
- **the early-exit draft inside the engine** (`method="draft"` without a model of its own,
  `servinglab/engine/draft_runner.py`): on a CPU it drafts through transformers as in
  section 5, one request and one KV cache at a time; on a GPU it is the engine's own
  first `L` layers, captured as a graph per batch size, so the `k` draft steps are `k`
  replays for the whole batch. It needs no cache of its own: its K/V for those layers are
  the target's for the same tokens, written into the slots the scheduler reserved for the
  drafts (the verification rewrites them). Drafts reach the verification graph's inputs on
  the device, so the step still makes one device-to-host copy. (Tested on CPUs through
  Triton's interpreter, without graphs; its GPU test and `bench spec`'s early-exit rows have
  not run on a GPU yet, so no GPU figure for it is given here.)

**Predict first.** Leviathan et al. predict `(1 - a^(k+1)) / ((1 - a) v)` with a free
proposer, where `v` is a verification step's cost in plain steps. At batch 1 a step is
memory-bound, so `v` is near 1: what speedup do you expect at `a = 0.8`, `k = 4`? And at
batch 64, where a step of 135M already moves 64 rows through every weight?

**Reference figure** (not your machine: one NVIDIA H200, 2026-12-04, one run, random
weights of the real configs in bf16, greedy, 128-token prompts, 128 output tokens; a
*controlled* proposer drafts the target's own greedy continuation and keeps each draft
right with probability alpha, since random weights give meaningless n-gram acceptance;
command `servinglab bench spec --device cuda --random-weights smollm2-135m --ks 2 4 8 --alphas 0 0.6 0.8 0.95`,
full table in `docs/figures/h200_spec_gpu/README.md`):

| SmolLM2-135M, k = 4 | batch 1 | batch 8 | batch 64 |
| --- | --- | --- | --- |
| plain CUDA-graph decode, tok/s | 851 | 7,628 | 30,489 |
| `v` (verify / plain step) | 1.04 | 1.47 | 1.86 |
| alpha 0.8: speculation in every step | 2.73x | 1.80x | 1.00x |
| alpha 0.8: with the on/off rule | 2.95x | 1.82x | 1.36x |
| alpha 0: with the on/off rule | 1.09x | 0.94x | 0.98x |
| Leviathan's prediction at alpha 0.8 (measured `v`) | 3.23x | 2.29x | 1.80x |
| n-gram proposer on repetitive prompts, with the rule | 1.76x | 1.26x | 0.85x |

At batch 1 the prediction holds to about 15%: verifying five positions costs about
one step, as the memory-bound argument says. At batch 64 a verification step costs
about twice a plain step and forced speculation gains nothing, so the rule speculates in
few steps there. On SmolLM2-1.7B at batch 1 the same run gave 2.30x at alpha 0.8 (the
prediction 2.75x, `v` 1.22) and 0.82x at alpha 0, where that run's rule still speculated
in 71% of the steps; the rule has since been given a warm-up of three samples of each
kind and medians. What the figure does not show: the sampled (non-greedy) path's
chi-square test on the GPU, and the early-exit draft model (next paragraph).

Re-measured on 2026-12-07 on an NVIDIA H100 (not your machine;
`docs/figures/h100_2026-12-07b/`), k = 4, after two changes: plain decoding now overlaps
scheduling with the GPU by default (notebook 04), and a speculative engine's own plain steps
overlap too (a speculative step first waits for the step in flight: drafts need the real
tokens). The bench now compares against both plain loops. The 135M batch-1 figures come
from a second run whose rates are decode rates (each engine's prefill-only time
subtracted, as the bench now does); the others from the first run, whole-run rates:

| k = 4, with the rule | 1.7B batch 1 | 135M batch 1 | batch 64 (135M and 1.7B) |
| --- | --- | --- | --- |
| alpha 0.8, vs the synchronous / the default (overlapped) plain loop | 2.74x / 2.68x | 2.47x / 2.77x | 1.29x to 1.52x / 1.33x to 1.42x |
| alpha 0, vs synchronous / overlapped | 1.00x / 0.98x | 0.93x / 1.03x | 1.12x to 1.26x / 0.97x to 1.38x |
| n-gram on repetitive prompts, vs synchronous / overlapped | 1.64x / 1.61x | 1.34x / 1.50x | 1.11x to 1.29x / 0.97x to 1.45x |

The rule keeps batch 64 at 0.97x of plain decoding or better, and batch 1 gains what Leviathan's
formula predicts to within about 10%.
""")
nb.code("""
# requires: cuda
# The reference figure's grid, small: SmolLM2-135M's config with random weights, batch 1 and 8, k = 4.
from servinglab.bench.spec_gpu import run_spec_gpu
gpu_rows = run_spec_gpu(["smollm2-135m"], OUT / "spec_gpu", out_len=64, batches=(1, 8), alphas=(0.0, 0.8), ks=(4,))
""")
nb.md("""
## Recap

- Rejection sampling keeps the target's distribution exactly; greedy reduces to "accept
  while the draft equals the argmax".
- The gain is `(1 - a^(k+1)) / ((1 - a)(k c + 1))`: it needs a high per-draft acceptance
  `a` (not the same as accepted / drafted) and a cheap draft `c`, and it fades at high
  load (the pass is no longer memory-bound).
- In a paged engine the target verifies the k drafts of every running request in one
  step, writes their K/V into cache slots, and the rejected slots are rolled back
  (Part 2's `trim_blocks`).

**What vLLM does differently.** vLLM verifies the drafts of the whole batch in one fused
rejection-sampling kernel over flattened draft tokens (no Python loop per request), keeps
per-position acceptance counters (`vllm:spec_decode_num_accepted_tokens_per_pos`), and
offers trained draft heads (EAGLE, Medusa) besides n-gram lookup, which it runs with a
numba-compiled search over every request's token history at once. Rejected drafts are
rolled back by lowering `num_computed_tokens` by their count; their blocks stay with the
request and the next step overwrites the slots. Read
`vllm/v1/sample/rejection_sampler.py` and `vllm/v1/spec_decode/ngram_proposer.py` next.
""")

print("wrote", nb.save())

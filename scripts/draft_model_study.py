"""Which draft model for SmolLM2-135M-Instruct? Measure acceptance and cost, predict the speedup.

Candidates (all share SmolLM2's tokenizer by construction):

* ``early-exit L``: the target's first L layers + its final norm and tied LM head
  (:func:`servinglab.draft_model.build_draft_model`; no training, no extra weights).
* ``early-exit L + adapter`` (``--distill-seconds S``): the same with a small trainable
  residual adapter before the norm, fitted for S seconds of CPU on the target's own
  greedy generations (hidden state at layer L -> the target's next token).
* ``ngram``: prompt lookup (Part 5's ``NgramProposer``), cost ~0.

Acceptance is measured at greedy on open-ended chat prompts, along the target's own greedy
continuation: position t counts as a match when the draft's argmax given the target's
prefix equals the target's. For an early exit that needs one target forward per prompt
(layer L's hidden state under the full sequence is what the draft computes). ``a`` is the
match rate; ``tok/step`` replays greedy speculative decoding with k drafts on those match
sequences (exact for greedy). ``c`` = draft decode step / target decode step (batch 1,
KV cache, transformers, fp32, median of interleaved runs); ``v`` = target pass over k+1
tokens / over 1 token. Leviathan et al. (ICML 2023): speedup = (1 - a^(k+1)) / ((1 - a)(k c + 1)),
which assumes v = 1; ``sim`` = tok/step / (k c + v) uses the measured run lengths and v.

Run: ``python scripts/draft_model_study.py`` (about 2 minutes; ``--distill-seconds 45`` adds about 5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from servinglab.bench.spec_prompts import OPEN_ENDED  # noqa: E402
from servinglab.engine.draft_model import build_draft_model  # noqa: E402
from servinglab.model.prepare import require_model  # noqa: E402
from solutions.speculative import NgramProposer, expected_speedup  # noqa: E402

EVAL_PROMPTS = OPEN_ENDED[:6]  # the open-ended prompts `servinglab bench spec` uses
TOPICS = ["volcanoes", "the moon", "bread baking", "honey bees", "chess", "the ocean", "bicycles", "coffee",
          "trees", "rain", "museums", "guitars", "penguins", "the internet", "gardening", "sleep"]
TEMPLATES = ["Tell me about {}.", "Write a short poem about {}.", "What are three fun facts about {}?",
             "Explain {} to a child.", "Write a paragraph describing {}."]


def chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@torch.inference_mode()
def greedy_continuation(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)  # stops at EOS
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def exit_states(model, prompt: list[int], cont: list[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Hidden states (one per layer) at the positions that predict each continuation token, and the targets."""
    ids = torch.tensor([prompt + cont])
    hs = model(ids, output_hidden_states=True).hidden_states
    rows = slice(len(prompt) - 1, len(prompt) + len(cont) - 1)
    return tuple(h[0, rows] for h in hs), torch.tensor(cont)


def tokens_per_step(matches: list[bool], k: int) -> float:
    """Replay greedy speculative decoding: each target pass emits the matched run (<= k) plus one."""
    i, steps = 0, 0
    while i < len(matches):
        run = 0
        while run < k and i + run < len(matches) and matches[i + run]:
            run += 1
        i, steps = i + run + 1, steps + 1
    return len(matches) / steps


def ngram_replay(prompt: list[int], cont: list[int], k: int) -> tuple[int, int, int, list[int]]:
    """Greedy speculative decoding with NgramProposer(1, 3, k) along the target's continuation:
    (drafts proposed, drafts accepted, target passes, drafts per pass)."""
    proposer, i, proposed, accepted, steps, per_pass = NgramProposer(1, 3, k), 0, 0, 0, 0, []
    while i < len(cont):
        drafts = proposer.propose(prompt + cont[:i])[: len(cont) - i - 1]
        run = 0
        while run < len(drafts) and drafts[run] == cont[i + run]:
            run += 1
        proposed, accepted, steps, i = proposed + len(drafts), accepted + run, steps + 1, i + run + 1
        per_pass.append(len(drafts))
    return proposed, accepted, steps, per_pass


@torch.inference_mode()
def step_times(model, prompt: list[int], n_tokens: int = 1, steps: int = 16) -> list[float]:
    """Seconds per decode pass of ``n_tokens`` new tokens after a cached prompt."""
    out = model(torch.tensor([prompt]), use_cache=True)
    cache, pos, times = out.past_key_values, len(prompt), []
    nxt = out.logits[0, -1].argmax().repeat(n_tokens).view(1, -1)
    for _ in range(steps):
        t = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True, position_ids=torch.arange(pos, pos + n_tokens).view(1, -1))
        times.append(time.perf_counter() - t)
        cache.crop(-n_tokens)  # drop this pass's entries: every pass sees the same context
    return times


class Adapter(torch.nn.Module):
    """An affine map on the exit hidden state, h + A h + b, zero-initialised (a "tuned lens",
    Belrose et al. 2023): it starts as the plain exit and learns to translate layer L's
    residual stream into the last layer's."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h)


def distill(model, states: torch.Tensor, targets: torch.Tensor, seconds: float) -> Adapter:
    """Fit an adapter (norm and LM head frozen) with cross-entropy on the target's greedy tokens."""
    adapter = Adapter(states.shape[-1])
    opt = torch.optim.AdamW(adapter.parameters(), lr=2e-3)
    gen, end = torch.Generator().manual_seed(0), time.perf_counter() + seconds
    while time.perf_counter() < end:
        idx = torch.randint(len(states), (256,), generator=gen)
        logits = model.lm_head(model.model.norm(adapter(states[idx])))
        loss = torch.nn.functional.cross_entropy(logits, targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--distill-seconds", type=float, default=0.0, help="per L; 0 skips the adapter experiment")
    ap.add_argument("--train-prompts", type=int, default=40)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings on a shared machine)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    folder = require_model()
    tok = AutoTokenizer.from_pretrained(folder)
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    norm, head = target.model.norm, target.lm_head

    t0 = time.perf_counter()
    evals = [(p := chat_ids(tok, text), greedy_continuation(target, p, args.max_new_tokens)) for text in EVAL_PROMPTS]
    ev = [exit_states(target, p, c) for p, c in evals]
    print(f"target continuations: {len(evals)} prompts, {sum(len(c) for _, c in evals)} tokens in {time.perf_counter() - t0:.0f} s")
    with torch.inference_mode():
        match = {L: [(head(norm(hs[L])).argmax(-1) == y).tolist() for hs, y in ev] for L in args.layers}
    ngram_rows = [ngram_replay(p, c, 4) for p, c in evals]

    if args.distill_seconds > 0:
        t0 = time.perf_counter()
        train = [chat_ids(tok, tpl.format(topic)) for topic in TOPICS for tpl in TEMPLATES][: args.train_prompts]
        tr = [exit_states(target, p, greedy_continuation(target, p, args.max_new_tokens)) for p in train]
        print(f"distillation data: {len(tr)} prompts in {time.perf_counter() - t0:.0f} s")
        for L in args.layers:
            adapter = distill(target, torch.cat([hs[L] for hs, _ in tr]), torch.cat([y for _, y in tr]), args.distill_seconds)
            with torch.inference_mode():
                match[f"{L}+adapter"] = [(head(norm(adapter(hs[L]))).argmax(-1) == y).tolist() for hs, y in ev]
            n = sum(p.numel() for p in adapter.parameters())
            print(f"adapter for L={L}: {n:,} parameters ({n * 2 / 2**20:.2f} MiB in bf16)")

    # Cost: interleave target and drafts so a busy machine slows all of them alike.
    prompt = evals[0][0] + evals[0][1]
    drafts = {L: build_draft_model(target, L) for L in args.layers}
    times: dict[object, list[float]] = {key: [] for key in ["target", *args.layers, "verify"]}
    for _ in range(5):
        times["target"] += step_times(target, prompt)
        times["verify"] += step_times(target, prompt, n_tokens=5)
        for L, draft in drafts.items():
            times[L] += step_times(draft, prompt)
    t_target = statistics.median(times["target"])
    v5 = statistics.median(times["verify"]) / t_target
    print(f"target decode step {t_target * 1e3:.1f} ms; a 5-token verify pass costs v = {v5:.2f} target steps")

    print(f"\n{'draft':>12} {'a':>6} {'c':>6} {'best k':>6} {'Leviathan':>9} {'tok/step':>8} {'sim':>6}")
    for key, rows in match.items():
        flat = [m for r in rows for m in r]
        a = min(sum(flat) / len(flat), 0.999)
        c = statistics.median(times[int(str(key).split("+")[0])]) / t_target
        k = max(range(1, args.k_max + 1), key=lambda kk: expected_speedup(a, kk, c))
        tps = len(flat) / sum(len(r) / tokens_per_step(r, k) for r in rows)
        v = 1.0 + (v5 - 1.0) * k / 4  # extra verify cost taken as linear in k, measured at k = 4
        print(f"{str(key):>12} {a:6.3f} {c:6.3f} {k:6d} {expected_speedup(a, k, c):9.2f} {tps:8.2f} {tps / (k * c + v):6.2f}")
    proposed, accepted, steps = (sum(x[i] for x in ngram_rows) for i in range(3))
    tokens = sum(len(c) for _, c in evals)
    cost = sum(1.0 + (v5 - 1.0) * d / 4 for x in ngram_rows for d in x[3])  # in target decode steps
    print(f"{'ngram(1-3)':>12} {accepted / max(proposed, 1):6.3f} {0.0:6.3f} {4:6d} {'-':>9} {tokens / steps:8.2f} {tokens / cost:6.2f}"
          f"   ({proposed} drafts over {tokens} tokens)")

if __name__ == "__main__":
    main()

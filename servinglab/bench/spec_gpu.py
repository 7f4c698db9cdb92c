"""``servinglab bench spec --device cuda``: speculative decoding on the GPU fast path, speedup vs acceptance and k.

Random weights make acceptance meaningless, so the main grid uses a *controlled*
proposer (:class:`ControlledProposer`): it drafts the target's own greedy continuation
(generated beforehand by the plain engine at the same batch size) and keeps each
drafted token right with probability ``alpha``, wrong otherwise, independently. Its
acceptance is then ``alpha`` per position and a verification emits
``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average: exactly the i.i.d. model of
Leviathan et al. (ICML 2023), whose predicted speedup is that number divided by the
measured cost ratio ``v`` = (speculative decode step) / (plain decode step) (drafting
costs nothing here: ``c = 0``). Every rate is a *decode* rate: each engine's prefill-only
time (the same prompts, one output token) is subtracted from its runs, as TPOT excludes
TTFT; at batch 1 a 128-token run of a 1 ms step is short enough that the prefill and the
call's fixed cost would otherwise pull every ratio toward 1. Greedy, ``ignore_eos``, same prompts, the plain and
speculative engines in one process; each speculative configuration runs twice: with the
per-step rule off (forced, the raw curve) and on (what a user gets).
Also the n-gram proposer (``k = 4``) on the same prompts (random models tend to repeat themselves),
and the early-exit draft (``method="draft"``, its default quarter of the layers, ``k = 4``), whose
acceptance on random weights means nothing but whose cost is real: its column ``c`` is one
draft step's time in plain steps (Leviathan's ``c``), so ``E(a) / (v + k c)`` predicts its
speedup at the acceptance ``a`` a real model measures (``scripts/draft_model_study.py``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from servinglab.engine.sampling import SamplingParams

ALPHAS = (0.0, 0.3, 0.6, 0.8, 0.95)
KS = (1, 2, 4, 8)
BATCHES = (1, 8, 64)
REPEATS = 2  # timed runs per engine and row; the best is kept


class ControlledProposer:
    """Drafts a known greedy continuation, each token kept right with probability ``alpha``.

    Args:
        prompt_len: every prompt's length (the key of a sequence is its prompt).
        vocab_size: wrong tokens are drawn from the rest of the vocabulary.
        seed: the random source of right/wrong.
    """

    def __init__(self, prompt_len: int, vocab_size: int, seed: int = 0) -> None:
        self.prompt_len, self.vocab = prompt_len, vocab_size
        self.alpha, self.k = 1.0, 1
        self.references: dict[tuple[int, ...], list[int]] = {}
        self.rng = random.Random(seed)
        self.diverged: set[tuple[int, ...]] = set()  # sequences whose tokens left the reference (bf16 near-ties)

    def propose(self, token_ids: list[int]) -> list[int]:
        """Up to ``k`` drafts: the reference's next tokens, each replaced by a wrong one with probability ``1 - alpha``."""
        key = tuple(token_ids[: self.prompt_len])
        ref, j = self.references.get(key), len(token_ids) - self.prompt_len
        if ref is None or (j > 0 and (j > len(ref) or ref[j - 1] != token_ids[-1])):
            self.diverged.add(key)
            return []
        rng, out = self.rng, []
        for t in ref[j : j + self.k]:
            out.append(t if rng.random() < self.alpha else (t + 1 + rng.randrange(self.vocab - 1)) % self.vocab)
        return out


@dataclass
class GpuSpecRow:
    """One configuration: plain vs speculative tokens/s at one batch size."""

    model: str
    proposer: str
    batch: int
    k: int
    alpha: float | None
    plain_tps: float
    forced_tps: float
    rule_tps: float
    acceptance: float
    tokens_per_step: float
    v: float | None  # cost of a verification step / a plain step: plain / forced tok/s at alpha = 0 (same batch and k)
    predicted: float | None  # Leviathan: E[tokens per step] / v
    spec_steps_share: float  # share of decode steps the rule speculated in
    diverged: int = 0
    overlap_tps: float | None = None  # plain decoding with overlap scheduling (the CUDA default; speculation runs without it)
    c: float | None = None  # one draft step / one plain step (the early exit's Leviathan c)


def _timed(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], int]:
    steps, start = llm.engine.num_steps, time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs], llm.engine.num_steps - steps


def _prefill_s(llm, prompts: list[list[int]]) -> float:
    """Best of three runs of the prompts alone (one output token: the prefill step), subtracted
    from every timed run so a row compares decoding, not the prefill both engines share."""
    return min(_timed(llm, prompts, 1)[0] for _ in range(3))


def run_model(name: str, out_len: int, prompt_len: int, batches: tuple[int, ...], alphas: tuple[float, ...],
              ks: tuple[int, ...], seed: int = 0) -> list[GpuSpecRow]:
    """Every (batch, k, alpha) on one random-weight config; the engines are built once per k."""
    from servinglab.bench.gpu_models import random_gpu_model
    from servinglab.engine.llm import LLM

    model, config = random_gpu_model(name, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, config.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(max(batches))]
    longest = prompt_len + out_len + 2 * max(ks) + 8
    common = dict(model_obj=model, hf_config=config, dtype="bfloat16", device="cuda", max_num_seqs=max(batches),
                  max_model_len=longest, num_kv_blocks=max(batches) * -(-longest // 16) + 16,
                  enable_prefix_caching=False, extra={"cuda_graph_sizes": sorted(set(batches))})
    # Two plain baselines. The synchronous loop: a speculative step is synchronous (drafting needs
    # the real tokens), so forced speculation and Leviathan's v compare against it. Overlap
    # scheduling, the CUDA default: what "never slower than plain" must hold against (the
    # rule's own plain steps run overlapped); its ratio is the last column.
    plain = LLM(**common, async_scheduling=False)
    overlap = LLM(**common, async_scheduling=True)
    _timed(overlap, prompts[:1], 8)
    overlap_base = {b: min(_timed(overlap, prompts[:b], out_len)[0] for _ in range(2)) - _prefill_s(overlap, prompts[:b])
                    for b in batches}
    del overlap
    proposer = ControlledProposer(prompt_len, config.vocab_size, seed)
    _timed(plain, prompts[:1], 8)  # warm-up
    base: dict[int, float] = {}  # batch -> best plain seconds
    refs: dict[int, dict[tuple[int, ...], list[int]]] = {}  # batch -> what greedy decoding gives at that batch size
    prefill: dict[int, float] = {}  # batch -> the plain engine's prefill-only seconds
    for b in batches:
        prefill[b] = _prefill_s(plain, prompts[:b])
        base[b] = min(_timed(plain, prompts[:b], out_len)[0] for _ in range(2)) - prefill[b]
        _, conts, _ = _timed(plain, prompts[:b], out_len + max(ks) + 2)
        refs[b] = {tuple(p): c for p, c in zip(prompts[:b], conts)}
    rows: list[GpuSpecRow] = []
    configs = [("controlled", k, {"method": "custom", "num_speculative_tokens": k, "proposer": proposer}) for k in ks]
    configs.append(("ngram", 4, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}))
    configs.append((f"early exit L={max(1, config.num_hidden_layers // 4)}", 4, {"method": "draft", "num_speculative_tokens": 4}))
    for label, k, spec in configs:
        llm = LLM(**common, speculative_config={**spec, "adaptive": False})
        policy, dec = llm.engine.spec_decoder.policy, llm.engine.spec_decoder
        proposer.k = k
        _timed(llm, prompts[:1], 8)
        for b in batches:
            proposer.references = refs[b]
            _timed(llm, prompts[:b], 8)  # warm-up at this batch size (forced: verification steps too)
            spec_prefill = _prefill_s(llm, prompts[:b])
            for alpha in (alphas if label == "controlled" else (None,)):
                proposer.alpha, proposer.diverged = (alpha if alpha is not None else 1.0), set()
                # Plain timed again next to each row (the GPU's clocks drift over a long grid);
                # every time is the best of its runs.
                plain_s = min(base[b], _timed(plain, prompts[:b], out_len)[0] - prefill[b])
                policy.adaptive = False
                dec.stats.__init__(k)
                forced_s = min(_timed(llm, prompts[:b], out_len)[0] for _ in range(REPEATS)) - spec_prefill
                st = dec.stats
                acc, tps = st.acceptance_rate, st.mean_tokens_per_step
                policy.adaptive = True
                n_spec, n_plain = policy.num_spec_steps, policy.num_plain_steps
                rule_s = min(_timed(llm, prompts[:b], out_len)[0] for _ in range(REPEATS)) - spec_prefill
                spec_share = (policy.num_spec_steps - n_spec) / max(policy.num_spec_steps - n_spec + policy.num_plain_steps - n_plain, 1)
                tokens = b * (out_len - 1)  # decoded tokens: the first comes from the prefill step
                rows.append(GpuSpecRow(name, label, b, k, alpha, tokens / plain_s, tokens / forced_s, tokens / rule_s, acc, tps,
                                       None, None, spec_share, len(proposer.diverged), tokens / overlap_base[b]))
                add_prediction(rows)
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        del llm
        torch.cuda.empty_cache()
    del plain, model
    torch.cuda.empty_cache()
    return rows


def add_prediction(rows: list[GpuSpecRow]) -> None:
    """Fill ``v`` and Leviathan's prediction where the alpha = 0 row of the same (model, batch, k) exists.

    At alpha = 0 a forced verification emits one token, like a plain step, so plain / forced
    tokens/s there *is* the cost ratio ``v`` of a verification step (it does not depend on
    alpha: same shapes). The prediction for any alpha is then ``E[tokens per step] / v``
    with Leviathan's i.i.d. ``E = (1 - a^(k+1)) / (1 - a)``; for the n-gram rows ``E`` is the
    measured tokens per step and ``v`` the controlled rows' at the same k.
    """
    zero = {(r.model, r.batch, r.k): r.plain_tps / r.forced_tps for r in rows if r.proposer == "controlled" and r.alpha == 0}
    for r in rows:
        r.v = zero.get((r.model, r.batch, r.k))
        if r.v is None:
            continue
        if r.proposer.startswith("early exit"):  # a forced step = one verification + k draft steps, in plain steps
            r.c = max(0.0, (r.tokens_per_step * r.plain_tps / r.forced_tps - r.v) / r.k)
            continue
        a = r.alpha
        expected = r.tokens_per_step if a is None else (r.k + 1.0 if a >= 1 else (1 - a ** (r.k + 1)) / (1 - a))
        r.predicted = expected / r.v


def table(rows: list[GpuSpecRow]) -> str:
    """Markdown table: speedups against the plain CUDA-graph engine in the same (synchronous) loop, forced and with
    the per-step rule; the last ratio is the rule against plain decoding with overlap scheduling."""
    lines = ["| model | proposer | batch | k | alpha | plain tok/s | forced tok/s | forced x | rule x | rule spec steps | "
             "acceptance | tokens/step | v | c | Leviathan x | diverged | rule x vs overlap plain |", "|" + " --- |" * 17]
    for r in rows:
        vs_overlap = "-" if r.overlap_tps is None else f"{r.rule_tps / r.overlap_tps:.2f}"
        lines.append(f"| {r.model} | {r.proposer} | {r.batch} | {r.k} | {'-' if r.alpha is None else f'{r.alpha:g}'} | "
                     f"{r.plain_tps:.0f} | {r.forced_tps:.0f} | {r.forced_tps / r.plain_tps:.2f} | {r.rule_tps / r.plain_tps:.2f} | "
                     f"{r.spec_steps_share:.0%} | {r.acceptance:.2f} | {r.tokens_per_step:.2f} | {'-' if r.v is None else f'{r.v:.2f}'} | "
                     f"{'-' if r.c is None else f'{r.c:.3f}'} | "
                     f"{'-' if r.predicted is None else f'{r.predicted:.2f}'} | {r.diverged} | {vs_overlap} |")
    return "\n".join(lines)


def plot(rows: list[GpuSpecRow], out_dir: Path) -> list[Path]:
    """One PNG per model: speedup vs alpha, one panel per batch size, one colour per k (measured with the rule,
    forced dashed, Leviathan's prediction dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model in sorted({r.model for r in rows}):
        mine = [r for r in rows if r.model == model and r.proposer == "controlled"]
        batches = sorted({r.batch for r in mine})
        fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), sharey=True, squeeze=False)
        for ax, b in zip(axes[0], batches):
            for i, k in enumerate(sorted({r.k for r in mine})):
                pts = sorted((r for r in mine if r.batch == b and r.k == k), key=lambda r: r.alpha or 0.0)
                xs, colour = [r.alpha for r in pts], f"C{i}"
                ax.plot(xs, [r.rule_tps / r.plain_tps for r in pts], "o-", color=colour, label=f"k={k} (rule on)")
                ax.plot(xs, [r.forced_tps / r.plain_tps for r in pts], "--", color=colour, alpha=0.6)
                ax.plot(xs, [r.predicted for r in pts], ":", color=colour, alpha=0.8)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_title(f"{model}, batch {b}")
            ax.set_xlabel("alpha (draft acceptance)")
        axes[0][0].set_ylabel("speedup vs plain CUDA-graph decode")
        axes[0][0].legend(fontsize=7, title="dashed: forced, dotted: Leviathan", title_fontsize=7)
        fig.tight_layout()
        path = out_dir / f"spec_gpu_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_spec_gpu(models: list[str], out_dir: Path, out_len: int = 128, prompt_len: int = 128,
                 batches: tuple[int, ...] = BATCHES, alphas: tuple[float, ...] = ALPHAS, ks: tuple[int, ...] = KS) -> list[GpuSpecRow]:
    """The whole grid on each model; prints the table, writes ``spec_gpu.json`` and the plots under ``out_dir``."""
    if not torch.cuda.is_available():
        raise SystemExit("error: bench spec --device cuda needs a CUDA device")
    rows: list[GpuSpecRow] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in models:  # results are written after each model: a long run cut short keeps what it measured
        rows += run_model(name, out_len, prompt_len, batches, alphas, ks)
        print(table(rows))
        print(f"{torch.cuda.get_device_name()}, bf16, random weights, greedy, prompt {prompt_len}, output {out_len} tokens. "
              "forced: speculation in every step; rule: the per-step rule of servinglab.engine.spec_policy; v: speculative "
              "verification step / plain step, from the forced alpha = 0 row; Leviathan: (1 - a^(k+1)) / ((1 - a) v) with c = 0.", flush=True)
        (out_dir / "spec_gpu.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        plot(rows, out_dir)
    return rows

"""``servinglab bench spec``: speculative decoding in the lab engine, plain vs speculative, one table.

Each row runs the same prompts through two engines that differ only in
``speculative_config`` (same model, dtype, KV pool; prefix caching off so every repeat
pays its prefill), alternating plain and speculative runs and keeping each one's best
time, so a busy machine slows both alike. Batch 1 sends the prompts one at a time;
batch 8 sends all eight at once. Prompt lookup (``ngram``) runs on input-grounded chat
prompts (edits and rewrites of a given text or code, where the answer copies the prompt)
and, to show where it stops paying, on open-ended ones; the early-exit ``draft`` runs on
open-ended prompts. Each row compares the measured speedup with Leviathan et al.'s
prediction ``(1 - a^(k+1)) / ((1 - a)(k c + 1))`` from the measured acceptance ``a`` and
cost ratio ``c`` (drafting time per draft token / a plain decode step), and explains gaps
over 20%. With vLLM installed, the greedy input-grounded n-gram rows (batch 1 and 8) are
repeated on vLLM (its own ``ngram`` speculation, same ``k``), plain and speculative, in child processes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from servinglab.bench.spec_prompts import GROUNDED, OPEN_ENDED, chat_prompts
from servinglab.engine.sampling import SamplingParams

@dataclass
class SpecRow:
    """One line of the table: a workload on the plain and the speculative engine."""

    system: str
    method: str
    workload: str
    dtype: str
    batch: int
    temperature: float
    k: int
    plain_tps: float
    spec_tps: float
    identical: str = "-"  # greedy: requests whose tokens match the plain engine's
    acceptance: float | None = None
    tokens_per_pass: float | None = None
    by_position: list[float] = field(default_factory=list)
    c: float | None = None  # drafting cost per draft token / plain decode step
    v: float | None = None  # speculative target pass / plain decode step
    predicted: float | None = None
    note: str = ""
    plain_ids: list[list[int]] | None = field(default=None, repr=False)  # greedy tokens of the plain engine

    @property
    def speedup(self) -> float:
        return self.spec_tps / self.plain_tps


def _run(llm, prompts: list[list[int]], params: list) -> tuple[float, list[list[int]], int]:
    """(seconds, tokens per request, engine steps) for one pass over the prompts at ``len(params)`` per call."""
    engine, steps, start, outs = llm.engine, llm.engine.num_steps, time.perf_counter(), []
    batch = len(params)
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i : i + batch], params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs], engine.num_steps - steps


def measure(plain, spec_llm, label: tuple[str, str, str], prompts: list[list[int]], batch: int, temperature: float,
            max_tokens: int, repeats: int) -> SpecRow:
    """Alternate plain and speculative runs (order swapped every repeat), keep each one's best time.

    ``c`` and ``v`` are per *decode* step: a prefill-only pass (``max_tokens=1``) is timed and
    taken out of both runs, since Leviathan's formula is about decoding.
    """
    from servinglab.impl import load_part
    from servinglab.engine.spec_decode import SpecDecodeStats

    def params(n: int) -> list:
        return [SamplingParams(temperature=temperature, max_tokens=n, seed=None if temperature == 0 else 7 + i) for i in range(batch)]

    dec = spec_llm.engine.spec_decoder
    prefill_s, _, prefill_steps = _run(plain, prompts, params(1))
    dec.stats, dec.propose_seconds = SpecDecodeStats(dec.k), 0.0
    best: dict[str, tuple[float, list[list[int]], int]] = {}
    for r in range(repeats):
        for name, llm in (("plain", plain), ("spec", spec_llm))[:: 1 if r % 2 == 0 else -1]:
            res = _run(llm, prompts, params(max_tokens))
            best[name] = res if name not in best or res[0] < best[name][0] else best[name]
    (tp, ids_p, steps_p), (ts, ids_s, steps_s) = best["plain"], best["spec"]
    st, k = dec.stats, dec.k
    t_step = max(tp - prefill_s, 1e-9) / max(steps_p - prefill_steps, 1)  # one plain decode step
    propose = dec.propose_seconds / repeats / max(steps_s - prefill_steps, 1)  # drafting per decode step
    c = propose / k / t_step
    v = (max(ts - prefill_s, 1e-9) / max(steps_s - prefill_steps, 1) - propose) / t_step
    a = min(st.acceptance_rate, 0.999)
    spec_mod = load_part("speculative")
    row = SpecRow("lab engine", label[0], label[1], label[2], batch, temperature, k,
                  sum(map(len, ids_p)) / tp, sum(map(len, ids_s)) / ts,
                  acceptance=st.acceptance_rate, tokens_per_pass=st.mean_tokens_per_step,
                  by_position=st.acceptance_by_position, c=c, v=v, predicted=spec_mod.expected_speedup(a, k, c))
    if temperature == 0:
        row.identical = f"{sum(x == y for x, y in zip(ids_p, ids_s))}/{len(prompts)}"
        row.plain_ids = ids_p
    row.note = explain(row, spec_mod.expected_tokens_per_step(a, k))
    return row


def explain(row: SpecRow, leviathan_tokens: float) -> str:
    """Why the measured speedup is more than 20% off Leviathan's prediction (empty when it is not)."""
    if row.predicted is None or abs(row.speedup / row.predicted - 1) <= 0.2:
        return ""
    why = []
    if row.v is not None and row.v > 1.15:
        why.append(f"a verify pass (1 + up to k tokens per sequence) costs v = {row.v:.2f} plain decode steps; Leviathan "
                   "assumes 1 (memory-bound decode), but on this CPU extra rows are not free, least of all at batch 8")
    if row.tokens_per_pass is not None and abs(row.tokens_per_pass / leviathan_tokens - 1) > 0.15:
        why.append(f"{row.tokens_per_pass:.2f} tokens per pass measured vs {leviathan_tokens:.2f} for i.i.d. acceptance: "
                   "accepts come in runs (a copied span) and some steps have fewer than k or no drafts")
    return "; ".join(why) or "timing noise or per-step overheads (sampling, bookkeeping) outside the model"


def bench_vllm(model_dir: str, prompts: list[list[int]], max_tokens: int, k: int, dtype: str) -> list[SpecRow]:
    """vLLM plain and with ngram speculation, batch 1 and 8, greedy, in child processes (its worker binds threads)."""
    import subprocess
    import tempfile

    from servinglab.bench.vllm_baseline import vllm_build, vllm_env

    results = {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": {"method": "ngram", "num_speculative_tokens": k,
                                                                         "prompt_lookup_min": 1, "prompt_lookup_max": 3}})):
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
            src.write_text(json.dumps({"model": model_dir, "prompts": prompts, "max_tokens": max_tokens,
                                       "engine": {"dtype": dtype, "max_model_len": 1024, "enforce_eager": True, **extra}}))
            proc = subprocess.run([sys.executable, "-m", "servinglab.bench.spec", str(src), str(dst)],
                                  env=vllm_env(), capture_output=True, text=True, timeout=900)
            if proc.returncode != 0 or not dst.exists():
                raise RuntimeError(f"vLLM ({name}) failed, exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
            results[name] = json.loads(dst.read_text())
    rows = []
    for batch in ("1", "8"):
        p, s = results["plain"][batch], results["ngram"][batch]
        row = SpecRow(vllm_build() or "vllm", "ngram", "grounded", dtype, int(batch), 0.0, k,
                      p["tokens"] / p["elapsed_s"], s["tokens"] / s["elapsed_s"],
                      identical=f"{sum(x == y for x, y in zip(p['token_ids'], s['token_ids']))}/{len(prompts)}")
        m = s.get("metrics", {})
        if m.get("drafts"):
            row.acceptance = m["accepted"] / m["draft_tokens"] if m["draft_tokens"] else 0.0
            row.tokens_per_pass = 1 + m["accepted"] / m["drafts"]  # vLLM's mean acceptance length
        rows.append(row)
    return rows


def _vllm_child(src: Path, dst: Path) -> None:
    from vllm import LLM, SamplingParams  # imported only in the child

    job = json.loads(src.read_text())
    llm = LLM(model=job["model"], seed=0, disable_log_stats=False, **job["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    out: dict[str, Any] = {}
    for batch in (1, 8):
        start, outs = time.perf_counter(), []
        for i in range(0, len(prompts), batch):
            outs += llm.generate(prompts[i : i + batch], params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        out[str(batch)] = {"elapsed_s": time.perf_counter() - start, "token_ids": ids, "tokens": sum(map(len, ids))}
    counters = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                "vllm:spec_decode_num_accepted_tokens": "accepted"}
    try:
        out["8"]["metrics"] = {counters[m.name]: m.value for m in llm.get_metrics() if m.name in counters}
    except Exception as exc:  # metrics are a bonus; their API moved between vLLM versions
        out["8"]["metrics"] = {"error": repr(exc)}
    dst.write_text(json.dumps(out))


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def spec_table(rows: list[SpecRow]) -> str:
    """Markdown table, then the gap explanations as numbered notes."""
    lines = ["| system | method | prompts | dtype | batch | T | k | plain tok/s | spec tok/s | speedup | greedy identical | "
             "acceptance | tokens/pass | acceptance by position | c | v | Leviathan | gap | note |",
             "|" + " --- |" * 19]
    notes: list[str] = []
    for r in rows:
        gap = "-" if r.predicted is None else f"{r.speedup / r.predicted - 1:+.0%}"
        ref = ""
        if r.note:
            notes.append(r.note)
            ref = f"[{len(notes)}]"
        lines.append(f"| {r.system} | {r.method} | {r.workload} | {r.dtype} | {r.batch} | {r.temperature:g} | {r.k} | "
                     f"{r.plain_tps:.1f} | {r.spec_tps:.1f} | {r.speedup:.2f}x | {r.identical} | {_fmt(r.acceptance)} | "
                     f"{_fmt(r.tokens_per_pass)} | {' '.join(f'{x:.2f}' for x in r.by_position) or '-'} | {_fmt(r.c, '.3f')} | "
                     f"{_fmt(r.v)} | {_fmt(r.predicted)}{'x' if r.predicted else ''} | {gap} | {ref} |")
    return "\n".join(lines + [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)])


def run_spec(model_dir: str, dtypes: list[str], out_dir: Path, k: int = 6, draft_k: int = 2, draft_layers: int = 8,
             max_tokens: int = 128, open_max_tokens: int = 64, repeats: int = 2, with_vllm: bool = True) -> list[SpecRow]:
    """Run the whole plan, print one table, save it (JSON) under ``out_dir``; return the rows."""
    from servinglab.model.dtypes import resolve_dtype

    dtypes = [resolve_dtype(d, "cpu") for d in dtypes]  # one concrete dtype per row, for the lab and vLLM alike
    from tqdm.auto import tqdm

    from servinglab.engine.llm import LLM

    def engine(dtype: str, spec: dict | None = None) -> LLM:
        return LLM(model=model_dir, dtype=dtype, max_model_len=1024, enable_prefix_caching=False,
                   kv_cache_memory_gib=0.25, speculative_config=spec)

    ngram_cfg = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    draft_cfg = {"method": "draft", "num_speculative_tokens": draft_k, "draft_num_layers": draft_layers}
    rows: list[SpecRow] = []
    grounded = opened = []
    for n, dtype in enumerate(dtypes):
        plain = engine(dtype)
        grounded, opened = chat_prompts(plain.get_tokenizer(), GROUNDED), chat_prompts(plain.get_tokenizer(), OPEN_ENDED)
        # (method, engine config, prompts name, prompts, batch, temperature, max tokens). Secondary batch-1 rows use
        # the first 4 prompts and shorter outputs to keep the run short; fp32 repeats only the headline row.
        half = max_tokens // 2
        plan: list[tuple[str, dict, str, list, int, float, int]] = [("ngram", ngram_cfg, "grounded", grounded, 1, 0.0, max_tokens)]
        if n == 0:
            plan += [("ngram", ngram_cfg, "grounded", grounded[:4], 1, 1.0, half),
                     ("ngram", ngram_cfg, "grounded", grounded, 8, 0.0, max_tokens),
                     ("ngram", ngram_cfg, "grounded", grounded, 8, 1.0, half),
                     ("ngram", ngram_cfg, "open-ended", opened[:4], 1, 0.0, open_max_tokens),
                     ("ngram", ngram_cfg, "open-ended", opened, 8, 0.0, open_max_tokens),
                     (f"draft L={draft_layers}", draft_cfg, "open-ended", opened[:4], 1, 0.0, open_max_tokens * 3 // 4),
                     (f"draft L={draft_layers}", draft_cfg, "open-ended", opened, 8, 0.0, open_max_tokens // 2)]
        spec_llms: dict[str, LLM] = {}
        for method, cfg, name, prompts, batch, temp, max_new in tqdm(plan, desc=f"bench spec {dtype}"):
            if method not in spec_llms:
                spec_llms[method] = engine(dtype, cfg)
                for llm in (plain, spec_llms[method]):  # warm-up: first-call allocations, thread pools
                    _run(llm, prompts[:1], [SamplingParams(temperature=0.0, max_tokens=8)])
            rows.append(measure(plain, spec_llms[method], (method, name, dtype), prompts, batch, temp, max_new, repeats))
            print(spec_table(rows[-1:]).splitlines()[2], flush=True)
        del plain, spec_llms
    if with_vllm:
        try:
            rows += bench_vllm(model_dir, grounded, max_tokens, k, dtypes[0])
        except Exception as exc:  # report, keep the lab rows
            print(f"vLLM rows skipped: {exc}", file=sys.stderr)
            rows.append(SpecRow("vllm", "ngram", "grounded", dtypes[0], 0, 0.0, k, float("nan"), float("nan"), note=f"failed: {str(exc)[-600:]}"))
    print(spec_table(rows))
    print(legend(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = [{k: v for k, v in asdict(r).items() if k != "plain_ids"} | {"speedup": r.speedup} for r in rows]
    (out_dir / "spec.json").write_text(json.dumps(payload, indent=1))
    return rows


def legend(rows: list[SpecRow]) -> str:
    """Column meanings, and how batch-invariant the plain engine itself is (why bf16 greedy can differ)."""
    lines = ["c: drafting time per draft token / plain decode step; v: speculative decode step (without drafting) / plain "
             "decode step; Leviathan: (1 - a^(k+1)) / ((1 - a)(k c + 1)) from the measured a and c; gap: measured / predicted - 1.",
             "tokens/s include prefill; c and v are per decode step (a prefill-only pass is timed and subtracted)."]
    for r8 in rows:
        # Same prompts and max_tokens at both batch sizes: the n-gram rows (batch 1 may use the first 4 prompts).
        r1 = next((r for r in rows if r.plain_ids and r8.plain_ids and r.batch == 1 and r8.batch == 8 and r.method == "ngram"
                   and (r.method, r.workload, r.dtype) == (r8.method, r8.workload, r8.dtype)), None)
        if r1 is not None:
            same = sum(x == y for x, y in zip(r1.plain_ids, r8.plain_ids))
            lines.append(f"{r8.dtype}, {r8.workload}: the plain lab engine alone gives {same}/{len(r1.plain_ids)} identical greedy outputs "
                         "at batch 1 vs batch 8: different row counts round differently, and greedy follows a near-tie either way.")
    if any(r.system != "lab engine" for r in rows):
        lines.append("vLLM rows: acceptance and tokens/pass (vLLM's mean acceptance length: 1 + accepted per drafting step) "
                     "come from its counters over the whole child run (warm-up, batch 1 and 8), shown on the batch-8 row.")
    return "\n".join(lines)


if __name__ == "__main__":
    _vllm_child(Path(sys.argv[1]), Path(sys.argv[2]))

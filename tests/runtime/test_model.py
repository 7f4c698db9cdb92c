"""Runtime tests of the paged model and the runner, always on the reference paged attention.

The oracle is transformers' own ``LlamaForCausalLM`` holding the same weights, run on the
whole token sequence with no cache: whatever the runner does with blocks, chunks and
batches, each sampled row must give the logits of that full forward pass.
"""

from __future__ import annotations

import random

import pytest
import torch

from servinglab.model.cache import KVCacheSpec, allocate_kv_cache
from servinglab.interfaces import ScheduledSequence, SchedulerOutput
from servinglab.engine.runner import ModelRunner
from servinglab.sequence import Sequence
from servinglab.model.weights import random_model, tiny_llama_config, to_transformers

BLOCK_SIZE = 4
NUM_BLOCKS = 64


@pytest.fixture
def tiny():
    config = tiny_llama_config()
    model = random_model(config, dtype=torch.float32, seed=0)
    return config, model


def hf_last_logits(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0, -1].float()


class Harness:
    """A runner over a fresh cache with hand-made, shuffled block tables (no Part 2 needed)."""

    def __init__(self, config, model, seed: int = 0) -> None:
        caches = allocate_kv_cache(KVCacheSpec.from_hf_config(config), NUM_BLOCKS, BLOCK_SIZE, torch.float32)
        self.runner = ModelRunner(model, caches, BLOCK_SIZE, "cpu")
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}

    def step(self, work: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """Run one step of ``(seq, num_new_tokens)``; return logits by seq_id of those that sample."""
        for seq, n in work:
            table = self.tables.setdefault(seq.seq_id, [])
            while len(table) * BLOCK_SIZE < seq.num_computed_tokens + n:
                table.append(self.free.pop())
        seqs, logits = self.runner.execute(SchedulerOutput([ScheduledSequence(s, n) for s, n in work]), self.tables)
        for seq, n in work:
            seq.num_computed_tokens += n
        assert logits.dtype == torch.float32 and logits.shape[0] == len(seqs)
        return {s.seq_id: row for s, row in zip(seqs, logits)}


CONFIGS = {
    "tied-gqa2": {},
    "untied-bias-mha": dict(tie_word_embeddings=False, attention_bias=True, num_key_value_heads=4),
    "gqa4-headdim32": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, num_hidden_layers=3),
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_prefill_then_decode_matches_transformers(overrides):
    config = tiny_llama_config(**overrides)
    model = random_model(config, dtype=torch.float32, seed=1)
    hf = to_transformers(model)
    h = Harness(config, model)
    seq = Sequence(prompt_token_ids=[5, 17, 99, 3, 42, 7, 7, 250, 31, 64, 12])
    logits = h.step([(seq, seq.num_prompt_tokens)])[seq.seq_id]
    torch.testing.assert_close(logits, hf_last_logits(hf, seq.token_ids), atol=1e-4, rtol=1e-4)
    for _ in range(6):
        seq.output_token_ids.append(int(logits.argmax()))
        logits = h.step([(seq, 1)])[seq.seq_id]
        torch.testing.assert_close(logits, hf_last_logits(hf, seq.token_ids), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_samples_only_at_the_end(tiny):
    config, model = tiny
    hf = to_transformers(model)
    h = Harness(config, model, seed=1)
    seq = Sequence(prompt_token_ids=list(range(20, 33)))
    assert h.step([(seq, 5)]) == {}  # a middle chunk samples nothing
    assert h.step([(seq, 6)]) == {}
    logits = h.step([(seq, 2)])[seq.seq_id]
    torch.testing.assert_close(logits, hf_last_logits(hf, seq.token_ids), atol=1e-4, rtol=1e-4)


def test_ragged_batch_equals_each_sequence_alone(tiny):
    config, model = tiny
    prompts = [[3, 9, 27, 81, 243], list(range(40, 49)), [200 - i for i in range(13)], [11]]

    def fresh() -> list[Sequence]:
        return [Sequence(prompt_token_ids=list(p)) for p in prompts]

    # Alone: each sequence in its own cache, prefill then two decode steps.
    alone: list[list[torch.Tensor]] = []
    for seq in fresh():
        h = Harness(config, model, seed=2)
        rows = [h.step([(seq, seq.num_prompt_tokens)])[seq.seq_id]]
        for _ in range(2):
            seq.output_token_ids.append(int(rows[-1].argmax()))
            rows.append(h.step([(seq, 1)])[seq.seq_id])
        alone.append(rows)

    # Together: a ragged prefill of three, then a step that mixes decodes with the fourth's
    # prefill, then a decode-only step of all four.
    a, b, c, d = seqs = fresh()
    h = Harness(config, model, seed=3)
    got = {s.seq_id: [] for s in seqs}
    for sid, row in h.step([(a, 5), (b, 9), (c, 13)]).items():
        got[sid].append(row)
    for s in (a, b, c):
        s.output_token_ids.append(int(got[s.seq_id][-1].argmax()))
    for sid, row in h.step([(a, 1), (d, 1), (b, 1), (c, 1)]).items():
        got[sid].append(row)
    for s in seqs:
        s.output_token_ids.append(int(got[s.seq_id][-1].argmax()))
    for sid, row in h.step([(s, 1) for s in seqs]).items():
        got[sid].append(row)
    d.output_token_ids.append(int(got[d.seq_id][-1].argmax()))
    for sid, row in h.step([(d, 1)]).items():
        got[sid].append(row)

    for seq, rows in zip(seqs, alone):
        assert len(got[seq.seq_id]) >= 3
        for mine, ref in zip(got[seq.seq_id], rows):
            torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_load_model_reads_a_transformers_folder(tiny, tmp_path):
    """Save a transformers model to disk, load it with load_model: same logits."""
    from servinglab.model.weights import load_model

    config, model = tiny
    to_transformers(model).save_pretrained(tmp_path)
    loaded, loaded_config = load_model(tmp_path, dtype=torch.float32)
    assert loaded_config.num_hidden_layers == config.num_hidden_layers
    seq = Sequence(prompt_token_ids=[9, 8, 7, 6, 5, 4])
    a = Harness(config, model).step([(seq, 6)])[seq.seq_id]
    seq.num_computed_tokens = 0
    b = Harness(loaded_config, loaded).step([(seq, 6)])[seq.seq_id]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_scaled_rope_is_refused():
    config = tiny_llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(NotImplementedError, match="linear"):
        random_model(config)


def test_copy_blocks_copies_every_layer(tiny):
    config, model = tiny
    h = Harness(config, model)
    for k, v in h.runner.kv_caches:
        k[3].normal_()
        v[3].normal_()
    h.runner.copy_blocks([(3, 8)])
    for k, v in h.runner.kv_caches:
        assert torch.equal(k[8], k[3]) and torch.equal(v[8], v[3])


def test_prepare_inputs_layout(tiny):
    config, model = tiny
    h = Harness(config, model)
    a = Sequence(prompt_token_ids=[1, 2, 3, 4, 5, 6])
    a.num_computed_tokens = 4
    b = Sequence(prompt_token_ids=[7, 8, 9])
    tables = {a.seq_id: [10, 20], b.seq_id: [30]}
    batch = h.runner.prepare_inputs(SchedulerOutput([ScheduledSequence(a, 2), ScheduledSequence(b, 2)]), tables)
    assert batch.input_ids.tolist() == [5, 6, 7, 8]
    assert batch.positions.tolist() == [4, 5, 0, 1]
    assert batch.metadata.slot_mapping.tolist() == [20 * 4 + 0, 20 * 4 + 1, 30 * 4 + 0, 30 * 4 + 1]
    assert batch.metadata.block_tables.tolist() == [[10, 20], [30, 0]]
    assert batch.metadata.context_lens.tolist() == [6, 2]
    assert batch.metadata.query_start_loc.tolist() == [0, 2, 4]
    assert batch.logits_indices.tolist() == [1] and batch.sample_seqs == [a]  # b's prompt is unfinished


REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


@pytest.mark.slow
def test_real_model_matches_transformers():
    from servinglab.model.prepare import default_model_dir, is_prepared
    from servinglab.model.weights import load_model

    model_dir = default_model_dir()
    if not is_prepared(model_dir):
        pytest.skip(f"real model folder {model_dir} is absent: run `servinglab prepare-model`")
    from transformers import AutoTokenizer

    model, config = load_model(model_dir, dtype=torch.float32)
    hf = to_transformers(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    caches = allocate_kv_cache(KVCacheSpec.from_hf_config(config), 32, 16, torch.float32)
    runner = ModelRunner(model, caches, 16, "cpu")
    seqs = [Sequence(prompt_token_ids=tok(p)["input_ids"]) for p in REAL_PROMPTS]
    tables, next_block = {}, 0
    for s in seqs:
        n = -(-s.num_prompt_tokens // 16)
        tables[s.seq_id] = list(range(next_block, next_block + n))
        next_block += n
    out = SchedulerOutput([ScheduledSequence(s, s.num_prompt_tokens) for s in seqs])
    sampled, logits = runner.execute(out, tables)
    assert sampled == seqs
    for s, row in zip(seqs, logits):
        ref = hf_last_logits(hf, s.token_ids)
        torch.testing.assert_close(row, ref, atol=2e-3, rtol=1e-3)
        assert int(row.argmax()) == int(ref.argmax())
    assert tok.decode([int(logits[0].argmax())]).strip() == "Paris"

"""Graded tests for Part 9b: pipeline parallelism (GPipe stages, vLLM's virtual engines).

The split and the weights are plain Python and tensors. The stage forward runs a tiny
random model twice in one process, whole and as two stages handing over ``(hidden,
residual)``, and compares the float32 hidden states. The engine test starts real gloo
ranks: ``pipeline_parallel_size=2`` on a 3-layer tiny model (an uneven split) must give
the greedy tokens of one rank through batching, chunked prefill and preemption.

Plausible bugs these tests guard against (each fails at least two of them): a stage
that forgets to add the incoming residual, layer ranges that overlap by one, the extra
layers of an uneven split given to the first stages, a tied LM head missing on the last
stage, virtual-engine ties going to the highest index.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servinglab.interfaces import ScheduledSequence, SchedulerOutput
from servinglab.model.cache import KVCacheSpec, allocate_kv_cache
from servinglab.model.weights import random_model, tiny_llama_config
from servinglab.sequence import Sequence

pytestmark = pytest.mark.part(9)


@pytest.mark.points(2)
def test_stage_layers_are_contiguous_and_follow_vllm(pipeline_parallel):
    pp = pipeline_parallel
    assert [pp.stage_layers(30, r, 2) for r in range(2)] == [(0, 15), (15, 30)], "SmolLM2's 30 layers on 2 stages"
    assert [pp.stage_layers(5, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 5)], (
        "extra layers go one each to the stages just before the last")
    assert [pp.stage_layers(30, r, 4) for r in range(4)] == [(0, 7), (7, 15), (15, 23), (23, 30)]
    for n, p in ((7, 1), (7, 7), (31, 4)):
        spans = [pp.stage_layers(n, r, p) for r in range(p)]
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        pp.stage_layers(2, 0, 3)
    with pytest.raises(ValueError, match="pp_rank"):
        pp.stage_layers(30, 2, 2)


def _state(layers: int, tied: bool) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": torch.randn(16, 4), "model.norm.weight": torch.ones(4)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.qkv_proj.weight"] = torch.full((12, 4), float(i))
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.full((4,), float(i))
    if not tied:
        sd["lm_head.weight"] = torch.randn(16, 4)
    return sd


@pytest.mark.points(2)
def test_stage_state_dict_places_embedding_layers_and_head(pipeline_parallel):
    pp = pipeline_parallel
    sd = _state(5, tied=True)
    stages = [pp.stage_state_dict(sd, 5, r, 3, tie_word_embeddings=True) for r in range(3)]
    assert set(stages[0]) == {"model.embed_tokens.weight"} | {f"model.layers.{i}.{n}" for i in (0, 1)
                                                              for n in ("self_attn.qkv_proj.weight", "input_layernorm.weight")}
    assert float(stages[1]["model.layers.0.self_attn.qkv_proj.weight"][0, 0]) == 2.0, "stage 1 starts at layer 2, renumbered 0"
    assert "model.layers.2.input_layernorm.weight" not in stages[1], "stage 1 holds layers 2 and 3 only"
    assert set(stages[2]) == {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.input_layernorm.weight",
                              "model.norm.weight", "lm_head.weight"}
    assert float(stages[2]["model.layers.0.input_layernorm.weight"][0]) == 4.0
    assert torch.equal(stages[2]["lm_head.weight"], sd["model.embed_tokens.weight"]), "a tied LM head is the embedding"
    untied = _state(2, tied=False)
    last = pp.stage_state_dict(untied, 2, 1, 2)
    assert torch.equal(last["lm_head.weight"], untied["lm_head.weight"]) and "model.embed_tokens.weight" not in last
    whole = pp.stage_state_dict(sd, 5, 0, 1, tie_word_embeddings=True)
    assert set(whole) == set(sd), "one stage holds everything (the tied embedding once)"
    with pytest.raises(ValueError, match="rotary"):
        pp.stage_state_dict({**sd, "model.rotary.inv_freq": torch.zeros(2)}, 5, 0, 2)


@pytest.mark.points(1)
def test_uneven_split_weights_by_hand(pipeline_parallel):
    """6 layers on 4 stages split 1, 2, 2, 1: the two extra layers go to the two stages before the last."""
    pp = pipeline_parallel
    sd = _state(6, tied=False)
    stages = [pp.stage_state_dict(sd, 6, r, 4) for r in range(4)]
    layer = ("self_attn.qkv_proj.weight", "input_layernorm.weight")
    assert set(stages[0]) == {"model.embed_tokens.weight"} | {f"model.layers.0.{n}" for n in layer}
    assert set(stages[3]) == {f"model.layers.0.{n}" for n in layer} | {"model.norm.weight", "lm_head.weight"}
    held = [[float(st_[f"model.layers.{i}.input_layernorm.weight"][0]) for i in range(3) if f"model.layers.{i}.input_layernorm.weight" in st_]
            for st_ in stages]
    assert held == [[0.0], [1.0, 2.0], [3.0, 4.0], [5.0]], f"layers per stage {held}; want [[0], [1, 2], [3, 4], [5]]"


def _prefill_inputs(model, tokens: list[int]):
    """Runner inputs for one sequence's whole prefill, and a fresh KV cache."""
    from servinglab.engine.runner import ModelRunner

    bs = 4
    caches = allocate_kv_cache(KVCacheSpec.from_hf_config(model.config), 8, bs, torch.float32)
    runner = ModelRunner(model, caches, bs, "cpu")
    seq = Sequence(prompt_token_ids=tokens)
    batch = runner.prepare_inputs(SchedulerOutput([ScheduledSequence(seq, len(tokens))]), {seq.seq_id: list(range(8))})
    return batch, caches


@pytest.mark.points(3)
def test_two_stages_hand_over_hidden_and_residual(pipeline_parallel):
    pp = pipeline_parallel
    config = tiny_llama_config(num_hidden_layers=3)
    model = random_model(config, dtype=torch.float32, seed=0)
    tokens = torch.randint(3, 256, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    batch, caches = _prefill_inputs(model, tokens)
    with torch.inference_mode():
        want = model(batch.input_ids, batch.positions, batch.metadata, caches)
        _, caches = _prefill_inputs(model, tokens)
        layers = model.model.layers
        cos, sin = model.rotary_emb.cos_sin(batch.positions, torch.float32)
        hidden, residual = model.model.embed_tokens(batch.input_ids), None
        for r in range(2):
            a, b = pp.stage_layers(3, r, 2)
            hidden, residual = pp.stage_forward(layers[a:b], hidden, residual, cos, sin, batch.metadata, caches[a:b])
            assert hidden.shape == residual.shape == (11, config.hidden_size)
        got = model.model.norm(hidden + residual)
    err = float((got - want).abs().max())
    assert err < 1e-5, f"two stages differ from the whole model by {err:.3g}: the next stage must add hidden + residual"


@pytest.mark.points(1)
def test_virtual_engine_choice_and_the_bubble(pipeline_parallel):
    pp = pipeline_parallel
    assert pp.pick_virtual_engine([3, 1, 1]) == 1 and pp.pick_virtual_engine([0, 0]) == 0 and pp.pick_virtual_engine([2, 5]) == 0
    assert pp.gpipe_bubble_fraction(2, 1) == pytest.approx(0.5) and pp.gpipe_bubble_fraction(2, 4) == pytest.approx(0.2)
    assert pp.gpipe_bubble_fraction(4, 4) == pytest.approx(3 / 7) and pp.gpipe_bubble_fraction(1, 8) == 0.0
    for p, m in ((2, 1), (2, 4), (3, 2)):  # an ideal GPipe timeline: micro-batch j on stage s in slot s + j
        busy = [[(float(s + j), s + j + 1.0) for j in range(m)] for s in range(p)]
        assert pp.measured_bubble_fraction(busy) == pytest.approx(pp.gpipe_bubble_fraction(p, m))


@pytest.mark.points(1)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 4), min_size=1, max_size=6))
def test_virtual_engine_is_the_first_least_loaded(pipeline_parallel, unfinished):
    """Against a brute-force reference: the lowest index among the engines with the fewest unfinished requests."""
    want = unfinished.index(min(unfinished))
    assert pipeline_parallel.pick_virtual_engine(unfinished) == want, f"{unfinished}: engine {want} has the fewest, first"


@pytest.mark.points(4)
def test_pp2_engine_gives_the_tokens_of_one_rank(pipeline_parallel):
    from servinglab import LLM, SamplingParams

    config = tiny_llama_config(num_hidden_layers=3)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 9, 17, 30, 44, 5)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(**kwargs):
        llm = LLM(model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config, dtype="float32",
                  block_size=4, max_num_batched_tokens=16, max_model_len=64, **kwargs)
        llm.engine.record_steps = True
        return llm, llm.generate(prompts, greedy, use_tqdm=False)

    _, want = run(num_kv_blocks=200)
    llm, got = run(num_kv_blocks=40, pipeline_parallel_size=2)  # 20 blocks per virtual engine: preemption
    try:
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert sum(o.metrics.num_preemptions for o in got) > 0, "20 blocks per virtual engine should force preemption"
        log = llm.engine.step_log
        assert any(0 < n < 17 for rec in log for _, n, prefill in rec.scheduled if prefill), "prompts were chunked"
        ranks = llm.engine.tp_executor.rank_stats()
        assert [r["num_layers"] for r in ranks] == [2, 1], "3 layers on 2 stages: [0, 2) and [2, 3)"
        assert [(r["has_embedding"], r["has_lm_head"]) for r in ranks] == [(True, False), (False, True)]
        stats = llm.engine.block_manager.get_stats()
        assert stats.num_free_blocks == stats.num_blocks, "blocks leaked after every request finished"
    finally:
        llm.engine.tp_executor.shutdown()

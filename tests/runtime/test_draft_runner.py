"""The early-exit draft inside the engine on CUDA (servinglab.engine.draft_runner), checked on every machine.

On a CPU the CUDA runner runs eagerly with Triton's interpreter (as in
test_async_scheduling.py): the draft steps fill the same static buffers, patch the
previous step's drafts into the inputs on the device, and hand their drafts to the
verification graph's inputs there, exactly as the GPU replays them, minus the graphs.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from servinglab import LLM, SamplingParams
from servinglab.engine.draft_runner import sample_drafts
from servinglab.engine.spec_decode import SpeculativeDecoder
from servinglab.interfaces import AttentionMetadata
from servinglab.model.weights import random_model, tiny_llama_config

CFG = tiny_llama_config(num_hidden_layers=3)


def test_sample_drafts_is_argmax_for_greedy_rows_and_draws_from_q_for_the_others():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(4, 1)
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
    tokens, q = sample_drafts(logits[:2], [greedy, greedy], [None, None])
    assert tokens.tolist() == [1, 1] and q is None
    gens = [None, None, torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    tokens, q = sample_drafts(logits, [greedy, sampled, sampled, sampled], gens)
    assert q.shape == (4, 4) and torch.allclose(q.sum(-1), torch.ones(4))
    assert q[0].tolist() == [0.0, 1.0, 0.0, 0.0] and tokens[0] == 1  # one-hot: a greedy row's draw is its argmax
    assert torch.allclose(q[1], torch.softmax(logits[1], -1))
    assert tokens[2] == tokens[3], "a seeded row draws with its own generator, whatever its batch"
    n = 20_000  # the unseeded rows' draws follow q (chi-square, false-alarm rate 1e-3)
    torch.manual_seed(0)
    tokens, q = sample_drafts(logits[:1].repeat(n, 1), [sampled] * n, [None] * n)
    counts = torch.bincount(tokens, minlength=4).double()
    expected = q[0].double() / q[0].double().sum() * n  # sums must agree exactly (float32 q sums to 1 + 6e-8)
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_an_early_exit_forward_is_the_first_layers_then_the_final_norm():
    """The fused forward (interpreted Triton) with ``num_layers`` equals the PyTorch layers' early exit."""
    from servinglab.model.gpu_ops import enable_gpu_kernels

    model = random_model(CFG, seed=1)
    ids, pos = torch.tensor([5, 9, 17, 33]), torch.arange(4)
    meta = AttentionMetadata(slot_mapping=torch.arange(4), block_tables=torch.tensor([[0]], dtype=torch.int32),
                             context_lens=torch.tensor([4], dtype=torch.int32), query_start_loc=torch.tensor([0, 4], dtype=torch.int32),
                             max_query_len=4, max_context_len=4)
    head_dim = CFG.hidden_size // CFG.num_attention_heads

    def caches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(1, 16, CFG.num_key_value_heads, head_dim), torch.zeros(1, 16, CFG.num_key_value_heads, head_dim))
                for _ in range(CFG.num_hidden_layers)]

    plain = [model(ids, pos, meta, caches(), num_layers=n) for n in (1, 3)]
    full = model(ids, pos, meta, caches())
    assert torch.equal(plain[1], full) and not torch.allclose(plain[0], full)
    with pytest.raises(ValueError, match="num_layers"):
        model(ids, pos, meta, caches(), num_layers=4)
    enable_gpu_kernels(model)
    kv = caches()
    fused = model(ids, pos, meta, kv, num_layers=1)
    assert torch.allclose(fused, plain[0], atol=2e-5)
    assert kv[0][0].abs().sum() > 0 and kv[1][0].abs().sum() == 0, "only the exit's layers write their K/V"


def _engine(spec: dict | None, max_num_seqs: int = 4) -> LLM:
    """A CPU engine whose runner is the CUDA runner, interpreted and eager, with the early exit when ``spec`` drafts."""
    from servinglab.engine.cuda_runner import CudaModelRunner

    llm = LLM(model_obj=random_model(CFG, seed=0), hf_config=CFG, dtype="float32", device="cpu", block_size=4,
              num_kv_blocks=96, max_num_seqs=max_num_seqs, async_scheduling=False, speculative_config=spec)
    eng = llm.engine
    k, layers = (spec["num_speculative_tokens"], spec["draft_num_layers"]) if spec else (0, 0)
    runner = CudaModelRunner(eng.model, eng.runner.kv_caches, 4, "cpu", max_num_seqs, eng.max_model_len, enforce_eager=True,
                             num_speculative_tokens=k, draft_num_layers=layers, capture_sizes=[1, 2, 4])
    runner.slot_of = eng.block_manager.get_slot
    eng.runner = runner
    if spec:
        eng.spec_decoder = SpeculativeDecoder(spec, eng)  # it reads the runner's drafter
    return llm


@pytest.mark.parametrize("max_num_seqs", [4, 2])
def test_the_early_exit_drafts_on_the_device_and_greedy_tokens_stay_plain(max_num_seqs, monkeypatch):
    """All four at once (every step after the prefill takes the verification graph's inputs), and two at a time
    (a new request prefills beside a decoding one: the drafts are written back for the eager verification)."""
    from servinglab.engine.draft_runner import DeviceDrafts

    prompts = [[3, 7, 11, 7, 3], [42, 43, 44], [9] * 6, [100, 5, 100, 5, 100, 5, 100]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (10, 5, 8, 12)]
    plain = [o.outputs[0].token_ids for o in _engine(None, max_num_seqs).generate(prompts, params, use_tqdm=False)]
    spec = {"method": "draft", "num_speculative_tokens": 3, "draft_num_layers": 2, "adaptive": False}
    llm, written = _engine(spec, max_num_seqs), []
    write_back = DeviceDrafts.write_back
    monkeypatch.setattr(DeviceDrafts, "write_back", lambda self, drafts: (written.append(1), write_back(self, drafts)))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == plain
    assert bool(written) == (max_num_seqs == 2), "drafts go back to the host only for an eager verification"
    decoder, runner = llm.engine.spec_decoder, llm.engine.runner
    assert decoder.drafter is runner.drafter and not hasattr(decoder, "draft_model"), "no transformers copy of the target"
    assert runner.drafter.num_steps > 0 and runner.num_verify_steps > 0
    assert decoder.stats.num_draft_tokens > 0 and decoder.stats.num_accepted_tokens > 0


def test_seeded_sampling_with_the_early_exit_is_reproducible_and_respects_max_tokens():
    spec = {"method": "draft", "num_speculative_tokens": 2, "draft_num_layers": 1, "adaptive": False}
    prompts = [[3, 7, 11], [42, 43, 44, 45]]
    params = [SamplingParams(temperature=0.9, top_k=20, max_tokens=9, seed=s, ignore_eos=True) for s in (1, 2)]
    runs = [[o.outputs[0].token_ids for o in _engine(spec).generate(prompts, params, use_tqdm=False)] for _ in range(2)]
    assert runs[0] == runs[1] and [len(t) for t in runs[0]] == [9, 9]
    assert all(0 <= t < CFG.vocab_size for toks in runs[0] for t in toks)

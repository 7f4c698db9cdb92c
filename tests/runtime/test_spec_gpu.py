"""Speculative decoding on the GPU fast path (CUDA graphs on): exact greedy, exact sampling.

- float32: greedy tokens with speculation are the plain engine's, token for token, and
  the verification steps really replayed graphs (rounding in float32 is far below any
  logit gap of these prompts);
- bfloat16: a verification pass multiplies ``B (1 + k)`` rows where a plain step
  multiplies ``B``, so roundings differ; every request's first differing token must be
  a near-tie of the float32 model at that prefix (``NEAR_TIE``), nothing more;
- the reference ``rejection_sample`` on CUDA tensors keeps the target's law (chi-square,
  false-alarm rate 1e-3, fixed seeds), as the graded CPU tests check on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from servinglab import impl
from servinglab.engine.sampling import SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config, to_transformers

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs)")]
NEAR_TIE = 0.5  # as tests/runtime/test_real_model.py: a wrong kernel diverges where the margin is whole units
CONFIG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
              vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=False)


class OracleProposer:
    """Drafts the plain engine's own greedy continuation with every third draft wrong."""

    def __init__(self, references: dict[tuple[int, ...], list[int]], k: int) -> None:
        self.references, self.k, self.calls = references, k, 0

    def propose(self, token_ids: list[int]) -> list[int]:
        for prompt, ref in self.references.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                j = len(token_ids) - len(prompt)
                self.calls += 1
                drafts = ref[j : j + self.k]
                return [(t + 1) % 2048 if (self.calls + i) % 3 == 0 else t for i, t in enumerate(drafts)]
        return []


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    base = [torch.randint(3, 2048, (int(torch.randint(6, 40, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)]
    return [b * 2 if i % 2 else b for i, b in enumerate(base)]  # some repeat: the n-gram proposer fires


def _llm(model, spec=None, dtype="float32"):
    from servinglab.engine.llm import LLM

    return LLM(model_obj=model, hf_config=tiny_llama_config(**CONFIG), dtype=dtype, device="cuda", max_num_seqs=16,
               num_kv_blocks=256, max_model_len=512, speculative_config=spec)


def _run(dtype: str, spec_of):
    model = random_model(tiny_llama_config(**CONFIG), dtype=getattr(torch, dtype), seed=2)
    prompts = _prompts(10)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in _llm(model, dtype=dtype).generate(prompts, params, use_tqdm=False)]
    spec_llm = _llm(model, spec_of(prompts, plain), dtype)
    spec = [o.outputs[0].token_ids for o in spec_llm.generate(prompts, params, use_tqdm=False)]
    return model, prompts, plain, spec, spec_llm


SPECS = {
    "ngram": lambda prompts, plain: {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False},
    "oracle": lambda prompts, plain: {"method": "custom", "num_speculative_tokens": 3, "adaptive": False,
                                      "proposer": OracleProposer({tuple(p): r for p, r in zip(prompts, plain)}, 3)},
    # the early exit drafts inside the engine: its k steps replay graphs of its 2 layers (draft_runner.py)
    "draft": lambda prompts, plain: {"method": "draft", "num_speculative_tokens": 3, "draft_num_layers": 2, "adaptive": False},
}


@pytest.mark.parametrize("name", list(SPECS))
def test_gpu_greedy_speculation_is_plain_greedy_in_float32(name):
    _, _, plain, spec, llm = _run("float32", SPECS[name])
    assert spec == plain
    assert llm.engine.runner.num_verify_graph_steps > 0, "verification should replay CUDA graphs"
    stats = llm.engine.spec_decoder.stats
    if name == "draft":  # a random model's early exit may agree with the full model rarely or never
        assert stats.num_draft_tokens > 0
        assert llm.engine.runner.drafter.num_graph_steps > 0 and not hasattr(llm.engine.spec_decoder, "draft_model")
    else:
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_gpu_bf16_divergences_are_near_ties():
    model, prompts, plain, spec, _ = _run("bfloat16", SPECS["oracle"])
    reference = to_transformers(model, torch.float32).eval()
    report = []
    for prompt, a, b in zip(prompts, plain, spec):
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            continue
        with torch.inference_mode():
            logits = reference(torch.tensor([prompt + a[:i]])).logits[0, -1].float()
        best = float(logits.max())
        behind = max(best - float(logits[a[i]]), best - float(logits[b[i]]))
        report.append((i, round(behind, 3)))
        assert behind <= NEAR_TIE, f"plain and speculative bf16 diverge at token {i}, {behind:.3f} from a tie"
    print(f"bf16 speculative vs plain: {len(prompts) - len(report)}/{len(prompts)} identical; divergences {report}")


@pytest.mark.parametrize("with_probs", [False, True])
def test_gpu_rejection_sampler_keeps_the_target_law(with_probs):
    spec = impl.load_part("speculative", "solutions")
    n, p = 20_000, torch.tensor([0.30, 0.25, 0.20, 0.15, 0.08, 0.02])
    q = torch.tensor([0.01, 0.01, 0.01, 0.01, 0.06, 0.90])
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.multinomial(q.cuda().expand(n * 2, -1), 1, replacement=True, generator=gen).view(n, 2)
    if not with_probs:
        ids = torch.tensor([0, 5, 3], device="cuda").repeat(n)[: n * 2].view(n, 2)
    target = p.cuda().expand(n, 3, -1).contiguous()
    out, _ = spec.rejection_sample(ids, q.cuda().expand(n, 2, -1).contiguous() if with_probs else None, target, gen)
    counts = torch.bincount(out[:, 0].cpu(), minlength=6).double()
    expected = p.double() / p.double().sum() * counts.sum()  # sums must agree exactly (float32 p sums to 1 + 2e-8)
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3

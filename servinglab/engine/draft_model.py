"""Draft models and transformers adapters for speculative decoding outside the paged engine.

``build_draft_model(target, L)`` returns the target's first ``L`` decoder layers followed by
its own final RMSNorm and (tied) LM head: an *early exit* of the target, used as the
draft (self-speculative decoding: Zhang et al., "Draft & Verify", ACL 2024; Elhoushi et
al., "LayerSkip", ACL 2024). Every module is shared with the target, so the draft adds
no memory for weights, has the target's tokenizer and vocabulary by construction, and
its K/V for layers ``0..L-1`` are exactly the target's own for the same tokens (a
paged engine could reuse them instead of keeping a second cache).

``scripts/draft_model_study.py`` measures acceptance and cost against ``L`` for
SmolLM2-135M-Instruct and explains which ``L`` (if any) pays off.

:func:`cached_logits_fn` wraps a transformers model as the ``token ids -> logits`` callable
that Part 5's batch-1 loop calls, with a KV cache that is rolled back to the common prefix
on every call: the same rollback of rejected draft slots a paged engine does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from servinglab.engine.spec_config import SpeculativeConfig
from servinglab.engine.step_protocol import EngineHost


def build_draft_model(target_hf_model: nn.Module, num_layers: int) -> nn.Module:
    """The target's first ``num_layers`` layers + its final norm + its LM head, weights shared.

    Args:
        target_hf_model: a transformers Llama-family causal LM (``.model.layers``,
            ``.model.norm``, ``.model.embed_tokens``, ``.model.rotary_emb``, ``.lm_head``).
        num_layers: decoder layers the draft keeps, ``1 <= num_layers <`` the target's.

    Returns:
        A model of the target's class (``forward``, ``generate`` and its KV cache work as
        usual) whose parameters are the target's own tensors: nothing is copied.
    """
    total = len(target_hf_model.model.layers)
    if not isinstance(num_layers, int) or not 1 <= num_layers < total:
        raise ValueError(f"num_layers must be an integer in [1, {total - 1}] (the target has {total} layers), got {num_layers!r}")
    config = copy.deepcopy(target_hf_model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:num_layers])
    with torch.device("meta"):  # no time or memory spent on weights that are replaced below
        draft = type(target_hf_model)(config)
    inner, source = draft.model, target_hf_model.model
    inner.embed_tokens = source.embed_tokens
    inner.layers = nn.ModuleList(list(source.layers[:num_layers]))
    inner.norm = source.norm
    inner.rotary_emb = source.rotary_emb
    draft.lm_head = target_hf_model.lm_head
    left = [name for name, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"draft model has unshared tensors left on the meta device: {left}")
    return draft.eval()


def cached_logits_fn(model: nn.Module) -> Callable[[list[int]], torch.Tensor]:
    """``token ids -> logits [n, V]`` (fp32) for the trailing ``n`` positions, with a KV cache.

    Each call reuses the cache for the longest prefix it shares with the previous call and
    runs the model only on the rest (``n = len(ids) - shared``, at least 1). Cache entries
    past the shared prefix (rejected drafts) are cropped first. Speculative decoding calls
    the target on ``tokens + drafts`` and reads the last ``len(drafts) + 1`` rows, which are
    always new: the token after the accepted drafts differs from the rejected draft, or is
    the bonus token.
    """
    state: dict[str, object] = {"ids": [], "cache": None}

    @torch.inference_mode()
    def fn(token_ids: list[int]) -> torch.Tensor:
        ids, old = list(token_ids), state["ids"]
        shared = 0
        while shared < min(len(old), len(ids) - 1) and old[shared] == ids[shared]:
            shared += 1
        cache = state["cache"]
        if cache is not None and shared > 0:
            drop = cache.get_seq_length() - shared
            if drop > 0:
                cache.crop(-drop)  # roll back K/V of tokens that are no longer in the sequence
        else:
            cache, shared = None, 0
        device = next(model.parameters()).device  # the model's device, CPU or GPU (the draft method on CUDA)
        out = model(torch.tensor([ids[shared:]], device=device), past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(shared, len(ids), device=device).unsqueeze(0))
        state["ids"], state["cache"] = ids, out.past_key_values
        return out.logits[0].float()

    return fn


def early_exit_layers(value: object, total: int) -> int:
    """The early exit's layer count: ``speculative_config["draft_num_layers"]`` (``None``: a quarter of ``total``).

    Raises:
        ValueError: naming ``draft_num_layers`` unless it is an integer in ``[1, total - 1]``.
    """
    layers = value if value is not None else max(1, total // 4)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers < total:
        raise ValueError(f"speculative_config['draft_num_layers'] must be an integer in [1, {total - 1}], got {layers!r}")
    return layers


def draft_for_engine(cfg: SpeculativeConfig, engine: EngineHost) -> nn.Module:
    """The ``draft`` method's model: an early exit of the engine's target (weights copied once
    into transformers), or ``cfg.model`` (a folder or a transformers model of the same vocabulary)."""
    target_vocab = engine.hf_config.vocab_size
    if cfg.model is not None:
        draft = cfg.model
        if isinstance(draft, str):
            from transformers import AutoModelForCausalLM

            draft = AutoModelForCausalLM.from_pretrained(draft, dtype=engine.config.torch_dtype).to(engine.device)
        vocab = getattr(getattr(draft, "config", None), "vocab_size", None)
        if vocab != target_vocab:
            raise ValueError(f"speculative_config['model'] has vocab_size {vocab}, the target has {target_vocab}: "
                             "rejection sampling compares the two distributions token by token")
        return draft.eval()
    from servinglab.model.weights import to_transformers  # imported here: only the draft method needs it

    layers = early_exit_layers(cfg.draft_num_layers, engine.hf_config.num_hidden_layers)
    hf = to_transformers(engine.model)
    hf.set_attn_implementation("sdpa")  # the oracle's eager attention is the slow path
    return build_draft_model(hf, layers)

"""All four added methods through the same machinery: training, parameter counts, no stacking, unload.

The Lightning side (PEFTCallback, adapter-only checkpoints, exact resume) is in test_methods_lightning.py."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from test_bitfit import biased_llama

from lightning_peft import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    count_parameters,
    format_trainable_parameters,
    get_peft_model,
    inject_adapter,
    remove_adapter,
)

P = 4
CONFIGS = {
    "adapter_pfeiffer": lambda: AdapterConfig(placement="pfeiffer", reduction_factor=8),
    "adapter_houlsby": lambda: AdapterConfig(placement="houlsby", bottleneck_size=6),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=P),
    "prefix_projection": lambda: PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="SAMPLE_VOCAB"),
    "bitfit": lambda: BitFitConfig(),
    "ia3": lambda: IA3Config(),  # peft's default targets for each model type
}
MODELS = {"llama_gqa": lambda: tiny_llama(kv_heads=2), "llama_bias": biased_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def expected_trainable(method: str, model: torch.nn.Module) -> int:
    """The adapter's size from the method's definition and the model's shape, computed independently."""
    cfg = model.config
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    kv = d // cfg.num_attention_heads * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if method == "adapter_pfeiffer":
        b = d // 8
        return layers * (2 * d * b + b + d)
    if method == "adapter_houlsby":
        return 2 * layers * (2 * d * 6 + 6 + d)
    if method == "prefix":
        return P * layers * 2 * kv
    if method == "prefix_projection":
        return P * kv + (kv * 16 + 16) + (16 * layers * 2 * kv + layers * 2 * kv)
    if method == "prompt":
        return P * d
    if method == "ia3":  # an output vector per key/value (GPT-2: fused qkv) target, an input vector per feed-forward one
        inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
        per_layer = {"llama": 2 * kv + inner, "gpt2": 3 * d + inner, "bert": 3 * d + inner}[cfg.model_type]
        return layers * per_layer
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))


CASES = [(m, k) for m in CONFIGS for k in ("llama_gqa", "gpt2", "bert") if m != "bitfit"] + [("bitfit", k) for k in ("llama_bias", "gpt2", "bert")]


@pytest.mark.parametrize("method, kind", CASES)
def test_forward_backward_training_and_trainable_count(method, kind):
    base = MODELS[kind]()
    expected = expected_trainable(method, base)
    _, base_total = count_parameters(base)
    head = ["classifier"] if kind == "bert" else None
    config = CONFIGS[method]()
    config.modules_to_save = head
    model = get_peft_model(copy.deepcopy(base), config).train()
    head_size = sum(p.numel() for p in base.classifier.parameters()) if head else 0
    head_bias = base.classifier.bias.numel() if head and method == "bitfit" else 0  # counted once
    trainable, total = count_parameters(model)
    assert trainable == expected + head_size - head_bias
    added = 0 if method == "bitfit" else expected
    assert total == base_total + added
    line = format_trainable_parameters(model)
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1]) if kind == "bert" else x
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad) or method == "bitfit"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ---- one method per model ------------------------------------------------------------------------

ALL = dict(CONFIGS, lora=lambda: LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("second", ["adapter_pfeiffer", "prefix", "prompt", "bitfit", "lora"])
@pytest.mark.parametrize("first", ["adapter_pfeiffer", "prefix", "prompt", "bitfit", "lora"])
def test_a_second_method_is_refused_and_the_model_left_alone(first, second):
    model = biased_llama()
    inject_adapter(model, ALL[first]())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_type = ALL[first]().peft_type
    with pytest.raises(ValueError, match=rf"already has adapter layers injected \({peft_type} .*does not combine"):
        inject_adapter(model, ALL[second]())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


class Holder(torch.nn.Module):
    """Like a LightningModule that holds the transformers model as ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = biased_llama()


@pytest.mark.parametrize("first", ["bitfit", "prefix", "adapter_pfeiffer"])
def test_stacking_is_refused_across_nesting_levels(first):
    """A module adapted as a whole, then the model inside it (and the other way round)."""
    outer = Holder()
    inject_adapter(outer, ALL[first]())
    with pytest.raises(ValueError, match=rf"already has adapter layers injected \({ALL[first]().peft_type}"):
        inject_adapter(outer.model, LoraConfig(r=2, target_modules=["q_proj"]))
    outer = Holder()
    inject_adapter(outer.model, ALL[first]())
    with pytest.raises(ValueError, match=rf"already has adapter layers injected \({ALL[first]().peft_type} on model"):
        inject_adapter(outer, LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_remove_adapter_gives_back_the_base_model(method):
    base = biased_llama()
    model = copy.deepcopy(base)
    inject_adapter(model, CONFIGS[method]())
    remove_adapter(model, restore_requires_grad=True)
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model.model._forward_pre_hooks
    x = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, rtol=0, atol=0)
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))  # a new method is accepted again

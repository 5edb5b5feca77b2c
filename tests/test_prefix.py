"""Prefix tuning specifics: GQA cache layout, masks and positions, disable/copy/inference, errors.

(Equality with peft's outputs, gradients, generation and files is in test_prefix_prompt_vs_peft.py.)
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import VOCAB, logits_alone_and_right_padded, random_ids, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers import DynamicCache, T5Config, T5ForConditionalGeneration

import lightning_peft
from lightning_peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model, inject_adapter

P = 3


ids = random_ids


def test_gqa_prefix_has_the_key_value_width_and_lands_in_every_layer():
    model = get_peft_model(tiny_llama(kv_heads=2), PrefixTuningConfig(num_virtual_tokens=P))
    table = model.base_model.model.prompt_encoder.embedding.weight
    assert table.shape == (P, 2 * 2 * 2 * 16)  # layers x (key, value) x kv_heads x head_dim; hidden is 4 x 16
    out = model(input_ids=ids(), use_cache=True)
    for layer in range(2):
        keys, values = out.cache.layers[layer].keys, out.cache.layers[layer].values
        assert keys.shape == values.shape == (2, 2, P + 6, 16)  # (B, kv_heads, P + T, head_dim)
        flat = table.view(P, 4, 2, 16)  # peft's layout: layer-major, key then value
        torch.testing.assert_close(keys[0, :, :P], flat[:, 2 * layer].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(values[1, :, :P], flat[:, 2 * layer + 1].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_padding_is_masked_and_the_prefix_is_attended(factory):
    """A right-padded row gives, at its real positions, what the unpadded shorter row gives."""
    base = factory()
    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=P)).eval()
    x = ids(1, (1, 6))
    short, long = logits_alone_and_right_padded(model, x, pad=3)
    with torch.no_grad():
        plain = base(input_ids=x).logits
    torch.testing.assert_close(long if short.dim() == 2 else long[:, :6], short, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(short, plain, atol=1e-3)  # the prefix changes the result


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_explicit_position_ids_mean_the_same_as_none(factory):
    """Positions are given for the real tokens; the hook shifts them past the prefix, as the model does itself."""
    model = get_peft_model(factory(), PrefixTuningConfig(num_virtual_tokens=P)).eval()
    x = ids(2)
    with torch.no_grad():
        implicit = model(input_ids=x).logits
        explicit = model(input_ids=x, position_ids=torch.arange(6).unsqueeze(0)).logits
    torch.testing.assert_close(explicit, implicit, rtol=1e-6, atol=1e-6)


def test_disable_adapter_and_deep_copies_are_independent():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=P)).eval()
    x = ids(3)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, rtol=0, atol=0)
        twin = copy.deepcopy(model)
        twin.base_model.model.prompt_encoder.embedding.weight.mul_(2)  # the copy's own prefix
        torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=0, atol=0)
        assert not torch.allclose(twin(input_ids=x).logits, adapted)


def test_zero_init_and_inference_mode():
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P, init_weights="zero"))
    assert not model.base_model.model.prompt_encoder.embedding.weight.any()
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, init_weights="zero"))
    assert not model.base_model.model.prompt_encoder.transform[-1].weight.any()
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P, inference_mode=True))
    assert model.get_nb_trainable_parameters()[0] == 0


def test_in_place_injection_into_a_module_that_holds_the_model():
    """What PEFTCallback(model_attr=None) does: the transformers model is found inside the module."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_gpt2()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids=x, labels=x).loss

    holder = Holder()
    reference = get_peft_model(copy.deepcopy(holder.net), PrefixTuningConfig(num_virtual_tokens=P))
    inject_adapter(holder, PrefixTuningConfig(num_virtual_tokens=P))
    assert [n for n, p in holder.named_parameters() if p.requires_grad] == ["net.transformer.prompt_encoder.embedding.weight"]
    holder.load_state_dict({"net." + k: v for k, v in reference.base_model.state_dict().items()})
    x = ids(4)
    torch.testing.assert_close(holder(x), reference(input_ids=x, labels=x).loss, rtol=0, atol=0)


def test_a_peft_file_of_a_projected_prefix_runs_but_cannot_resume_training(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True))
    theirs.save_pretrained(str(tmp_path))
    x = ids(5)
    loaded = lightning_peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, theirs.eval()(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match=r"prefix_projection=True.*load it with is_trainable=False"):
        lightning_peft.PeftModel.from_pretrained(fresh, str(tmp_path), is_trainable=True)
    assert lightning_peft.get_tuner(fresh) is None and not hasattr(fresh.model, "prompt_encoder")


def test_a_legacy_tuple_cache_is_refused_clearly():
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(TypeError, match="need a transformers Cache object"):
        model(input_ids=ids(), past_key_values=((torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)),))
    cache = DynamicCache()
    model(input_ids=ids(), cache=cache, use_cache=True)  # a Cache object is fine
    assert cache.get_seq_length() == P + 6


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_gradient_checkpointing_is_refused_clearly_and_prompt_tuning_supports_it(factory):
    """transformers drops the KV cache inside checkpointed layers, so the prefixes would silently vanish."""
    model = get_peft_model(factory(), PrefixTuningConfig(num_virtual_tokens=P)).train()
    model.base_model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match=r"through the KV cache, which transformers drops .*gradient_checkpointing_disable"):
        model(input_ids=ids(), labels=ids())
    model.eval()
    with torch.no_grad():
        model(input_ids=ids())  # evaluation: no replay, the cache is kept
    base = factory()
    plain = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=P)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.base_model.gradient_checkpointing_enable()
    losses = [m(input_ids=ids(), labels=ids()).loss for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = [prompt.grad for m in (plain, checkpointed) for n, prompt in m.named_parameters() if "prompt_encoder" in n]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


class NoCacheLM(nn.Module):
    """Looks like a transformers model (config, input embeddings) but takes no KV cache."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 8})()
        self.embed = nn.Embedding(10, 8)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=VOCAB))


@pytest.mark.parametrize("config_cls", [PrefixTuningConfig, PromptTuningConfig])
@pytest.mark.parametrize(
    "factory, kwargs, error, message",
    [
        (tiny_llama, {"num_virtual_tokens": 0}, ValueError, r"num_virtual_tokens must be a positive integer .*got 0"),
        (tiny_llama, {"num_virtual_tokens": -2}, ValueError, r"num_virtual_tokens must be a positive integer .*got -2"),
        (tiny_llama, {"num_virtual_tokens": None}, ValueError, r"num_virtual_tokens must be a positive integer .*got None"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), {}, TypeError, r"works on transformers models .*Sequential contains none"),
        (tiny_t5, {}, TypeError, r"T5ForConditionalGeneration is an encoder-decoder model"),
        (tiny_llama, {"token_dim": 100}, ValueError, r"token_dim=100 does not fit this model, whose .* is 64"),
    ],
)
def test_bad_input_clear_error_and_model_untouched(config_cls, factory, kwargs, error, message):
    model = factory()
    state = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        get_peft_model(model, config_cls(**{"num_virtual_tokens": P, **kwargs}))
    assert model.state_dict().keys() == state.keys()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_model_whose_attention_cannot_be_hooked_is_named():
    model = NoCacheLM()
    with pytest.raises(TypeError, match=r"neither NoCacheLM\.forward nor its backbone's forward takes a cache.*cannot be hooked"):
        get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(TypeError, match=r"NoCacheLM does not take inputs_embeds.*cannot be hooked"):
        get_peft_model(model, PromptTuningConfig(num_virtual_tokens=P))
    assert not hasattr(model, "prompt_encoder") and not model._forward_pre_hooks


@pytest.mark.parametrize("config_cls", [PrefixTuningConfig, PromptTuningConfig])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_left_padded_batch_generation_equals_one_row_at_a_time(factory, config_cls):
    """generate() positions come from the attention mask; the virtual tokens shift them, padding does not."""
    model = get_peft_model(factory(), config_cls(num_virtual_tokens=P))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    model.eval()
    short, long = ids(6, (1, 3)).clamp(min=1), ids(7, (1, 6)).clamp(min=1)
    alone = [model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0)[:, x.shape[1]:]
             for x in (short, long)]
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1), long))
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()  # the short row is left-padded
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, 6:]
    assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])

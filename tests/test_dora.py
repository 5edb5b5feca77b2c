"""DoRA against peft itself (copied weights, fp64): outputs, gradients, merging, files both ways, refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import MODEL_FACTORIES, assert_merge_round_trip, assert_outputs_and_grads_match, peft_key, random_ids, tiny_llama

from lightning_peft import LoraConfig, PeftModel, get_peft_model
from lightning_peft.tuners.dora import DoraLinear


def twins(kind: str, **kwargs):
    factory, targets = MODEL_FACTORIES[kind]
    base = factory()
    settings = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=True, **kwargs)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.base_model.named_parameters():
            if ".lora_" in name:
                their_params[peft_key(name)].copy_(param)
    return base, ours, theirs


@pytest.mark.parametrize("kind", list(MODEL_FACTORIES))
def test_outputs_and_gradients_match_peft_in_float64(kind):
    _, ours, theirs = twins(kind)
    ours.double().train()
    theirs.double().train()
    ids = random_ids(1)
    names = assert_outputs_and_grads_match(ours, theirs, lambda m: m(input_ids=ids).logits, peft_key, rtol=1e-9, atol=1e-10)
    assert any(n.endswith("lora_magnitude_vector") for n in names)


def test_the_row_norms_equal_the_materialised_ones_and_init_is_the_base():
    base, ours, _ = twins("llama_gqa")
    for layer in (m for m in ours.modules() if isinstance(m, DoraLinear)):
        full = layer.base_weight() + layer.scaling["default"] * layer.lora_B.default.weight @ layer.lora_A.default.weight  # [out, in]
        torch.testing.assert_close(layer.row_norms(), torch.linalg.norm(full, dim=1), rtol=1e-5, atol=1e-6)
    fresh = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    ids = random_ids(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload(kind):
    _, ours, _ = twins(kind)
    ours.double().eval()
    assert_merge_round_trip(ours, random_ids(3), rtol=1e-10, atol=1e-10, weight_tol=1e-10)


def test_files_load_both_ways(tmp_path):
    base, ours, theirs = twins("llama")
    ours.eval()
    ids = random_ids(4)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    here = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(here(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_dora_on_an_embedding_is_refused_and_the_model_untouched():
    model = tiny_llama()
    with pytest.raises(ValueError, match="use_dora=True adapts linear layers, but .*embed_tokens is a Embedding"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear

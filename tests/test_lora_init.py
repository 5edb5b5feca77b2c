"""PiSSA / OLoRA initialisation against peft: the same factors and residual weights, files, conversion, errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import random_ids, tiny_gpt2, tiny_llama

from lightning_peft import LoraConfig, PeftModel, get_peft_model
from lightning_peft.tuners.lora import LoraLinear

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _layers(model) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.base_model.named_modules() if isinstance(m, LoraLinear)}


def _assert_loads_in_both_onto(base, directory, ids, expected) -> None:
    """The adapter directory, loaded by peft and by us onto copies of ``base``, gives ``expected`` logits."""
    for loader in (peft.PeftModel.from_pretrained, PeftModel.from_pretrained):
        model = loader(copy.deepcopy(base), str(directory))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def _train(model, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = random_ids(7)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_weights_equal_peft(init):
    base = tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    their_params = dict(theirs.named_parameters())
    for name, layer in _layers(ours).items():
        for ours_param, suffix in ((layer.lora_A.default.weight, "lora_A.default.weight"), (layer.lora_B.default.weight, "lora_B.default.weight"),
                                   (layer.weight, "base_layer.weight")):
            torch.testing.assert_close(ours_param, their_params[f"base_model.model.{name}.{suffix}"], rtol=1e-5, atol=1e-6)
    ids = random_ids(1)
    with torch.no_grad():  # the adapted model starts as the base model
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_pissa_on_gpt2_conv1d_from_scratch_in_float64():
    """GPT-2 stores [in, out]: the factors come from the [out, in] matrix. (peft 0.21 leaves A [r, out] here.)"""
    base = tiny_gpt2().double()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], init_lora_weights="pissa"))
    for name, layer in _layers(ours).items():
        w = base.get_submodule(name).weight.t()  # [out, in]
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:3] / layer.scaling["default"])
        torch.testing.assert_close(layer.lora_A.default.weight.abs(), (root[:, None] * vh[:3]).abs())  # up to singular-vector signs
        torch.testing.assert_close(layer.lora_B.default.weight @ layer.lora_A.default.weight, (u[:, :3] * root) @ (root[:, None] * vh[:3]))
        torch.testing.assert_close(layer.weight.t() + layer.scaling["default"] * layer.lora_B.default.weight @ layer.lora_A.default.weight, w)


def test_pissa_niter_is_a_randomized_pissa():
    """It keeps W = W_res + s·B A, and its rank-r part is nearly as good as the exact SVD's."""
    base = tiny_llama()
    fast = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_16"))
    for name, layer in _layers(fast).items():
        w = base.get_submodule(name).weight
        low_rank = layer.scaling["default"] * layer.lora_B.default.weight @ layer.lora_A.default.weight
        torch.testing.assert_close(layer.weight + low_rank, w, rtol=1e-5, atol=1e-5)
        best = torch.linalg.svdvals(w)[4:].square().sum().sqrt()  # the optimal rank-4 residual (Eckart-Young)
        assert torch.linalg.norm(w - low_rank) <= 1.05 * best


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_converts_to_a_plain_lora_of_the_original_weights_that_peft_loads(init, tmp_path):
    base = tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    _train(ours)
    ids = random_ids(2)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "unused"))
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "plain"))
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)
    _assert_loads_in_both_onto(base, tmp_path / "plain", ids, expected)  # the ORIGINAL base


def test_an_unconverted_pissa_file_loads_both_ways_onto_the_original_base(tmp_path):
    """The file says init_lora_weights='pissa': loading redoes the (deterministic) SVD on the original weights."""
    base = tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    _train(ours)
    ids = random_ids(3)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path)
    _assert_loads_in_both_onto(base, tmp_path, ids, expected)


def test_merge_and_unload_gives_the_trained_full_weights():
    base = tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="olora"))
    _train(ours)
    ids = random_ids(4)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_refusals_leave_the_model_untouched(tmp_path):
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="initialises from the weight of linear layers.*embed_tokens is a Embedding"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="modules_to_save"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa", modules_to_save=["nope"]))
    with pytest.raises(ValueError, match="init_lora_weights must be True, False, 'gaussian', 'pissa'"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_x"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fast = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"))
    with pytest.raises(ValueError, match="randomized SVD.*path_initial_model_for_weight_conversion"):
        fast.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only adapters initialised with PiSSA / OLoRA convert"):
        plain.save_pretrained(tmp_path / "b", path_initial_model_for_weight_conversion=str(tmp_path / "x"))

"""LoRA against HF peft itself: same base weights, same adapter weights copied over, same results."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import MODEL_FACTORIES, VOCAB, reference_llama, tiny_llama

from lightning_peft import LoraConfig, get_peft_model


def copy_lora_weights(ours, theirs) -> int:
    """Copy our lora_A/lora_B into peft's ``<name>.lora_A.default.weight``; returns how many."""
    their_params = dict(theirs.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in ours.base_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                key = "base_model.model." + name  # our keys carry the adapter name as peft's do
                their_params[key].copy_(param)
                copied += 1
    return copied


def twin_models(kind: str, **lora_kwargs):
    factory, targets = MODEL_FACTORIES[kind]
    base = factory()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=targets, init_lora_weights=False, **lora_kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, init_lora_weights=False, **lora_kwargs))
    assert copy_lora_weights(ours, theirs) > 0
    return ours, theirs


def run(model, embeds):
    out = model(inputs_embeds=embeds)
    return out.logits


@pytest.mark.parametrize("kind", list(MODEL_FACTORIES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_gradients_match_peft(kind, use_rslora):
    """float64, so any difference beyond rounding is a real disagreement."""
    ours, theirs = twin_models(kind, r=4, lora_alpha=12, lora_dropout=0.0, use_rslora=use_rslora)
    ours.double().train()
    theirs.double().train()
    torch.manual_seed(1)
    embeds = torch.randn(2, 7, ours.base_model.config.hidden_size, dtype=torch.float64)
    e_ours, e_theirs = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    y_ours, y_theirs = run(ours, e_ours), run(theirs, e_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(y_ours)
    y_ours.backward(grad_out)
    y_theirs.backward(grad_out)
    torch.testing.assert_close(e_ours.grad, e_theirs.grad, rtol=1e-10, atol=1e-10)
    their_params = dict(theirs.named_parameters())
    checked = 0
    for name, param in ours.base_model.named_parameters():
        if param.requires_grad:
            key = "base_model.model." + name  # our keys carry the adapter name as peft's do
            torch.testing.assert_close(param.grad, their_params[key].grad, rtol=1e-10, atol=1e-10)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], "all-linear", r".*\.layers\.1\..*_proj", ["k_proj"]]
)
def test_print_trainable_parameters_is_peft_line(targets, capsys):
    base = tiny_llama()
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=32, target_modules=targets)).print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=32, target_modules=targets)).print_trainable_parameters()
    assert capsys.readouterr().out.strip() == theirs


def test_readme_snippet_on_reference_llama(capsys):
    """The source material's snippet, with only the import changed, prints peft's exact line."""
    model = reference_llama()
    lora_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora_config)
    peft_model.print_trainable_parameters()
    ours = capsys.readouterr().out.strip()
    theirs_model = peft.get_peft_model(reference_llama(), peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    theirs_model.print_trainable_parameters()
    assert ours == capsys.readouterr().out.strip()
    assert ours.startswith("trainable params: 65,536 || all params: 16,912,896")


def trainable_names_ours(model):
    return {n for n, p in model.base_model.named_parameters() if p.requires_grad}


def trainable_names_peft(model):
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".base_layer.", ".")
            names.add(n.replace("modules_to_save.default.", ""))  # peft's copy of a module_to_save; ours trains it in place
    return names


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_bias_modes_train_what_peft_trains(kind, bias):
    factory, targets = MODEL_FACTORIES[kind]
    ours = get_peft_model(factory(), LoraConfig(target_modules=targets, bias=bias))
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(target_modules=targets, bias=bias))
    assert trainable_names_ours(ours) == trainable_names_peft(theirs)
    if bias != "none":  # and the biases really train: a step changes them
        layer_bias = next(p for n, p in ours.base_model.named_parameters() if n.endswith("bias") and p.requires_grad)
        before = layer_bias.detach().clone()
        opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
        ids = torch.randint(0, VOCAB, (2, 6))
        out = ours(input_ids=ids)
        out.logits.square().mean().backward()
        opt.step()
        assert not torch.equal(before, layer_bias.detach())


def test_modules_to_save_trains_the_head_like_peft():
    factory, targets = MODEL_FACTORIES["bert"]
    ours = get_peft_model(factory(), LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert trainable_names_ours(ours) == trainable_names_peft(theirs)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


def test_all_linear_targets_what_peft_targets_on_llama():
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules="all-linear"))
    assert trainable_names_ours(ours) == trainable_names_peft(theirs)
    assert not any("lm_head" in n for n in trainable_names_ours(ours))


def test_layers_to_transform_matches_peft():
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert trainable_names_ours(ours) == trainable_names_peft(theirs)
    assert all(".layers.1." in n for n in trainable_names_ours(ours))


def test_dropout_statistics_on_a_model():
    """With dropout, training outputs vary by mask key; eval output is deterministic and mask-free."""
    ours, _ = twin_models("llama", r=4, lora_alpha=8, lora_dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 8))
    ours.train()
    first = ours(input_ids=ids).logits  # the root pre-hook advances the mask offsets each forward
    second = ours(input_ids=ids).logits
    assert not torch.allclose(first, second)
    ours.eval()
    torch.testing.assert_close(ours(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)

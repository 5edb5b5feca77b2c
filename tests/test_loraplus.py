"""LoRA+ against peft's create_loraplus_optimizer: the same parameters in the same groups with the same settings."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import tiny_bert, tiny_llama
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

from lightning_peft import BitFitConfig, LoraConfig, create_loraplus_optimizer, get_peft_model


def _peft_name(name: str) -> str:
    """Our parameter name -> peft's (adapter name inserted, modules_to_save copies, base_layer)."""
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            return "base_model.model." + name.replace(part + "weight", part + "default.weight")
    return "base_model.model." + name


def _groups_by_name(optimizer, model, rename=lambda n: n):
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("bias", ["none", "all"])
def test_groups_and_learning_rates_equal_peft(bias):
    base = tiny_bert()
    settings = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias=bias)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.01, betas=(0.8, 0.9))
    our_opt = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    their_opt = peft_loraplus(theirs, torch.optim.AdamW, **kwargs)
    their_groups = _groups_by_name(their_opt, theirs, lambda n: n.replace(".modules_to_save.default.", ".").replace(".base_layer.", "."))
    our_groups = _groups_by_name(our_opt, ours.base_model, _peft_name)
    assert [(lr, wd) for _, lr, wd in our_groups] == [(lr, wd) for _, lr, wd in their_groups]
    for (ours_names, _, _), (their_names, _, _) in zip(our_groups, their_groups):
        assert ours_names == their_names
    assert our_opt.defaults["betas"] == (0.8, 0.9) and our_groups[2][1] == pytest.approx(8e-3)
    assert any(".lora_B." in n for n in our_groups[2][0]) and all(".lora_A." in n or "classifier" in n for n in our_groups[0][0])


def test_b_moves_ratio_times_faster_than_a_under_sgd():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4.0)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    a0, b0 = layer.lora_A.default.weight.detach().clone(), layer.lora_B.default.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    ga, gb = layer.lora_A.default.weight.grad.clone(), layer.lora_B.default.weight.grad.clone()
    optimizer.step()
    torch.testing.assert_close(layer.lora_A.default.weight, a0 - 0.1 * ga)
    torch.testing.assert_close(layer.lora_B.default.weight, b0 - 0.4 * gb)


@pytest.mark.parametrize("ratio", [0, -1.0, "16"])
def test_bad_ratio_is_refused(ratio):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)


def test_a_model_without_lora_is_refused():
    model = get_peft_model(tiny_bert(), BitFitConfig())
    with pytest.raises(ValueError, match="no trainable LoRA B matrices"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)


def test_the_cli_builds_its_optimizer_with_loraplus_groups(tmp_path, monkeypatch):
    """`lightning-peft fit --optimizer ... --loraplus_lr_ratio 4`: B's group at 4x the learning rate, from YAML-able flags."""
    from lightning_fixtures import load_ckpt

    from lightning_peft.cli import main

    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--model=lightning_fixtures.LlamaModule", "--data=lightning_fixtures.TokensData",
        "--peft=lightning_peft.PEFTCallback", "--peft.model_attr=model",
        "--peft.peft_config=lightning_peft.LoraConfig", "--peft.peft_config.target_modules=[q_proj,v_proj]",
        "--optimizer=torch.optim.AdamW", "--optimizer.lr=0.002", "--optimizer.weight_decay=0.0", "--loraplus_lr_ratio=4",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
    ])
    (ckpt_path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    groups = load_ckpt(ckpt_path)["optimizer_states"][0]["param_groups"]
    assert [(g["lr"], len(g["params"])) for g in groups] == [(0.002, 4), (1e-6, 0), (0.008, 4), (0.008, 0)]  # 2 layers x q, v


def test_the_cli_refuses_a_bad_ratio_before_training(tmp_path, monkeypatch):
    from lightning_peft.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        main([
            "fit", "--model=lightning_fixtures.LlamaModule", "--data=lightning_fixtures.TokensData",
            "--peft=lightning_peft.PEFTCallback", "--peft.model_attr=model",
            "--peft.peft_config=lightning_peft.LoraConfig", "--peft.peft_config.target_modules=[q_proj]",
            "--optimizer=torch.optim.SGD", "--loraplus_lr_ratio=0", "--trainer.max_epochs=1", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ])

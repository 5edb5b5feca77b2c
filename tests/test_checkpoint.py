"""Adapter-only checkpoints: contents, size, config record, loading without a Trainer, validation on resume."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fixtures import LlamaModule, TokensData, load_ckpt, trainer_kwargs
from lightning_peft import (
    LoraConfig,
    LoraLinear,
    PEFTCallback,
    adapter_state_dict,
    get_tuner,
    load_peft_checkpoint,
)
from lightning_peft.checkpoint import read_checkpoint_metadata
from models import reference_llama, tiny_llama

CFG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def _train(tmp_path, module, config=CFG, weights_only=False, epochs=1, ckpt_path=None, **kwargs):
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_weights_only=weights_only)
    callbacks = [PEFTCallback(config, model_attr="model", **kwargs.pop("peft_kwargs", {})), ckpt]
    callbacks += kwargs.pop("extra_callbacks", [])
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, callbacks=callbacks, **kwargs))
    trainer.fit(module, datamodule=TokensData(), ckpt_path=ckpt_path)
    return trainer, ckpt


@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "weights_only"])
def test_checkpoint_holds_only_the_adapter_and_its_config(tmp_path, weights_only):
    module = LlamaModule()
    _, ckpt_cb = _train(tmp_path, module, weights_only=weights_only)
    ckpt = load_ckpt(ckpt_cb.last_model_path)

    expected = {"model." + k: v for k, v in adapter_state_dict(module.model).items()}
    assert set(ckpt["state_dict"]) == set(expected)
    assert any(k.startswith("model.lm_head.") for k in expected)  # modules_to_save are in
    assert any(k.endswith("lora_rng.default") for k in expected)  # so is the dropout RNG state
    for key, value in expected.items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    meta = ckpt["lightning_peft"]
    assert meta["peft_config"] == CFG.to_dict() and meta["model_attr"] == "model"
    assert meta["adapter_keys"] == sorted(expected)
    if weights_only:
        assert "callbacks" not in ckpt and "optimizer_states" not in ckpt
    else:
        assert ckpt["callbacks"]["PEFTCallback{'model_attr': 'model'}"]["peft_config"] == CFG.to_dict()
        assert len(ckpt["optimizer_states"][0]["state"]) == len([p for p in module.parameters() if p.requires_grad])


def test_adapter_checkpoint_is_under_two_percent_of_the_full_one(tmp_path, capsys):
    """The GUIDE's tiny Llama (16.9M parameters), LoRA r=8 on q,v: adapter-only vs full checkpoint files."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    sizes = {}
    for adapter_only in (True, False):
        out = tmp_path / str(adapter_only)
        weights = ModelCheckpoint(dirpath=out / "weights", save_weights_only=True, every_n_train_steps=1)
        _, full = _train(out, LlamaModule(model=reference_llama(0).train()), config=config, limit_train_batches=1,
                         peft_kwargs={"adapter_only_checkpoints": adapter_only}, extra_callbacks=[weights])
        sizes[adapter_only, False] = os.path.getsize(full.last_model_path)
        sizes[adapter_only, True] = os.path.getsize(weights.best_model_path)
    with capsys.disabled():
        for weights_only in (False, True):
            kind = "weights-only" if weights_only else "full (with optimizer state)"
            adapter, full = sizes[True, weights_only], sizes[False, weights_only]
            print(f"\n{kind} checkpoint: adapter-only {adapter / 1024:.0f} KiB vs full {full / 2**20:.1f} MiB "
                  f"({100 * adapter / full:.2f}%)")
    for weights_only in (False, True):
        assert sizes[True, weights_only] < 0.02 * sizes[False, weights_only]


def test_load_peft_checkpoint_rebuilds_the_trained_model_without_a_trainer(tmp_path):
    module = LlamaModule()
    _, ckpt_cb = _train(tmp_path, module, weights_only=True)
    module.eval()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = module.model(input_ids=tokens).logits

    # a fresh base model (the adapter checkpoint keys lose their "model." prefix)
    base = load_peft_checkpoint(tiny_llama(0), ckpt_cb.last_model_path)
    # or a fresh LightningModule holding one (the adapter goes where the callback put it)
    fresh_module = load_peft_checkpoint(LlamaModule(), ckpt_cb.last_model_path)
    for model in (base, fresh_module.model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=tokens).logits, expected, rtol=0, atol=0)

    trainable = load_peft_checkpoint(tiny_llama(0), ckpt_cb.last_model_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in module.model.named_parameters() if p.requires_grad
    }


def test_load_peft_checkpoint_names_what_does_not_fit_and_leaves_the_model_alone(tmp_path):
    _, ckpt_cb = _train(tmp_path, LlamaModule(), weights_only=True)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model: shape mismatches") as info:
        load_peft_checkpoint(wider, ckpt_cb.last_model_path)
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight: checkpoint (4, 64) vs model (4, 32)" in str(info.value)
    assert get_tuner(wider) is None and not any(isinstance(m, LoraLinear) for m in wider.modules())
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())

    shallower = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=4, vocab_size=128, max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"unexpected keys \[model.layers.1.self_attn.q_proj.lora_A.default.weight"):
        load_peft_checkpoint(shallower, ckpt_cb.last_model_path)

    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tiny_llama(0).state_dict()}, plain)
    with pytest.raises(ValueError, match="not written by a Trainer with PEFTCallback"):
        load_peft_checkpoint(tiny_llama(0), plain)


def test_resuming_with_another_config_or_model_fails_before_anything_is_restored(tmp_path):
    _, ckpt_cb = _train(tmp_path, LlamaModule())
    other = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    module = LlamaModule()
    with pytest.raises(ValueError, match=r"was trained with LoraConfig\(.*r=4.*but this PEFTCallback has LoraConfig\(.*r=2"):
        _train(tmp_path / "other", module, config=other, epochs=2, ckpt_path=ckpt_cb.last_model_path)
    assert all(float(m.lora_rng.default[1]) == 0 for m in module.modules() if isinstance(m, LoraLinear))  # nothing loaded

    ckpt = load_ckpt(ckpt_cb.last_model_path)
    del ckpt["lightning_peft"], ckpt["callbacks"]  # an adapter-less record: the keys decide
    dropped = "model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=rf"missing adapter keys \[{dropped}\]"):
        _train(tmp_path / "broken", LlamaModule(), epochs=2, ckpt_path=tmp_path / "broken.ckpt")


def test_weights_only_checkpoint_cannot_resume_but_validates(tmp_path):
    module = LlamaModule()
    _, ckpt_cb = _train(tmp_path, module, weights_only=True)
    with pytest.raises(ValueError, match="weights-only.*cannot resume"):
        _train(tmp_path / "resume", LlamaModule(), epochs=2, ckpt_path=ckpt_cb.last_model_path)

    # validate with a fresh module + the weights-only adapter checkpoint == validate with the trained module
    seed_everything(0)
    data = TokensData()
    kwargs = trainer_kwargs(tmp_path, limit_val_batches=2)
    trained = Trainer(**kwargs, callbacks=[PEFTCallback(CFG, model_attr="model")]).validate(module, datamodule=data)
    restored = Trainer(**kwargs, callbacks=[PEFTCallback(CFG, model_attr="model")]).validate(
        LlamaModule(), datamodule=data, ckpt_path=ckpt_cb.last_model_path
    )
    assert restored == trained


def test_metadata_is_found_in_the_callback_state_too():
    state = {"callbacks": {"PEFTCallback{'model_attr': None}": {"peft_config": {"peft_type": "LORA"}, "model_attr": None}}}
    assert read_checkpoint_metadata(state)["model_attr"] is None
    assert read_checkpoint_metadata({"state_dict": {}}) is None

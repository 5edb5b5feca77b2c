"""DDP on CPU (gloo, two ``ddp_spawn`` workers): adapter-only checkpoints written once, from rank zero, and exact resume.

With ``ddp_spawn`` the parent's module never sees the workers' adapter, so everything is checked
on the checkpoint files.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fixtures import LlamaModule, TokensData, load_ckpt, trainer_kwargs
from lightning_peft import LoraConfig, PEFTCallback, adapter_state_dict, inject_adapter
from models import tiny_llama

CFG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def _fit_ddp(out, epochs, ckpt_path=None):
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = Trainer(**trainer_kwargs(out, devices=2, strategy="ddp_spawn", max_epochs=epochs,
                                       callbacks=[PEFTCallback(CFG, model_attr="model"), ckpt]))
    trainer.fit(LlamaModule(), datamodule=TokensData(), ckpt_path=ckpt_path)
    return out / "ckpt"


def test_ddp_spawn_writes_one_adapter_only_checkpoint_from_rank_zero_and_resumes_exactly(tmp_path):
    straight = _fit_ddp(tmp_path / "straight", epochs=2)
    assert sorted(os.listdir(straight)) == ["epoch=0.ckpt", "epoch=1.ckpt"]  # one file per save, no temp files

    reference = tiny_llama(0)
    inject_adapter(reference, LoraConfig(**{k: v for k, v in CFG.to_dict().items() if k != "peft_type"}))
    expected_keys = {"model." + k for k in adapter_state_dict(reference)}
    first, last = load_ckpt(straight / "epoch=0.ckpt"), load_ckpt(straight / "epoch=1.ckpt")
    for ckpt in (first, last):
        assert set(ckpt["state_dict"]) == expected_keys
        assert ckpt["lightning_peft"]["peft_config"] == CFG.to_dict()
    assert (first["global_step"], last["global_step"]) == (2, 4)  # 32 samples / (8 per batch x 2 ranks) per epoch
    assert any(not torch.equal(first["state_dict"][k], last["state_dict"][k]) for k in expected_keys if "lora_B" in k)

    resumed = _fit_ddp(tmp_path / "resumed", epochs=2, ckpt_path=straight / "epoch=0.ckpt")
    assert sorted(os.listdir(resumed)) == ["epoch=1.ckpt"]
    again = load_ckpt(resumed / "epoch=1.ckpt")
    assert again["global_step"] == 4
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][key], value, rtol=0, atol=1e-6)

"""The added methods through PEFTCallback: training on an unchanged LightningModule,
adapter-only checkpoints holding exactly the adapter, exact resume on a freshly built base model."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_fixtures import LlamaModule, LossRecorder, TokensData, load_ckpt, trainer_kwargs
from test_bitfit import biased_llama
from test_methods import CONFIGS

from lightning_peft import PEFTCallback, adapter_state_dict, load_peft_checkpoint

# ---- the Lightning callback: adapter-only checkpoints, exact resume ------------------------------

LIGHTNING = {
    "adapter_houlsby": (CONFIGS["adapter_houlsby"], "model"),
    "prefix": (CONFIGS["prefix_projection"], "model"),
    "prompt": (CONFIGS["prompt"], "model"),
    "prompt_whole_module": (CONFIGS["prompt"], None),  # inject into the LightningModule itself
    "bitfit": (CONFIGS["bitfit"], "model"),
    "ia3": (CONFIGS["ia3"], "model"),
}


def _fit(path, config, model_attr, epochs, ckpt_path=None, seed=0):
    seed_everything(seed)
    recorder = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=path, filename="{epoch}", save_top_k=-1)
    callback = PEFTCallback(config(), model_attr=model_attr, verbose=False)
    module = LlamaModule(model=biased_llama(), lr=2e-2)  # a freshly built base model every time
    trainer = Trainer(**trainer_kwargs(path, max_epochs=epochs, callbacks=[callback, ckpt, recorder]))
    trainer.fit(module, datamodule=TokensData(), ckpt_path=ckpt_path)
    return recorder.losses, module


@pytest.mark.parametrize("name", list(LIGHTNING))
def test_lightning_callback_adapter_only_checkpoint_and_exact_resume(tmp_path, name):
    config, model_attr = LIGHTNING[name]
    reference, trained = _fit(tmp_path / "ref", config, model_attr, epochs=2)
    assert sorted(reference) == list(range(1, 9)) and reference[8] < reference[1]
    target = trained.model if model_attr else trained
    prefix = "model." if model_attr else ""
    ckpt = load_ckpt(tmp_path / "ref" / "epoch=1.ckpt")
    # only the adapter is in the checkpoint, and it is exactly what the tuner declares
    assert set(ckpt["state_dict"]) == {prefix + k for k in adapter_state_dict(target)}
    assert ckpt["lightning_peft"]["peft_config"]["peft_type"] == config().peft_type
    assert all(re.search(r"prompt_encoder|adapter_|\.bias$|\.ia3_l$", k) for k in ckpt["state_dict"])

    # the checkpoint alone puts the trained adapter onto a freshly built base model
    fresh = load_peft_checkpoint(LlamaModule(model=biased_llama()), tmp_path / "ref" / "epoch=1.ckpt")
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens), trained.eval()(tokens), rtol=0, atol=0)

    _fit(tmp_path / "a", config, model_attr, epochs=1)
    resumed, _ = _fit(tmp_path / "b", config, model_attr, epochs=2, ckpt_path=tmp_path / "a" / "epoch=0.ckpt", seed=123)
    assert sorted(resumed) == list(range(5, 9))
    torch.testing.assert_close(torch.tensor([resumed[s] for s in range(5, 9)], dtype=torch.float64),
                               torch.tensor([reference[s] for s in range(5, 9)], dtype=torch.float64), rtol=0, atol=1e-6)
    final = load_ckpt(tmp_path / "b" / "epoch=1.ckpt")["state_dict"]
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6)

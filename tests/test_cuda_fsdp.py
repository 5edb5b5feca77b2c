"""FSDP (CUDA only): PEFTCallback with ``FSDPStrategy(state_dict_type="full")`` writes adapter-only checkpoints
and resumes from them exactly enough (GPU: to 1e-5).

One CUDA device runs FSDP in-process (``devices=1``: a 1-rank process group, the model still
wrapped in ``FullyShardedDataParallel``); with two or more, a script is launched the way Lightning's
FSDP launcher wants (it re-runs the script for the other ranks). Everything is checked on the
checkpoint files, against the keys of an independently adapted reference model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_fixtures import load_ckpt
from lightning_peft import LoraConfig, adapter_state_dict, inject_adapter
from models import tiny_llama

CFG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA devices")

SCRIPT = textwrap.dedent(
    """
    import sys
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from lightning_fixtures import LazyLlamaModule, TokensData
    from lightning_peft import LoraConfig, PEFTCallback

    class AssertWrapped(Callback):
        def on_train_start(self, trainer, pl_module):
            assert isinstance(trainer.strategy.model, FullyShardedDataParallel), type(trainer.strategy.model)
            self.checked = True

    def fit(out, devices, epochs, ckpt_path=None):
        seed_everything(0)  # before the model is built and injected: FSDP does not sync module states
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        trainer = Trainer(
            accelerator="cuda", devices=devices, strategy=FSDPStrategy(state_dict_type="full"), max_epochs=epochs,
            default_root_dir=out, logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[PEFTCallback(config, model_attr="model"), AssertWrapped(),
                       ModelCheckpoint(dirpath=out + "/ckpt", filename="{epoch}", save_top_k=-1)],
        )
        trainer.fit(LazyLlamaModule(), datamodule=TokensData(), ckpt_path=ckpt_path)
        return trainer

    if __name__ == "__main__":
        out, devices, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        fit(out, devices, epochs, sys.argv[4] if len(sys.argv) > 4 else None)
    """
)


def _expected_keys() -> set[str]:
    reference = tiny_llama(0)
    inject_adapter(reference, LoraConfig(**{k: v for k, v in CFG.to_dict().items() if k != "peft_type"}))
    return {"model." + k for k in adapter_state_dict(reference)}


def _check(straight_dir, resumed_dir, steps_per_epoch, atol=1e-5):
    assert sorted(os.listdir(straight_dir)) == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert sorted(os.listdir(resumed_dir)) == ["epoch=1.ckpt"]
    expected = _expected_keys()
    first, last = load_ckpt(straight_dir / "epoch=0.ckpt"), load_ckpt(straight_dir / "epoch=1.ckpt")
    again = load_ckpt(resumed_dir / "epoch=1.ckpt")
    for ckpt in (first, last, again):
        assert set(ckpt["state_dict"]) == expected  # only the adapter (+ lm_head, + RNG state), full tensors
        assert ckpt["lightning_peft"]["peft_config"] == CFG.to_dict()
    assert (first["global_step"], last["global_step"], again["global_step"]) == (steps_per_epoch, 2 * steps_per_epoch, 2 * steps_per_epoch)
    assert any(not torch.equal(first["state_dict"][k], last["state_dict"][k]) for k in expected if "lora_B" in k)
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][key].float(), value.float(), rtol=0, atol=atol, msg=key)


def _load_script(tmp_path):
    path = tmp_path / "fsdp_fit.py"
    path.write_text(SCRIPT)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        return importlib.import_module("fsdp_fit")
    finally:
        sys.path.remove(str(tmp_path))


@requires_cuda
def test_fsdp_single_gpu_adapter_only_checkpoints_and_resume(tmp_path):
    fsdp_fit = _load_script(tmp_path)
    trainer = fsdp_fit.fit(str(tmp_path / "straight"), 1, 2)
    assert any(getattr(cb, "checked", False) for cb in trainer.callbacks)  # trained inside FullyShardedDataParallel
    fsdp_fit.fit(str(tmp_path / "resumed"), 1, 2, str(tmp_path / "straight" / "ckpt" / "epoch=0.ckpt"))
    _check(tmp_path / "straight" / "ckpt", tmp_path / "resumed" / "ckpt", steps_per_epoch=4)


@requires_two_gpus
def test_fsdp_two_gpus_adapter_only_checkpoints_from_rank_zero_and_resume(tmp_path):
    script = tmp_path / "fsdp_fit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    for args in ([str(tmp_path / "straight"), "2", "2"],
                 [str(tmp_path / "resumed"), "2", "2", str(tmp_path / "straight" / "ckpt" / "epoch=0.ckpt")]):
        proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    _check(tmp_path / "straight" / "ckpt", tmp_path / "resumed" / "ckpt", steps_per_epoch=2)

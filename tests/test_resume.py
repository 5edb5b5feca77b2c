"""Exact resume: a run interrupted at an epoch boundary and resumed on a fresh base model == the uninterrupted run.

Exact by design: the data order of epoch e depends only on (seed, e) (a DistributedSampler that
Lightning re-seeds with set_epoch), the base model has no dropout of its own, and the adapter's
dropout masks depend only on the (seed, offset) buffers that travel in the adapter checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fixtures import LazyLlamaModule, LlamaModule, LossRecorder, TokensData, load_ckpt, trainer_kwargs
from lightning_peft import LoraConfig, PEFTCallback

CFG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"])


def _run(tmp_path, module, epochs, ckpt_path=None, seed=0):
    seed_everything(seed)  # a resumed run's global RNG differs from the original's anyway: it must not matter
    recorder = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, callbacks=[PEFTCallback(CFG, model_attr="model"), ckpt, recorder]))
    trainer.fit(module, datamodule=TokensData(), ckpt_path=ckpt_path)
    return recorder.losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("uninterrupted")
    return _run(path, LlamaModule(), epochs=3), path


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    assert sorted(reference) == list(range(1, 13))  # 3 epochs x 4 steps
    first = _run(tmp_path / "a", LlamaModule(), epochs=1)
    # resume on a freshly built base model (built in configure_model this time), another global seed
    resumed = _run(tmp_path / "b", LazyLlamaModule(), epochs=3, ckpt_path=tmp_path / "a" / "epoch=0.ckpt", seed=123)
    assert sorted(resumed) == list(range(5, 13))
    got = [first[s] for s in range(1, 5)] + [resumed[s] for s in range(5, 13)]
    want = [reference[s] for s in range(1, 13)]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    # and the final adapters agree
    final, ref_final = load_ckpt(tmp_path / "b" / "epoch=2.ckpt"), load_ckpt(uninterrupted[1] / "epoch=2.ckpt")
    for key, value in ref_final["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=1e-6)


def test_the_dropout_rng_state_is_what_makes_it_exact(tmp_path, uninterrupted):
    """Control: the same resume with the dropout offsets of the checkpoint reset gives other losses."""
    reference, path = uninterrupted
    ckpt = load_ckpt(path / "epoch=0.ckpt")
    rng_keys = [k for k in ckpt["state_dict"] if k.endswith("lora_rng.default")]
    assert rng_keys and all(int(ckpt["state_dict"][k][1]) == 4 for k in rng_keys)  # offset = steps taken
    for key in rng_keys:
        ckpt["state_dict"][key][1] = 0
    torch.save(ckpt, tmp_path / "reset.ckpt")
    resumed = _run(tmp_path, LlamaModule(), epochs=2, ckpt_path=tmp_path / "reset.ckpt")
    assert all(abs(resumed[s] - reference[s]) > 1e-6 for s in range(5, 9))

"""A process that dies while writing a checkpoint leaves the previous checkpoint intact (and resumable).

The crash is real: a child process trains one epoch (``last.ckpt`` written), then, while writing
the next ``last.ckpt``, writes half of the bytes and calls ``os._exit`` (no cleanup, no finally).
A control run with a plain ``torch.save(checkpoint, path)`` CheckpointIO shows that the same crash
does destroy the previous file when the write is not atomic.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fixtures import LlamaModule, TokensData, load_ckpt, trainer_kwargs
from lightning_peft import AtomicCheckpointIO, LoraConfig, PEFTCallback
from lightning_peft.lightning.checkpoint_io import AdapterCheckpointIO

CRASH_EXIT_CODE = 17

SCRIPT = textwrap.dedent(
    """
    import io, os, sys
    import torch
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning_fixtures import LlamaModule, TokensData, trainer_kwargs
    from lightning_peft import LoraConfig, PEFTCallback

    mode, out = sys.argv[1], sys.argv[2]
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # serialise, write half of it, die
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        os._exit({code})

    class CrashDuringSecondEpochSave(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                torch.save = dying_save

    class NaiveIO(CheckpointIO):  # control: writes straight onto the destination
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(checkpoint, path)
        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return torch.load(path, weights_only=True)
        def remove_checkpoint(self, path):
            os.remove(path)

    seed_everything(0)
    peft = PEFTCallback(LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]), model_attr="model")
    ckpt = ModelCheckpoint(dirpath=out, filename="last")
    plugins = [NaiveIO()] if mode == "naive" else None
    trainer = Trainer(**trainer_kwargs(out, max_epochs=2, callbacks=[peft, ckpt, CrashDuringSecondEpochSave()], plugins=plugins))
    trainer.fit(LlamaModule(), datamodule=TokensData())
    """
).format(code=CRASH_EXIT_CODE)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Both crash runs (atomic, naive control), in parallel child processes: mode -> the checkpoint path."""
    root = tmp_path_factory.mktemp("crash")
    script = root / "crash.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    procs = {mode: subprocess.Popen([sys.executable, str(script), mode, str(root / mode)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for mode in ("atomic", "naive")}
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == CRASH_EXIT_CODE, err[-3000:]
    return {mode: root / mode / "last.ckpt" for mode in procs}


def test_crash_mid_write_keeps_the_previous_checkpoint_and_it_resumes(tmp_path, crashed):
    path = crashed["atomic"]
    ckpt = load_ckpt(path)  # the epoch-0 checkpoint, whole
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 0
    assert ckpt["lightning_peft"]["model_attr"] == "model"
    leftovers = [n for n in os.listdir(path.parent) if n != "last.ckpt"]
    assert all(n.startswith(".last.ckpt.") and n.endswith(".tmp") for n in leftovers)  # the half-written temp file

    seed_everything(0)
    config = LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[PEFTCallback(config, model_attr="model")]))
    trainer.fit(LlamaModule(), datamodule=TokensData(), ckpt_path=path)
    assert trainer.global_step == 8


def test_control_the_same_crash_corrupts_a_non_atomic_write(crashed):
    path = crashed["naive"]
    with pytest.raises((RuntimeError, OSError)):
        load_ckpt(path)  # truncated: torch.load cannot read it (which error depends on where the cut falls)


def test_callback_makes_lightnings_default_checkpoint_io_atomic(tmp_path):
    seed_everything(0)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[
        PEFTCallback(LoraConfig(target_modules=["q_proj"]), model_attr="model"), ModelCheckpoint(dirpath=tmp_path)]))
    trainer.fit(LlamaModule(), datamodule=TokensData())
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AdapterCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=4.ckpt"]  # no temp file left after a normal save
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "epoch=0-step=4.ckpt").st_mode) == 0o666 & ~umask  # as a plain open() would


def test_atomic_checkpoint_io_round_trips(tmp_path):
    io = AtomicCheckpointIO()
    state = {"state_dict": {"w": torch.arange(6.0)}, "epoch": 3}
    io.save_checkpoint(state, tmp_path / "sub" / "x.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "x.ckpt", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(state, tmp_path / "y.ckpt", storage_options={"a": 1})

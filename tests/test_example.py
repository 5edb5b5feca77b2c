"""The SST-2 example: its config works with any local model path (here a tiny Llama classifier), and (slow) the real run."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_fixtures import load_ckpt, save_tiny_classifier
from lightning_peft import get_tuner, load_peft_checkpoint
from lightning_peft.cli import PEFTLightningCLI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the example code (examples.*), as the CLI finds it from the repository root

from examples.fit_summary import FitSummary  # noqa: E402
from examples.text_classification import TextClassifier, read_tsv  # noqa: E402

CONFIG = REPO / "examples" / "configs" / "sst2_lora.yaml"
DATA = REPO / "examples" / "data" / "sst2"


def test_sst2_data_is_in_the_project():
    train, dev = read_tsv(str(DATA / "train.tsv"), 2), read_tsv(str(DATA / "dev.tsv"), 2)
    assert (len(train[0]), len(dev[0])) == (6920, 872)
    assert set(train[1]) == set(dev[1]) == {0, 1}


def test_sst2_config_runs_on_a_tiny_causal_lm_classifier_path(tmp_path, monkeypatch):
    """A user's own model: a Llama-architecture classifier saved with save_pretrained, no pad token in its config."""
    model_dir = save_tiny_classifier(tmp_path / "my_llama", "llama")
    monkeypatch.chdir(tmp_path)
    cli = PEFTLightningCLI(model_class=None, datamodule_class=None, args=[
        "fit", "--config", str(CONFIG),
        f"--model.init_args.model_name_or_path={model_dir}",
        "--peft.init_args.peft_config.init_args.target_modules=[q_proj, v_proj]",
        "--peft.init_args.peft_config.init_args.modules_to_save=[score]",
        f"--data.init_args.train_file={DATA / 'train.tsv'}", f"--data.init_args.val_file={DATA / 'dev.tsv'}",
        "--data.init_args.train_subset=24", "--data.init_args.batch_size=8",
        "--trainer.max_epochs=1", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
    ])
    assert cli.trainer.global_step == 3
    trained = cli.model.model
    assert get_tuner(trained) is not None and trained.config.pad_token_id is not None

    last = tmp_path / "runs" / "sst2_lora" / "checkpoints" / "last.ckpt"
    ckpt = load_ckpt(last)
    assert set(ckpt["state_dict"]) == set(ckpt["lightning_peft"]["adapter_keys"])
    assert {k for k in ckpt["state_dict"] if ".lora_" not in k} == {"model.score.weight"}
    summary = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FitSummary)).summary
    assert 0 < summary["checkpoint_bytes"] < summary["full_model_bytes"] and "val_acc" in summary

    # inference without a Trainer: a fresh TextClassifier on the same path + the adapter checkpoint
    restored = load_peft_checkpoint(TextClassifier(model_dir), last)
    trained.eval()
    correct = total = 0
    for batch, _ in zip(cli.datamodule.val_dataloader(), range(2)):  # the 2 batches validation used
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            logits = restored(**inputs).logits
            torch.testing.assert_close(logits, trained(**inputs).logits, rtol=0, atol=0)
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    assert summary["val_acc"] == pytest.approx(correct / total, abs=1e-6)  # the logged metric is plain accuracy


@pytest.mark.slow
def test_sst2_main_job_reaches_85_percent_within_3_epochs_and_15_minutes(tmp_path):
    """The README's main job, as shipped: set-up, 3 epochs of LoRA on all-MiniLM-L6-v2, evaluation without a Trainer."""
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "examples" / "run_sst2.sh")], cwd=REPO, capture_output=True, text=True, timeout=1800)
    minutes = (time.perf_counter() - start) / 60
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(re.search(r"SST-2 dev accuracy \(adapter loaded without a Trainer\): ([0-9.]+)", proc.stdout).group(1))
    print(proc.stdout[-1500:])
    assert accuracy >= 0.85 and minutes < 15, (accuracy, minutes)

"""The ``lightning-peft`` CLI driven as a user would: ``python -m lightning_peft`` and ``main(args=[...])``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_fixtures import LlamaModule, TokensData, load_ckpt, save_tiny_classifier
from lightning_peft.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the configs name the example code (examples.*), found from the repository root
CONFIG = REPO / "examples" / "configs" / "sst2_lora.yaml"
SST2_DEV = REPO / "examples" / "data" / "sst2" / "dev.tsv"


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny_bert"), "bert")


def _fit_args(model_dir, *extra):
    return [
        "fit", "--config", str(CONFIG),
        f"--model.init_args.model_name_or_path={model_dir}",
        f"--data.init_args.train_file={SST2_DEV}", f"--data.init_args.val_file={SST2_DEV}",
        "--data.init_args.train_subset=64", "--data.init_args.batch_size=16",
        "--trainer.max_epochs=1", "--trainer.limit_val_batches=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        *extra,
    ]


def test_print_config_through_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "lightning_peft", "fit", "--config", str(CONFIG), "--print_config"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = yaml.safe_load(proc.stdout)
    peft = config["peft"]
    assert peft["class_path"] == "lightning_peft.PEFTCallback" and peft["init_args"]["model_attr"] == "model"
    lora = peft["init_args"]["peft_config"]
    assert lora["class_path"] == "lightning_peft.LoraConfig"
    assert lora["init_args"]["r"] == 8 and lora["init_args"]["target_modules"] == ["query", "key", "value", "attention.output.dense"]
    assert config["model"]["class_path"] == "examples.text_classification.TextClassifier"


def test_fit_saves_its_config_and_resumes_into_the_same_directory(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(_fit_args(tiny_bert_dir))
    run = tmp_path / "runs" / "sst2_lora"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 1
    assert saved["peft"]["init_args"]["peft_config"]["init_args"]["r"] == 8
    first = load_ckpt(run / "checkpoints" / "last.ckpt")
    keys = set(first["state_dict"])
    assert keys == set(first["lightning_peft"]["adapter_keys"])
    assert all(".lora_" in k or k.startswith(("model.classifier.", "model.bert.pooler.")) for k in keys)

    # resume into the same directory: the existing config.yaml must not stop it
    main(_fit_args(tiny_bert_dir, "--trainer.max_epochs=2", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    second = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert (first["global_step"], second["global_step"]) == (4, 8)


def test_optimizer_flag_optimizes_the_adapter(tmp_path, tiny_bert_dir, monkeypatch):
    """The model is built in configure_model: a plain LightningCLI would build SGD over no parameters at all."""
    monkeypatch.chdir(tmp_path)
    main(_fit_args(tiny_bert_dir, "--optimizer=torch.optim.SGD", "--optimizer.lr=0.5"))
    ckpt = load_ckpt(tmp_path / "runs" / "sst2_lora" / "checkpoints" / "last.ckpt")
    (opt_state,) = ckpt["optimizer_states"]
    assert opt_state["param_groups"][0]["lr"] == 0.5 and "momentum" in opt_state["param_groups"][0]  # SGD
    trainable = [k for k in ckpt["state_dict"] if not k.endswith("lora_rng.default")]
    assert len(opt_state["param_groups"][0]["params"]) == len(trainable)
    assert all(ckpt["state_dict"][k].abs().sum() > 0 for k in trainable if "lora_B" in k)  # trained from zero


def test_plain_lightning_cli_optimizer_pitfall_fails_with_the_fix(tmp_path):
    config = {
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning_peft.PEFTCallback", "init_args": {
                "model_attr": "model",
                "peft_config": {"class_path": "lightning_peft.LoraConfig", "init_args": {"target_modules": ["q_proj", "v_proj"]}},
            }}],
        },
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match=r"belong to no optimizer.*--optimizer.*lightning-peft"):
        LightningCLI(LlamaModule, TokensData, args=["fit", "--config", str(path)], save_config_callback=None)


def test_a_bad_peft_config_is_one_clear_error(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="LoraConfig.r must be a positive integer"):
        main(_fit_args(tiny_bert_dir, "--peft.init_args.peft_config.init_args.r=0"))
    assert not (tmp_path / "runs" / "sst2_lora" / "checkpoints").exists()  # nothing ran


def test_cli_works_without_the_peft_section(tmp_path, tiny_bert_dir, monkeypatch):
    """The section is optional: PEFTCallback may as well sit in trainer.callbacks (or be absent)."""
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(CONFIG.read_text())
    peft = config.pop("peft")
    config["trainer"]["callbacks"].insert(0, peft)
    path = tmp_path / "in_callbacks.yaml"
    path.write_text(yaml.safe_dump(config))
    args = _fit_args(tiny_bert_dir)
    args[2] = str(path)
    main(args)
    ckpt = load_ckpt(tmp_path / "runs" / "sst2_lora" / "checkpoints" / "last.ckpt")
    assert set(ckpt["state_dict"]) == set(ckpt["lightning_peft"]["adapter_keys"])
    assert torch.is_tensor(next(iter(ckpt["state_dict"].values())))


# Parameter-name fragments that only the method's own trainable tensors carry (prefix and prompt
# tuning keep peft's name for their table: prompt_encoder.embedding).
METHOD_KEY_FRAGMENT = {"lora": ".lora_", "adapter": "adapter", "prefix": "prompt_encoder", "prompt": "prompt_encoder", "bitfit": ".bias",
                       "ia3": ".ia3_l", "dora": ".lora_"}


@pytest.mark.parametrize("method", sorted(METHOD_KEY_FRAGMENT))
def test_each_method_trains_from_its_own_example_config(method, tmp_path, tiny_bert_dir, monkeypatch):
    """examples/configs/sst2_<method>.yaml runs through the CLI (tiny BERT in place of MiniLM) and
    writes an adapter-only checkpoint holding that method's tensors plus the head."""
    monkeypatch.chdir(tmp_path)
    config = REPO / "examples" / "configs" / f"sst2_{method}.yaml"
    main([a if a != str(CONFIG) else str(config) for a in _fit_args(tiny_bert_dir)])
    (last,) = tmp_path.glob("runs/*/checkpoints/last.ckpt")
    ckpt = load_ckpt(last)
    keys = set(ckpt["state_dict"])
    assert keys == set(ckpt["lightning_peft"]["adapter_keys"]) and ckpt["global_step"] == 4
    head = {k for k in keys if k.startswith(("model.classifier.", "model.bert.pooler."))}
    own = keys - head
    assert head and own, f"{method}: expected the head and the method's own tensors, got {sorted(keys)}"
    assert all(METHOD_KEY_FRAGMENT[method] in k for k in own), sorted(own)
    assert not any(k.endswith("word_embeddings.weight") or k.endswith("query.weight") for k in own)

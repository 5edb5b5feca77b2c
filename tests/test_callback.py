"""PEFTCallback: injection timing, freezing, injecting once, the optimizer check, RNG advance, parameter report."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import BaseFinetuning

from lightning_fixtures import LazyLlamaModule, LlamaModule, TokensData, trainer_kwargs
from lightning_peft import LoraConfig, LoraLinear, PEFTCallback, adapter_state_dict, count_parameters, get_tuner
from models import tiny_llama

CFG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


class OptimizerWatch(LlamaModule):
    """Records, when the optimizer is built, which parameters exist and which require grad."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.seen_at_optimizer = {n: p.requires_grad for n, p in self.named_parameters()}
        return super().configure_optimizers()


class LazyOptimizerWatch(LazyLlamaModule, OptimizerWatch):
    pass


def _fit(tmp_path, module, callback, **kwargs):
    seed_everything(0)
    callbacks = callback if isinstance(callback, list) else [callback]
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=callbacks, **kwargs))
    trainer.fit(module, datamodule=TokensData())
    return trainer


@pytest.mark.parametrize("module_cls", [OptimizerWatch, LazyOptimizerWatch], ids=["built_in_init", "built_in_configure_model"])
def test_injects_and_freezes_before_the_optimizer_exists(tmp_path, module_cls):
    module = module_cls()
    base_before = tiny_llama(0).state_dict()
    trainer = _fit(tmp_path, module, PEFTCallback(CFG, model_attr="model"))

    # at configure_optimizers time the adapter was already there, and only it required grad
    lora_names = {n for n in module.seen_at_optimizer if ".lora_" in n}
    assert len(lora_names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert {n for n, g in module.seen_at_optimizer.items() if g} == lora_names
    # the optimizer holds exactly the trainable parameters (B starts at zero: no torch.equal pitfall)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}
    # the adapter trained, the base did not
    for name, value in module.model.state_dict().items():
        if name in base_before:
            assert torch.equal(value, base_before[name]), name
    assert all(layer.lora_B.default.weight.abs().sum() > 0 for layer in module.model.modules() if isinstance(layer, LoraLinear))


@pytest.mark.parametrize("module_cls", [LlamaModule, LazyLlamaModule], ids=["built_in_init", "built_in_configure_model"])
def test_adapts_the_whole_lightning_module_when_no_attribute_is_named(tmp_path, module_cls):
    module = module_cls()
    _fit(tmp_path, module, PEFTCallback(CFG))
    tuner = get_tuner(module)
    assert tuner is not None and get_tuner(module.model) is None
    assert set(adapter_state_dict(module)) == {n for n, _ in module.named_parameters() if ".lora_" in n} | {
        n for n, _ in module.named_buffers() if n.endswith("lora_rng.default")
    }


def test_injects_once_across_stages_and_repeated_fits(tmp_path):
    module = LazyLlamaModule()
    callback = PEFTCallback(CFG, model_attr="model")
    trainer = _fit(tmp_path, module, callback, limit_val_batches=2, limit_test_batches=1, limit_predict_batches=1)
    tuner = get_tuner(module.model)
    layers = [m for m in module.model.modules() if isinstance(m, LoraLinear)]
    data = TokensData()
    trainer.validate(module, datamodule=data)
    trainer.test(module, dataloaders=data.val_dataloader())
    trainer.predict(module, dataloaders=data.val_dataloader())
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, datamodule=data)
    assert get_tuner(module.model) is tuner
    assert [m for m in module.model.modules() if isinstance(m, LoraLinear)] == layers
    assert not any(isinstance(m.weight, LoraLinear) for m in layers)  # no layer wrapped twice
    assert "configure_model" not in module.__dict__  # the one-shot wrap is gone


def test_a_new_trainer_reuses_the_adapter_it_finds_and_rejects_a_different_one(tmp_path):
    module = LlamaModule()
    _fit(tmp_path, module, PEFTCallback(CFG, model_attr="model"))
    tuner = get_tuner(module.model)
    Trainer(**trainer_kwargs(tmp_path, callbacks=[PEFTCallback(CFG, model_attr="model")])).predict(
        module, dataloaders=TokensData().val_dataloader()
    )
    assert get_tuner(module.model) is tuner
    other = LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="different adapter"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[PEFTCallback(other, model_attr="model")])).predict(
            module, dataloaders=TokensData().val_dataloader()
        )


class PrebuiltOptimizer(LlamaModule):
    """The LightningCLI `--optimizer` pitfall: the optimizer is built from model.parameters() before fit."""

    def __init__(self) -> None:
        super().__init__()
        self.early = torch.optim.AdamW(self.parameters(), lr=1e-3)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.early


def test_fails_clearly_when_trainable_parameters_are_in_no_optimizer(tmp_path):
    with pytest.raises(RuntimeError) as info:
        _fit(tmp_path, PrebuiltOptimizer(), PEFTCallback(CFG, model_attr="model"))
    message = str(info.value)
    assert "8 trainable parameters belong to no optimizer" in message
    assert "lora_A.default.weight" in message and "--optimizer" in message and "configure_optimizers" in message


def test_dropout_rng_advances_once_per_micro_batch(tmp_path):
    module = LlamaModule()
    _fit(tmp_path, module, PEFTCallback(CFG, model_attr="model"), accumulate_grad_batches=2)
    offsets = {int(m.lora_rng.default[1]) for m in module.model.modules() if isinstance(m, LoraLinear)}
    assert offsets == {4}  # 32 samples / batch 8 = 4 micro-batches (2 optimizer steps)
    seeds = [int(m.lora_rng.default[0]) for m in module.model.modules() if isinstance(m, LoraLinear)]
    assert len(set(seeds)) == len(seeds)  # every layer has its own mask stream


def test_reports_trainable_parameters_once_at_fit_start(tmp_path, caplog):
    module = LlamaModule()
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, module, PEFTCallback(CFG, model_attr="model"))
    reports = [r.getMessage() for r in caplog.records if "PEFTCallback (LORA)" in r.getMessage()]
    trainable, total = count_parameters(module.model)
    assert reports == [
        f"PEFTCallback (LORA): trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    ]


def test_bad_configuration_fails_with_one_clear_error(tmp_path):
    with pytest.raises(TypeError, match="needs a PeftConfig"):
        PEFTCallback({"r": 8})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="r must be a positive integer"):
        PEFTCallback(LoraConfig(r=0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"found no model at LlamaModule.backbone.*submodules: model"):
        _fit(tmp_path, LlamaModule(), PEFTCallback(CFG, model_attr="backbone"))
    with pytest.raises(ValueError, match="more than one PEFTCallback"):
        _fit(tmp_path, LlamaModule(), [PEFTCallback(CFG, model_attr="model"), PEFTCallback(CFG)])
    module = LlamaModule()
    with pytest.raises(ValueError, match="matched no module"):
        _fit(tmp_path, module, PEFTCallback(LoraConfig(target_modules=["nope"]), model_attr="model"))
    assert get_tuner(module.model) is None and all(p.requires_grad for p in module.parameters())


def test_is_not_a_base_finetuning_callback():
    # BaseFinetuning's filter_on_optimizer compares parameters with torch.equal, so zero-initialised
    # LoRA B matrices would look "already optimised" and be skipped (GUIDE section 3).
    assert not issubclass(PEFTCallback, BaseFinetuning)

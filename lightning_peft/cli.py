"""``lightning-peft`` / ``python -m lightning_peft``: LightningCLI with PEFT-friendly defaults.

Usage::

    lightning-peft fit --config examples/configs/sst2_lora.yaml
    lightning-peft fit --config examples/configs/sst2_lora.yaml --print_config
    lightning-peft fit --config examples/configs/sst2_lora.yaml --ckpt_path runs/sst2_lora/checkpoints/last.ckpt
    lightning-peft validate --config examples/configs/sst2_lora.yaml --ckpt_path runs/sst2_lora/checkpoints/last.ckpt

The YAML chooses the LightningModule (``model:``), the LightningDataModule (``data:``), the
Trainer (``trainer:``) and the PEFT callback (``peft:``, ``class_path: lightning_peft.PEFTCallback``
with its ``peft_config`` nested as ``class_path: lightning_peft.LoraConfig`` + ``init_args``).
``peft:`` is optional, and ``PEFTCallback`` in ``trainer.callbacks`` works as well; the section is
easier to override: ``--peft.init_args.peft_config.init_args.r 16``.

Differences from a plain ``LightningCLI``:

* the run's config is saved with ``overwrite=True``, so resuming into the same directory does
  not fail on the ``config.yaml`` the first run left there;
* ``--optimizer`` / ``--lr_scheduler`` are built inside ``configure_optimizers`` from the
  parameters that require grad at that time, i.e. after ``PEFTCallback`` injected the adapter.
  A plain LightningCLI builds them from ``model.parameters()`` before ``fit`` starts, so the
  adapter would never be optimised (``PEFTCallback`` detects that and fails with the fix);
* the current directory is importable, so ``class_path: my_module.MyModel`` finds your code
  from the console script as it would under ``python``.
"""

from __future__ import annotations

import os
import sys
from functools import partial, update_wrapper
from types import MethodType
from typing import Any, Optional, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, _global_add_class_path, instantiate_class
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

# importing the callback also lets jsonargparse accept any PeftConfig subclass for `peft_config`
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.optim import loraplus_param_groups

__all__ = ["PEFTLightningCLI", "main"]

class PEFTLightningCLI(LightningCLI):
    """``LightningCLI`` whose config saving and automatic optimizers suit ``PEFTCallback``.

    Takes LightningCLI's arguments; defaults: any LightningModule / DataModule by ``class_path``
    and ``save_config_kwargs={"overwrite": True}``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        save_config_kwargs = dict(kwargs.pop("save_config_kwargs", None) or {})
        save_config_kwargs.setdefault("overwrite", True)
        kwargs["save_config_kwargs"] = save_config_kwargs
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # an optional top-level `peft:` section ({class_path: lightning_peft.PEFTCallback, init_args: ...}) that
        # is added to the trainer's callbacks; easier to override from the command line than a list item
        parser.add_lightning_class_args(PEFTCallback, "peft", subclass_mode=True, required=False)
        parser.add_argument(
            "--loraplus_lr_ratio", type=Optional[float], default=None,
            help="LoRA+: build --optimizer with LoRA's B matrices at this multiple of its learning rate (peft's "
            "create_loraplus_optimizer groups); the optimizer's weight_decay applies as loraplus_weight_decay",
        )

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])  # no `peft:` given

    @override
    def _add_configure_optimizers_method_to_model(self, subcommand: Optional[str]) -> None:
        """Like LightningCLI's, but the optimizer and scheduler are instantiated lazily, from trainable parameters."""
        if not self.auto_configure_optimizers:
            return
        parser = self._parser(subcommand)
        optimizers = _automatic_keys(parser._optimizers, Optimizer)
        schedulers = _automatic_keys(parser._lr_schedulers, None)
        if not optimizers:
            return
        if len(optimizers) > 1 or len(schedulers) > 1:
            super()._add_configure_optimizers_method_to_model(subcommand)  # Lightning's own error message
            return
        optimizer_init = _init_with_class_path(parser._optimizers[optimizers[0]][0], self._get(self.config_init, optimizers[0]))
        if not optimizer_init:
            return  # registered but not given by the user
        scheduler_init = None
        if schedulers:
            scheduler_init = _init_with_class_path(parser._lr_schedulers[schedulers[0]][0], self._get(self.config_init, schedulers[0]))
        if is_overridden("configure_optimizers", self.model):
            rank_zero_warn(
                f"`{type(self.model).__name__}.configure_optimizers` will be overridden by the optimizer given to "
                f"{type(self).__name__} (--optimizer)"
            )
        ratio = self._get(self.config_init, "loraplus_lr_ratio")
        fn = partial(_configure_optimizers_lazily, cli=self, optimizer_init=optimizer_init, scheduler_init=scheduler_init,
                     loraplus_lr_ratio=ratio)
        update_wrapper(fn, self.configure_optimizers)  # Lightning's is_overridden follows __wrapped__
        self.model.configure_optimizers = MethodType(fn, self.model)


def _automatic_keys(register: dict[str, tuple[Any, str]], base: Optional[type]) -> list[str]:
    keys = []
    for key, (classes, link_to) in register.items():
        classes = classes if isinstance(classes, tuple) else (classes,)
        if link_to == "AUTOMATIC" and (base is None or any(issubclass(c, base) for c in classes)):
            keys.append(key)
    return keys


def _init_with_class_path(class_type: Union[type, tuple], init: Any) -> Any:
    """The config to instantiate, with its class_path (as LightningCLI completes it)."""
    return init if isinstance(class_type, tuple) else _global_add_class_path(class_type, init)


def _configure_optimizers_lazily(
    lightning_module: LightningModule,
    *,
    cli: PEFTLightningCLI,
    optimizer_init: Any,
    scheduler_init: Any,
    loraplus_lr_ratio: Optional[float] = None,
) -> Any:
    params: Any = [p for p in lightning_module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(lightning_module).__name__} has no trainable parameters when the optimizer is built; "
            "add lightning_peft.PEFTCallback to trainer.callbacks (or unfreeze something)"
        )
    if loraplus_lr_ratio is not None:
        init_args = optimizer_init.get("init_args", {})
        if init_args.get("lr") is None:
            raise ValueError("--loraplus_lr_ratio needs the optimizer's learning rate: set --optimizer.init_args.lr (A's rate)")
        params = loraplus_param_groups(lightning_module, lr=init_args["lr"], loraplus_lr_ratio=loraplus_lr_ratio,
                                       loraplus_weight_decay=init_args.get("weight_decay", 0.0))
    optimizer = instantiate_class(params, optimizer_init)
    scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
    return cli.configure_optimizers(lightning_module, optimizer, scheduler)


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-peft`` and ``python -m lightning_peft``.

    Args:
        args: command-line arguments (a list, or a dict / Namespace config); ``sys.argv[1:]`` when None.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # class_path: my_module.X from the console script, as under `python`
    PEFTLightningCLI(model_class=None, datamodule_class=None, args=args)


if __name__ == "__main__":  # pragma: no cover
    main()

"""BitFit (Ben Zaken et al., 2022): train only the model's bias terms.

Nothing is added to the model: the tuner declares the existing bias parameters (all of them, or
those of the modules ``target_modules`` names) as the adapter, so the shared mechanism freezes
everything else and saves exactly those tensors. The biases the model had at injection are kept
aside, which gives ``disable_adapter()`` (run with the original biases) and ``unload()`` (give
them back) the same meaning as for the other methods; ``merge_and_unload()`` keeps the trained ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import nn

from lightning_peft.tuners.config import PeftConfig, register_config
from lightning_peft.tuners.injection import DEFAULT_ADAPTER, Tuner, register_tuner
from lightning_peft.tuners.targets import match_module_names

__all__ = ["BitFitConfig", "BitFitTuner"]


@register_config
class BitFitConfig(PeftConfig):
    """BitFit settings (not part of HF peft).

    Args:
        target_modules: train the biases of these modules only (names / suffixes as a list, e.g.
            ``["query", "value", "intermediate.dense"]``, or a regex over whole module names). None:
            every bias of the model, LayerNorm biases included (the paper's setting).
        modules_to_save: modules trained in full besides (e.g. a new classification head).

    Example::

        model = get_peft_model(model, BitFitConfig(modules_to_save=["classifier"]))
    """

    peft_type = "BITFIT"
    method_name = "BitFit"
    target_modules: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)


def _modules_with_bias(model: nn.Module) -> list[str]:
    """Names of modules that own a ``bias`` Parameter directly (the root is ``""``)."""
    return [name for name, module in model.named_modules() if isinstance(module._parameters.get("bias"), nn.Parameter)]


@register_tuner("BITFIT")
class BitFitTuner(Tuner):
    """Declares bias parameters as the adapter; keeps the originals for disable / unload."""

    config: BitFitConfig
    can_merge = True  # the trained biases are always "merged"; unmerge() puts the originals back

    def __init__(self, config: BitFitConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__(config, adapter_name)
        self.bias_names: list[str] = []  # the adapter: these bias parameters of the model
        self.originals: dict[str, torch.Tensor] = {}  # their values at injection (disable / unload)
        self.stashed: dict[str, torch.Tensor] = {}  # the trained values while unmerged
        self.merged = True  # the model holds the trained biases

    def inject(self, model: nn.Module) -> None:
        cfg = self.config
        owners = _modules_with_bias(model)
        if not owners:
            raise ValueError(
                f"{type(model).__name__} has no bias parameters, so BitFit has nothing to train (Llama-style models "
                "are built without biases). Use LoRA, bottleneck adapters or prefix/prompt tuning for it, or a model "
                "configured with biases (e.g. LlamaConfig(attention_bias=True, mlp_bias=True))"
            )
        if cfg.target_modules is not None:
            owners = match_module_names(owners, cfg.target_modules)
            if not owners:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in _modules_with_bias(model)})
                raise ValueError(
                    f"BitFitConfig.target_modules={cfg.target_modules!r} matched no module with a bias in "
                    f"{type(model).__name__}; modules with biases: {', '.join(leaves[:12])}{', ...' if len(leaves) > 12 else ''}"
                )
        self.bias_names = [f"{owner}.bias" if owner else "bias" for owner in owners]
        params = dict(model.named_parameters(remove_duplicate=False))
        self.originals = {name: params[name].detach().clone() for name in self.bias_names}

    def adapter_parameter_names(self, model: nn.Module) -> list[str]:
        return list(self.bias_names)

    def _write(self, model: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``values`` into the biases; return what they held before."""
        params = dict(model.named_parameters(remove_duplicate=False))
        before = {}
        with torch.no_grad():
            for name, value in values.items():
                before[name] = params[name].detach().clone()
                params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
        return before

    def unmerge(self, model: nn.Module) -> None:
        """Put the original biases back (the trained ones are kept for :meth:`merge`)."""
        if self.merged:
            self.stashed = self._write(model, self.originals)
            self.merged = False

    def merge(self, model: nn.Module) -> None:
        """Put the trained biases back after :meth:`unmerge`."""
        if not self.merged:
            self._write(model, self.stashed)
            self.stashed, self.merged = {}, True

    def unload(self, model: nn.Module) -> None:
        # Nothing to take out of the model: the biases it holds now (trained if merged, original
        # after unmerge()) are what stays, as for LoRA's unload after merge / unmerge.
        self.originals, self.stashed = {}, {}

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Run with the original biases; the trained ones come back on exit."""
        was_merged = self.merged
        try:
            self.unmerge(model)
            yield
        finally:
            if was_merged:
                self.merge(model)

"""The base of adapter layers that take the place of a linear layer, and the tuner that places them.

A method that adapts linear layers (LoRA, bottleneck adapters, ...) writes two small classes:

* a :class:`LinearAdapterLayer` subclass: its ``__init__`` adds the adapter's parameters, its
  ``forward`` computes the adapted output, and, if the method can be merged into the base weight,
  ``delta_weight`` gives what merging adds;
* a :class:`LayerReplacementTuner` subclass: which modules it targets by default and
  ``make_layer(name, base)``.

Everything else is here once: owning the base ``weight``/``bias`` (so base state-dict keys do not
change and a base checkpoint still loads), GPT-2's transposed ``Conv1D`` layout, handing the base
layer back, safe merge/unmerge, disabling, target selection and its errors, peft's
``base_layer`` key names.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from contextlib import contextmanager
from typing import ClassVar, Iterator

import torch
from torch import nn

from lightning_peft.tuners.config import LayerTargetsConfig
from lightning_peft.tuners.injection import AdapterLayer, ModuleReplacementTuner
from lightning_peft.tuners.targets import check_target_types, matched_targets, narrow_targets, no_target_message

__all__ = ["Conv1D", "LINEAR_TYPES", "is_fan_in_fan_out", "LinearAdapterLayer", "LayerReplacementTuner"]

try:  # GPT-2 style layers store weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain nn.Modules
    Conv1D = None  # type: ignore[assignment,misc]

#: The layer types a linear adapter layer can take the place of.
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_fan_in_fan_out(base: nn.Module) -> bool:
    """Whether the linear layer ``base`` stores its weight as ``[in, out]`` (GPT-2 ``Conv1D``) instead of ``[out, in]``."""
    return Conv1D is not None and isinstance(base, Conv1D)


class LinearAdapterLayer(AdapterLayer):
    """An adapter layer in place of an ``nn.Linear`` / ``Conv1D``, owning the base ``weight`` and ``bias``.

    Args:
        base: the layer being adapted; its Parameters become this layer's (same objects).

    Input ``[*, in_features]``, output ``[*, out_features]``. ``merged``: the adapter is folded into
    ``weight`` (forward then runs the base computation only). ``adapter_enabled``: False inside
    ``disable_adapter()``.
    """

    #: Whether :meth:`delta_weight` exists, i.e. the adapter can be folded into the base weight.
    can_merge: ClassVar[bool] = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        weight: nn.Parameter = base.weight
        self.fan_in_fan_out = is_fan_in_fan_out(base)
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.weight = weight
        self.bias = base.bias
        self.merged = False
        self.adapter_enabled = True
        # Kept out of the module tree (no duplicate state-dict entries); handed back by restore_base().
        self.__dict__["_base_layer"] = base

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output ``[*, out]`` for ``x [*, in]``."""
        return nn.functional.linear(x, self.base_weight(), self.bias)

    def adapter_active(self) -> bool:
        """Whether forward should add the adapter (not merged in, not disabled)."""
        return self.adapter_enabled and not self.merged

    def adapter_repr(self) -> str:
        """The adapter's settings for ``repr`` (e.g. ``"r=8, scaling=2"``)."""
        return ""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.adapter_repr()}, merged={self.merged}"

    def restore_base(self) -> nn.Module:
        base = self.__dict__["_base_layer"]
        base.weight, base.bias = self.weight, self.bias  # in case .to() replaced the Parameters
        return base

    # ---- merging (methods with can_merge = True implement delta_weight)

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to ``weight``, laid out like ``weight``."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weight")

    def _compute_dtype(self) -> torch.dtype:
        # Half-precision arithmetic on CPU loses more than needed: do it in fp32 there.
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if half and self.weight.device.type == "cpu" else self.weight.dtype

    @torch.no_grad()
    def check_mergeable(self) -> None:
        """Raise ValueError if merging would write NaN/inf into ``weight`` (writes nothing)."""
        merged = (self.weight.to(self._compute_dtype()) + self.delta_weight()).to(self.weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging the {type(self).__name__} layer ({self.extra_repr()}) would put NaN/inf into its weight "
                "(broken adapter weights, or an overflow in this dtype); nothing was merged"
            )

    def check_unmergeable(self) -> None:
        """Raise ValueError if :meth:`unmerge` cannot restore the base weight (writes nothing)."""

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight``. No-op if merged."""
        if not self.merged:
            self.weight.copy_((self.weight.to(self._compute_dtype()) + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from ``weight`` again. No-op if not merged."""
        if self.merged:
            self.weight.copy_((self.weight.to(self._compute_dtype()) - self.delta_weight()).to(self.weight.dtype))
            self.merged = False


class LayerReplacementTuner(ModuleReplacementTuner):
    """A tuner that puts a :class:`LinearAdapterLayer` in place of each target linear layer.

    Subclasses implement :meth:`make_layer`; they may override :meth:`default_targets` (used when
    ``target_modules`` is not set).
    """

    config: LayerTargetsConfig

    def __init__(self, config: LayerTargetsConfig) -> None:
        super().__init__(config)
        self.can_merge = False  # type: ignore[misc]  # every injected layer can be merged (set by inject)

    def default_targets(self, model: nn.Module) -> list[str]:
        """Targets when ``target_modules`` is None (default: none; the config asks for them)."""
        raise ValueError(f"{type(self.config).__name__}.target_modules is not set: name the layers to adapt")

    @abstractmethod
    def make_layer(self, name: str, base: nn.Module) -> LinearAdapterLayer:
        """The adapter layer to put in place of the linear layer ``name``."""

    def target_names(self, model: nn.Module) -> list[str]:
        """The layers to adapt, validated: at least one, all of a supported type."""
        cfg = self.config
        if cfg.target_modules is None:
            names, what = self.default_targets(model), f"the default targets of {self.config.method_name}"
        else:
            names, what = matched_targets(model, cfg.target_modules, LINEAR_TYPES), None
        names = narrow_targets(model, names, cfg)
        if not names:
            raise ValueError(no_target_message(model, cfg, LINEAR_TYPES, what))
        check_target_types(model, names, LINEAR_TYPES, method=self.config.method_name, hint="Name the linear layers inside them instead")
        return names

    def build_replacements(self, model: nn.Module) -> dict[str, AdapterLayer]:
        replacements = {}
        for name in self.target_names(model):
            base = model.get_submodule(name)
            if getattr(cfg := self.config, "fan_in_fan_out", False) and isinstance(base, nn.Linear):
                warnings.warn(f"{type(cfg).__name__}.fan_in_fan_out=True but {name} is an nn.Linear ([out, in] weight); "
                              "ignoring it (it is set automatically for transformers Conv1D layers)")
            replacements[name] = self.make_layer(name, base)
        self.can_merge = all(layer.can_merge for layer in replacements.values())  # type: ignore[misc]
        return replacements

    def adapter_layers(self, model: nn.Module) -> list[LinearAdapterLayer]:
        return [layer for _, layer in self.layers(model)]  # type: ignore[misc]

    def merge(self, model: nn.Module) -> None:
        if not self.can_merge:
            super().merge(model)
        layers = [layer for layer in self.adapter_layers(model) if not layer.merged]
        for layer in layers:  # check all first, so a bad adapter leaves every weight untouched
            layer.check_mergeable()
        for layer in layers:
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        if not self.can_merge:
            super().unmerge(model)
        layers = self.adapter_layers(model)
        for layer in layers:  # check all first, so a refusal leaves every weight untouched
            if layer.merged:
                layer.check_unmergeable()
        for layer in layers:
            layer.unmerge()

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Run the base model alone: un-merge merged layers, skip adapters; restored on exit."""
        layers = self.adapter_layers(model)
        was_merged = [layer.merged for layer in layers]
        try:
            for layer in layers:
                layer.unmerge()
                layer.adapter_enabled = False
            yield
        finally:
            for layer, merged in zip(layers, was_merged):
                layer.adapter_enabled = True
                if merged:
                    layer.merge()

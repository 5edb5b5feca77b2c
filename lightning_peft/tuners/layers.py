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
from typing import ClassVar, Iterator, Optional

import torch
from torch import nn

from lightning_peft.tuners.config import LayerTargetsConfig
from lightning_peft.tuners.injection import DEFAULT_ADAPTER, AdapterLayer, ModuleReplacementTuner, _set_submodule
from lightning_peft.tuners.targets import check_target_types, matched_targets, narrow_targets, no_target_message

__all__ = [
    "Conv1D",
    "LINEAR_TYPES",
    "is_fan_in_fan_out",
    "BaseLayerAdapter",
    "LinearAdapterLayer",
    "EmbeddingAdapterLayer",
    "ConvAdapterLayer",
    "LayerReplacementTuner",
]

try:  # GPT-2 style layers store weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain nn.Modules
    Conv1D = None  # type: ignore[assignment,misc]

#: The layer types a linear adapter layer can take the place of.
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_fan_in_fan_out(base: nn.Module) -> bool:
    """Whether the linear layer ``base`` stores its weight as ``[in, out]`` (GPT-2 ``Conv1D``) instead of ``[out, in]``."""
    return Conv1D is not None and isinstance(base, Conv1D)


class BaseLayerAdapter(AdapterLayer):
    """An adapter layer in place of a base layer, owning the base ``weight`` (and ``bias``, if any).

    Args:
        base: the layer being adapted; its Parameters become this layer's (same objects, so tied
            weights stay tied and base state-dict keys do not change).

    ``merged_adapters``: the adapters folded into ``weight`` (``merged``: any; forward then runs the
    base computation for them). ``adapter_enabled``: False inside ``disable_adapter()``. Subclasses per base layer kind
    implement :meth:`base_forward` with the owned Parameters (never through the stored base module,
    whose attributes a wrapper such as FSDP does not update).
    """

    #: Whether :meth:`delta_weight` exists, i.e. the adapter can be folded into the base weight.
    can_merge: ClassVar[bool] = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.weight: nn.Parameter = base.weight
        self.bias = getattr(base, "bias", None)
        self.merged_adapters: list[str] = []
        self.adapter_enabled = True
        # Kept out of the module tree (no duplicate state-dict entries); handed back by restore_base().
        self.__dict__["_base_layer"] = base

    @property
    def merged(self) -> bool:
        """Whether an adapter is folded into ``weight``."""
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:  # single-adapter layers merge as a whole
        self.merged_adapters = [self.merge_target(None)] if value else []

    def merge_target(self, adapter: Optional[str]) -> str:
        """The adapter :meth:`merge` folds in when given ``adapter`` (None: the layer's only / active one)."""
        return adapter or getattr(self, "active_adapter", None) or DEFAULT_ADAPTER

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output for ``x``, computed with this layer's ``weight`` / ``bias``."""
        raise NotImplementedError

    def adapter_active(self) -> bool:
        """Whether forward should add the adapter (not merged in, not disabled)."""
        return self.adapter_enabled and not self.merged

    def adapter_repr(self) -> str:
        """The adapter's settings for ``repr`` (e.g. ``"r=8, scaling=2"``)."""
        return ""

    def remove_adapter(self, adapter: str) -> bool:
        """Forget adapter ``adapter`` (merged weights stay merged); True if the layer holds no adapter any more."""
        if adapter in self.merged_adapters:
            self.merged_adapters.remove(adapter)
        return True

    def restore_base(self) -> nn.Module:
        base = self.__dict__["_base_layer"]
        base.weight, base.bias = self.weight, self.bias  # in case .to() replaced the Parameters
        return base

    # ---- merging (methods with can_merge = True implement delta_weight)

    def delta_weight(self, adapter: Optional[str] = None) -> torch.Tensor:
        """What merging adapter ``adapter`` (None: the active one) adds to ``weight``, laid out like ``weight``."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weight")

    def _compute_dtype(self) -> torch.dtype:
        # Half-precision arithmetic on CPU loses more than needed: do it in fp32 there.
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if half and self.weight.device.type == "cpu" else self.weight.dtype

    @torch.no_grad()
    def check_mergeable(self, adapter: Optional[str] = None) -> None:
        """Raise ValueError if merging would write NaN/inf into ``weight`` (writes nothing)."""
        merged = (self.weight.to(self._compute_dtype()) + self.delta_weight(self.merge_target(adapter))).to(self.weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging the {type(self).__name__} layer ({self.extra_repr()}) would put NaN/inf into its weight "
                "(broken adapter weights, or an overflow in this dtype); nothing was merged"
            )

    def check_unmergeable(self) -> None:
        """Raise ValueError if :meth:`unmerge` cannot restore the base weight (writes nothing)."""

    @torch.no_grad()
    def merge(self, adapter: Optional[str] = None) -> None:
        """Fold adapter ``adapter`` (None: the active one) into ``weight``. No-op if it is merged."""
        adapter = self.merge_target(adapter)
        if adapter not in self.merged_adapters:
            self.weight.copy_((self.weight.to(self._compute_dtype()) + self.delta_weight(adapter)).to(self.weight.dtype))
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter from ``weight`` again (last merged first). No-op if none is."""
        while self.merged_adapters:
            adapter = self.merged_adapters[-1]
            self.weight.copy_((self.weight.to(self._compute_dtype()) - self.delta_weight(adapter)).to(self.weight.dtype))
            self.merged_adapters.pop()


class LinearAdapterLayer(BaseLayerAdapter):
    """In place of an ``nn.Linear`` / ``Conv1D``: input ``[*, in_features]``, output ``[*, out_features]``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.fan_in_fan_out = is_fan_in_fan_out(base)
        # nn.Linear's own sizes: a quantized (bitsandbytes) weight's shape is that of its packed storage
        self.out_features, self.in_features = self.weight.shape[::-1] if self.fan_in_fan_out else (base.out_features, base.in_features)

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.base_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.adapter_repr()}, merged={self.merged}"


class EmbeddingAdapterLayer(BaseLayerAdapter):
    """In place of an ``nn.Embedding``: ids ``[*]`` -> ``[*, embedding_dim]`` (``weight [num_embeddings, dim]``)."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(base)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.lookup = dict(padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``table``'s rows at ``ids``, looked up with the base embedding's settings."""
        return nn.functional.embedding(ids, table, **self.lookup)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.adapter_repr()}, merged={self.merged}"


class ConvAdapterLayer(BaseLayerAdapter):
    """In place of an ``nn.Conv1d`` / ``nn.Conv2d`` (``weight [out, in / groups, *kernel]``)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.conv_kind = type(base)
        self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        # the base's own convolution (padding modes and all), with the weight and bias this layer owns
        return self.__dict__["_base_layer"]._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kernel = tuple(self.weight.shape[2:])
        return f"{self.in_channels}, {self.out_channels}, kernel_size={kernel}, {self.adapter_repr()}, merged={self.merged}"


class LayerReplacementTuner(ModuleReplacementTuner):
    """A tuner that puts a :class:`LinearAdapterLayer` in place of each target linear layer.

    Subclasses implement :meth:`make_layer`; they may override :meth:`default_targets` (used when
    ``target_modules`` is not set).
    """

    config: LayerTargetsConfig
    #: The base layer types the method can take the place of.
    layer_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES
    #: The bitsandbytes layer kinds (``"4bit"``, ``"8bit"``) the method can adapt; others are refused.
    quantized_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: LayerTargetsConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__(config, adapter_name)
        self.can_merge = False  # type: ignore[misc]  # every injected layer can be merged (set by inject)

    def default_targets(self, model: nn.Module) -> list[str]:
        """Targets when ``target_modules`` is None (default: none; the config asks for them)."""
        raise ValueError(f"{type(self.config).__name__}.target_modules is not set: name the layers to adapt")

    @abstractmethod
    def make_layer(self, name: str, base: nn.Module) -> BaseLayerAdapter:
        """The adapter layer to put in place of the linear layer ``name``."""

    def target_names(self, model: nn.Module) -> list[str]:
        """The layers to adapt, validated: at least one, all of a supported type."""
        cfg = self.config
        if cfg.target_modules is None:
            names, what = self.default_targets(model), f"the default targets of {self.config.method_name}"
        else:
            names, what = matched_targets(model, cfg.target_modules, LINEAR_TYPES + self.extendable_linear_types), None
        # never the branches inside another adapter's layers (all-linear or a regex would match their nn.Linear)
        inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
        names = narrow_targets(model, [n for n in names if not n.startswith(inside)], cfg)
        if not names:
            raise ValueError(no_target_message(model, cfg, self.layer_types, what))
        check_target_types(model, names, self.layer_types + self.extendable_layer_types, method=self.config.method_name,
                           hint="Name the layers inside them instead")
        self.check_quantized_targets(model, names)
        return names

    def check_quantized_targets(self, model: nn.Module, names: list[str]) -> None:
        """Raise TypeError naming the first target with a quantized weight the method cannot adapt.

        ``quantized_kinds`` says which bitsandbytes layers the method adapts (LoRA: both kinds); any
        other packed-integer weight (another library's layer) is refused with its type named.
        """
        from lightning_peft.quantization import bnb_kind, is_quantized_linear

        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, self.extendable_layer_types) or not is_quantized_linear(module):
                continue  # (a layer of this method already, for another named adapter: checked when it was made)
            kind = bnb_kind(module)
            if kind is None:
                raise TypeError(
                    f"{name} ({type(module).__module__}.{type(module).__name__}) holds a quantized {module.weight.dtype} weight "
                    "of a kind lightning_peft cannot adapt (it adapts bitsandbytes Linear4bit / Linear8bitLt layers): "
                    "quantize the model with bitsandbytes, load it unquantized, or leave this layer out of target_modules"
                )
            if kind not in self.quantized_kinds:
                raise TypeError(
                    f"{name} is a bitsandbytes {type(module).__name__} ({kind}), which {self.config.method_name} cannot "
                    "adapt: use LoRA (LoraConfig) on quantized layers, load the model unquantized, or leave this layer out"
                )

    def build_replacements(self, model: nn.Module) -> dict[str, AdapterLayer]:
        """New layers for the targets; targets that already are layers of this method (another named adapter's)
        are only checked here, and get this adapter added by :meth:`inject`."""
        replacements = {}
        self._extensions = {}
        for name in self.target_names(model):
            base = model.get_submodule(name)
            if isinstance(base, self.extendable_layer_types):
                self.check_extendable(name, base)
                self._extensions[name] = base
                continue
            if getattr(cfg := self.config, "fan_in_fan_out", False) and isinstance(base, nn.Linear):
                warnings.warn(f"{type(cfg).__name__}.fan_in_fan_out=True but {name} is an nn.Linear ([out, in] weight); "
                              "ignoring it (it is set automatically for transformers Conv1D layers)")
            replacements[name] = self.make_layer(name, base)
        layers = list(replacements.values()) + list(self._extensions.values())
        self.can_merge = all(layer.can_merge for layer in layers)  # type: ignore[misc]
        return replacements

    def inject(self, model: nn.Module) -> None:
        replacements = self.build_replacements(model)  # may raise: nothing changed yet
        extended: list[BaseLayerAdapter] = []
        try:
            for name, layer in self._extensions.items():
                self.extend_layer(name, layer)
                extended.append(layer)
        except BaseException:
            for layer in extended:
                layer.remove_adapter(self.adapter_name)
            raise
        super().inject_replacements(model, replacements)
        self.layer_names = sorted(set(replacements) | set(self._extensions))
        self._extensions = {}

    def unload(self, model: nn.Module) -> None:
        """Take this adapter out of its layers; a layer left without adapters gives its base back."""
        for name in self.layer_names:
            layer = model.get_submodule(name)
            if isinstance(layer, BaseLayerAdapter) and layer.remove_adapter(self.adapter_name):
                _set_submodule(model, name, layer.restore_base())

    # ---- several named adapters on one layer (methods whose layers can hold them override these)

    #: Layer classes of this method that a further named adapter is added to, instead of replacing them.
    extendable_layer_types: ClassVar[tuple[type, ...]] = ()
    #: Those of them that stand in for linear layers (matched by ``target_modules="all-linear"``).
    extendable_linear_types: ClassVar[tuple[type, ...]] = ()

    def check_extendable(self, name: str, layer: BaseLayerAdapter) -> None:
        """Raise if this adapter cannot be added to ``layer`` (which holds other adapters); changes nothing."""

    def extend_layer(self, name: str, layer: BaseLayerAdapter) -> None:
        """Add this adapter to ``layer``, which already holds other named adapters."""
        raise NotImplementedError

    def adapter_layers(self, model: nn.Module) -> list[BaseLayerAdapter]:
        return [layer for _, layer in self.layers(model)]  # type: ignore[misc]

    def merge(self, model: nn.Module) -> None:
        if not self.can_merge:
            super().merge(model)
        adapter = self.adapter_name
        layers = [layer for layer in self.adapter_layers(model) if adapter not in layer.merged_adapters]
        for layer in layers:  # check all first, so a bad adapter leaves every weight untouched
            layer.check_mergeable(adapter)
        for layer in layers:
            layer.merge(adapter)

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

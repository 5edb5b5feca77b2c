"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020), as in AdapterHub.

An adapter is ``h -> h + up(act(down(h)))`` with ``down: d -> b`` and ``up: b -> d`` (``b`` the
bottleneck, ``d / reduction_factor`` by default), applied to the output of a transformer
sub-block before it is added to the residual stream. Placements:

- ``"pfeiffer"``: one adapter per block, after the feed-forward sub-block;
- ``"houlsby"``: two per block, after the attention sub-block and after the feed-forward one.

It is implemented by wrapping the sub-block's *output projection* (Llama ``self_attn.o_proj`` /
``mlp.down_proj``, GPT-2 ``attn.c_proj`` / ``mlp.c_proj``, BERT ``attention.output.dense`` /
``output.dense``, before BERT's dropout + LayerNorm(residual)), found per block with the table in
:mod:`lightning_peft.tuners.model_arch`. Like :class:`~lightning_peft.tuners.lora.LoraLinear`, the
wrapper owns the base ``weight``/``bias`` so base state-dict keys do not change. ``up`` starts at
zero, so the adapted model computes exactly what the base model does until it is trained.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Union

import torch
from torch import nn

from lightning_peft.tuners.config import PeftConfig, register_config
from lightning_peft.tuners.injection import (
    AdapterLayer,
    ModuleReplacementTuner,
    describe_available_modules,
    match_module_names,
    register_tuner,
)
from lightning_peft.tuners.model_arch import block_output_projections, find_blocks

__all__ = ["AdapterConfig", "BottleneckAdapterLayer", "AdapterTuner"]

try:  # GPT-2 style layers store weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain nn.Modules
    Conv1D = None  # type: ignore[assignment,misc]

_LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


@register_config
@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapter settings (AdapterHub's semantics; this method is not part of HF peft).

    Args:
        placement: ``"pfeiffer"`` (after each feed-forward sub-block) or ``"houlsby"`` (after each
            attention sub-block and each feed-forward sub-block).
        reduction_factor: bottleneck = sub-block output width // reduction_factor (>= 1).
        bottleneck_size: the bottleneck width; overrides ``reduction_factor`` when set.
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` / ``"swish"`` or ``"tanh"``.
        init_weights: True: ``down`` Kaiming-uniform, ``up`` and biases zero, so the adapted model
            starts exactly equal to the base model; False: ``up`` random too (for tests).
        target_modules: adapt the outputs of these (linear) modules instead of the architecture's
            sub-block outputs (names / suffixes, or a regex over whole names). For architectures the
            block table does not know.
        layers_to_transform: only adapt blocks with these indices.

    Example::

        config = AdapterConfig(placement="houlsby", reduction_factor=16)
        model = get_peft_model(model, config)
    """

    peft_type = "BOTTLENECK_ADAPTER"
    placement: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    reduction_factor: float = 16
    bottleneck_size: Optional[int] = None
    non_linearity: str = "relu"
    init_weights: bool = True
    target_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None

    def validate(self) -> None:
        super().validate()
        if self.placement not in ("pfeiffer", "houlsby"):
            raise ValueError(
                f"AdapterConfig.placement must be 'pfeiffer' (after the feed-forward block) or 'houlsby' "
                f"(after attention and after the feed-forward block), got {self.placement!r}"
            )
        if self.bottleneck_size is not None:
            if not isinstance(self.bottleneck_size, int) or isinstance(self.bottleneck_size, bool) or self.bottleneck_size <= 0:
                raise ValueError(f"AdapterConfig.bottleneck_size must be a positive integer or None, got {self.bottleneck_size!r}")
        elif not (isinstance(self.reduction_factor, (int, float)) and self.reduction_factor >= 1):
            raise ValueError(f"AdapterConfig.reduction_factor must be >= 1 (hidden size / bottleneck size), got {self.reduction_factor!r}; 16 is common")
        if self.non_linearity not in _ACTIVATIONS:
            raise ValueError(f"AdapterConfig.non_linearity must be one of {', '.join(_ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.init_weights not in (True, False):
            raise ValueError(f"AdapterConfig.init_weights must be True or False, got {self.init_weights!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def bottleneck_for(self, width: int) -> int:
        """The bottleneck width for a sub-block with output width ``width``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(width // self.reduction_factor))


class BottleneckAdapterLayer(AdapterLayer):
    """A linear layer followed by a residual bottleneck adapter: ``y = W x + b; y + up(act(down(y)))``.

    Args:
        base: the ``nn.Linear`` / ``Conv1D`` whose output is adapted; its ``weight``/``bias``
            become this layer's (unchanged state-dict keys).
        bottleneck: the adapter's inner width ``b``.
        non_linearity: a key of the activation table (``"relu"``, ``"gelu"``, ...).
        init_weights: see :class:`AdapterConfig`.

    Input ``[*, in_features]``, output ``[*, out_features]``; the adapter adds ``2 * b * out + b + out`` parameters.
    """

    adapter_parameter_names = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

    def __init__(self, base: nn.Module, *, bottleneck: int, non_linearity: str, init_weights: bool) -> None:
        super().__init__()
        self.fan_in_fan_out = Conv1D is not None and isinstance(base, Conv1D)
        weight: nn.Parameter = base.weight
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.weight = weight
        self.bias = base.bias
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.adapter_down = nn.Linear(self.out_features, bottleneck, **factory)
        self.adapter_act = _ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck, self.out_features, **factory)
        self.non_linearity = non_linearity
        self._init(init_weights)
        self.adapter_enabled = True
        # Kept out of the module tree (no duplicate state-dict entries); handed back by restore_base().
        self.__dict__["_base_layer"] = base

    @torch.no_grad()
    def _init(self, init_weights: bool) -> None:
        if not init_weights:
            return  # nn.Linear's default init for both: a deliberately non-identity start
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # zero output: the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight  # [out, in]
        h = nn.functional.linear(x, weight, self.bias)  # (*, out)
        if not self.adapter_enabled:
            return h
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h)))  # residual around the bottleneck

    def restore_base(self) -> nn.Module:
        base = self.__dict__["_base_layer"]
        base.weight, base.bias = self.weight, self.bias  # in case .to() replaced the Parameters
        return base

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bottleneck={self.adapter_down.out_features}, non_linearity={self.non_linearity}")


@register_tuner("BOTTLENECK_ADAPTER")
class AdapterTuner(ModuleReplacementTuner):
    """Puts :class:`BottleneckAdapterLayer` wrappers on the sub-block outputs of every block."""

    config: AdapterConfig

    def _target_names(self, model: nn.Module) -> list[str]:
        cfg = self.config
        wanted = set(cfg.layers_to_transform) if cfg.layers_to_transform is not None else None
        if cfg.target_modules is not None:
            names = [n for n, _ in model.named_modules() if n]
            targets = match_module_names(names, cfg.target_modules)
            if wanted is not None:
                blocks = sorted(((b, i) for b, i, _ in find_blocks(model)), key=lambda t: -len(t[0]))
                index = {t: next((i for b, i in blocks if t.startswith(b + ".")), None) for t in targets}
                targets = [t for t in targets if index[t] in wanted]
            if not targets:
                raise ValueError(
                    f"AdapterConfig.target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}"
                    + (f" in layers {cfg.layers_to_transform}" if wanted is not None else "")
                    + f". Linear layers it has: {describe_available_modules(model, _LINEAR_TYPES)}"
                )
        else:
            targets = []
            for index, attn, ffn in block_output_projections(model):  # raises naming what it looked for
                if wanted is None or index in wanted:
                    targets += [attn, ffn] if cfg.placement == "houlsby" else [ffn]
            if not targets:
                raise ValueError(f"layers_to_transform={cfg.layers_to_transform} selects no block of {type(model).__name__}")
        if cfg.modules_to_save:
            trained_whole = set(match_module_names([n for n, _ in model.named_modules() if n], list(cfg.modules_to_save)))
            targets = [t for t in targets if t not in trained_whole]
        return targets

    def build_replacements(self, model: nn.Module) -> dict[str, AdapterLayer]:
        cfg = self.config
        targets = self._target_names(model)
        unsupported = [(t, type(model.get_submodule(t)).__name__) for t in targets if not isinstance(model.get_submodule(t), _LINEAR_TYPES)]
        if unsupported:
            shown = ", ".join(f"{n} ({k})" for n, k in unsupported[:5])
            raise TypeError(
                f"bottleneck adapters wrap the output projection (nn.Linear / Conv1D) of a sub-block, but got: {shown}. "
                f"Name linear layers in target_modules, e.g. one of: {describe_available_modules(model, _LINEAR_TYPES)}"
            )
        replacements: dict[str, AdapterLayer] = {}
        for name in targets:
            base = model.get_submodule(name)
            width = base.weight.shape[1] if (Conv1D is not None and isinstance(base, Conv1D)) else base.weight.shape[0]
            replacements[name] = BottleneckAdapterLayer(
                base, bottleneck=cfg.bottleneck_for(width), non_linearity=cfg.non_linearity, init_weights=cfg.init_weights
            )
        return replacements

    def adapter_layers(self, model: nn.Module) -> list[BottleneckAdapterLayer]:
        return [layer for _, layer in self.layers(model)]  # type: ignore[misc]

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Run the base model alone (every adapter skipped); restored on exit."""
        layers = self.adapter_layers(model)
        try:
            for layer in layers:
                layer.adapter_enabled = False
            yield
        finally:
            for layer in layers:
                layer.adapter_enabled = True

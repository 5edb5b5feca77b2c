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
from typing import Literal, Optional

import torch
from torch import nn

from lightning_peft.tuners.config import LayerTargetsConfig, register_config
from lightning_peft.tuners.injection import register_tuner
from lightning_peft.tuners.layers import LayerReplacementTuner, LinearAdapterLayer, is_fan_in_fan_out
from lightning_peft.tuners.model_arch import block_output_projections

__all__ = ["AdapterConfig", "BottleneckAdapterLayer", "AdapterTuner"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


@register_config
class AdapterConfig(LayerTargetsConfig):
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
        exclude_modules, layers_to_transform, layers_pattern: narrow the targets (see
            :class:`~lightning_peft.tuners.config.LayerTargetsConfig`).

    Example::

        config = AdapterConfig(placement="houlsby", reduction_factor=16)
        model = get_peft_model(model, config)
    """

    peft_type = "BOTTLENECK_ADAPTER"
    method_name = "bottleneck adapters"
    placement: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    reduction_factor: float = 16
    bottleneck_size: Optional[int] = None
    non_linearity: str = "relu"
    init_weights: bool = True

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

    def bottleneck_for(self, width: int) -> int:
        """The bottleneck width for a sub-block with output width ``width``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(width // self.reduction_factor))


class BottleneckAdapterLayer(LinearAdapterLayer):
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
        super().__init__(base)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.adapter_down = nn.Linear(self.out_features, bottleneck, **factory)
        self.adapter_act = _ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck, self.out_features, **factory)
        self.non_linearity = non_linearity
        self._init(init_weights)

    @torch.no_grad()
    def _init(self, init_weights: bool) -> None:
        if not init_weights:
            return  # nn.Linear's default init for both: a deliberately non-identity start
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # zero output: the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_forward(x)  # (*, out)
        if not self.adapter_active():
            return h
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h)))  # residual around the bottleneck

    def adapter_repr(self) -> str:
        return f"bottleneck={self.adapter_down.out_features}, non_linearity={self.non_linearity}"


@register_tuner("BOTTLENECK_ADAPTER")
class AdapterTuner(LayerReplacementTuner):
    """Puts :class:`BottleneckAdapterLayer` wrappers on the sub-block outputs of every block."""

    config: AdapterConfig

    def default_targets(self, model: nn.Module) -> list[str]:
        """The output projections of each block's sub-blocks (feed-forward; and attention for Houlsby)."""
        houlsby = self.config.placement == "houlsby"
        # raises, naming what it looked for, when the architecture is unknown
        return [name for _, attn, ffn in block_output_projections(model) for name in ((attn, ffn) if houlsby else (ffn,))]

    def make_layer(self, name: str, base: nn.Module) -> BottleneckAdapterLayer:
        cfg = self.config
        width = base.weight.shape[1] if is_fan_in_fan_out(base) else base.weight.shape[0]  # output width
        return BottleneckAdapterLayer(base, bottleneck=cfg.bottleneck_for(width), non_linearity=cfg.non_linearity,
                                      init_weights=cfg.init_weights)

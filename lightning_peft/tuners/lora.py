"""LoRA: ``W x + b  ->  W x + b + scaling · B A dropout(x)`` with A ``[r, in]``, B ``[out, r]``.

:class:`LoraLinear` takes the place of an ``nn.Linear`` or a transformers ``Conv1D`` and keeps
the base ``weight`` / ``bias`` Parameters as its own attributes, so the base state-dict keys do
not change (``...q_proj.weight`` stays ``...q_proj.weight``) and a base checkpoint still loads.
The adapter is ``lora_A.weight`` / ``lora_B.weight`` (peft's key names) plus ``lora_rng``, the
``(seed, offset)`` pair that determines its dropout masks. All math goes through the
``lightning_peft::lora_linear_*`` ops.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Optional, Union

import torch
from torch import nn

from lightning_peft.ops import lora_linear
from lightning_peft.ops.lora_grouped import lora_linear_grouped
from lightning_peft.quantization import is_quantized_linear
from lightning_peft.tuners.config import LayerTargetsConfig, register_config
from lightning_peft.tuners.injection import DEFAULT_ADAPTER, register_tuner
from lightning_peft.tuners.layers import LINEAR_TYPES, BaseLayerAdapter, LayerReplacementTuner, LinearAdapterLayer
from lightning_peft.tuners.lora_branch import LoraBranch
from lightning_peft.tuners.lora_conv import LoraConv, check_conv_supported
from lightning_peft.tuners.lora_embedding import LoraEmbedding
from lightning_peft.tuners.lora_init import is_principal_init, principal_factors, to_plain_lora

__all__ = ["LoraConfig", "LoraLinear", "LoraTuner"]

_PRINCIPAL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # what PiSSA / OLoRA start from


@register_config
class LoraConfig(LayerTargetsConfig):
    """LoRA settings, with HF peft's names and defaults.

    Args:
        r: rank of the update (> 0).
        lora_alpha: scaling numerator (> 0): the update is scaled by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: module names or suffixes (list), a regex matching whole names (str),
            or ``"all-linear"`` (every linear layer except the output head). Required.
        exclude_modules, layers_to_transform, layers_pattern: narrow the targets (see
            :class:`~lightning_peft.tuners.config.LayerTargetsConfig`).
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (train the
            biases of the adapted layers).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: the adapted model starts equal
            to the base), ``"gaussian"`` (A normal with std 1/r, B zero), ``"pissa"`` /
            ``"pissa_niter_<k>"`` / ``"olora"`` (A and B from the base weight's principal directions,
            which leave the base: see :mod:`~lightning_peft.tuners.lora_init`; linear layers only) or
            ``False`` (A and B both random: the adapted model starts different; for tests).
        fan_in_fan_out: the target stores its weight as ``[in, out]``; read from the layer type
            (GPT-2 ``Conv1D``), so it only exists for peft compatibility.
        use_dora: DoRA (a learned magnitude per output, see :mod:`~lightning_peft.tuners.dora`); linear
            layers only.
    """

    peft_type = "LORA"
    method_name = "LoRA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        super().validate()

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer (the rank), got {self.r!r}; typical values are 4-64")
        if not self.lora_alpha > 0:
            raise ValueError(f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha!r}; a common choice is 2 * r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}; use 0.0 to disable dropout")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian") and not is_principal_init(self.init_lora_weights):
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<k>' or 'olora', "
                f"got {self.init_lora_weights!r}"
            )
        if self.target_modules is None:
            raise ValueError(
                "LoraConfig.target_modules is not set: name the layers to adapt, e.g. "
                "target_modules=['q_proj', 'v_proj'], or target_modules='all-linear'"
            )

    @property
    def scaling(self) -> float:
        """Multiplier of the LoRA term."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(LoraBranch, LinearAdapterLayer):
    """A linear layer with LoRA updates (one per named adapter), in place of ``nn.Linear`` / ``Conv1D``.

    Args:
        base: the layer being adapted; its ``weight`` (and ``bias``) become this layer's.
        adapter: the first adapter's name; further ones come with :meth:`add_adapter`.
        r, scaling, dropout_p: rank, multiplier, branch dropout probability.
        init: ``True`` / ``"gaussian"`` / ``False`` / PiSSA / OLoRA (see :class:`LoraConfig`).
        seed: key of this adapter's dropout masks on this layer.

    Input ``[*, in_features]``, output ``[*, out_features]``.
    """

    def __init__(self, base: nn.Module, *, adapter: str = DEFAULT_ADAPTER, r: int, scaling: float, dropout_p: float,
                 init: Union[bool, str], seed: int) -> None:
        super().__init__(base)
        self.init_branches()
        self.add_adapter(adapter, r=r, scaling=scaling, dropout_p=dropout_p, init=init, seed=seed)

    def add_adapter(self, adapter: str, *, r: int, scaling: float, dropout_p: float, init: Union[bool, str], seed: int) -> None:
        """Add adapter ``adapter``'s branch (A ``[r, in]``, B ``[out, r]``)."""
        factory = {"device": self.weight.device, "dtype": self.branch_dtype()}
        principal = is_principal_init(init)
        self.add_branch(adapter, nn.Linear(self.in_features, r, bias=False, **factory), nn.Linear(r, self.out_features, bias=False, **factory),
                        r=r, scaling=scaling, dropout_p=dropout_p, init=False if principal else init, seed=seed)
        if principal:
            self._init_from_base(adapter, init)

    def remove_adapter(self, adapter: str) -> bool:
        super().remove_adapter(adapter)
        self.delete_branch(adapter)
        for kept in ("lora_A_initial", "lora_B_initial"):
            getattr(self, kept, {}).pop(adapter, None)
        return not self.r

    @torch.no_grad()
    def _init_from_base(self, adapter: str, init: str) -> None:
        """PiSSA / OLoRA: A and B from the base weight, which keeps the residual (see ``lora_init``)."""
        lora_a, lora_b, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        a, b = principal_factors(self.base_weight(), self.r[adapter], scaling, init)
        lora_a.copy_(a)
        lora_b.copy_(b)
        self.base_weight().copy_(self.base_weight().to(a.dtype) - scaling * (b @ a))
        # the starting point, for saving as a plain LoRA of the original weights (not saved itself)
        if not hasattr(self, "lora_A_initial"):
            self.lora_A_initial: dict[str, torch.Tensor] = {}
            self.lora_B_initial: dict[str, torch.Tensor] = {}
        self.lora_A_initial[adapter], self.lora_B_initial[adapter] = lora_a.detach().clone(), lora_b.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.mixed_rows(x)
        if rows is not None:
            return self.mixed_forward(x, rows)
        adapter = self.branch_to_apply()
        if adapter is None:
            return self.base_forward(x)
        return self.lora_op(x, self.bias, adapter)

    def _cast_for_op(self, x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        # Custom ops are invisible to autocast: cast like autocast would cast a linear.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.weight.dtype
        return [t.to(dtype) if t is not None else None for t in (x, *tensors)]

    def lora_op(self, x: torch.Tensor, bias: Optional[torch.Tensor], adapter: Optional[str] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scale ⊙ (x Wᵀ + scaling · dropout(x) Aᵀ Bᵀ) + bias`` of adapter ``adapter`` (None: the active one) through the
        LoRA op, ``[*, out]``; ``scale`` ``[out]`` (DoRA's) is optional."""
        adapter = adapter or self.active_adapter
        x, weight, bias, lora_a, lora_b, scale = self._cast_for_op(
            x, self.base_weight(), bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight, scale)
        return lora_linear(
            x, weight, bias, lora_a, lora_b,
            scaling=self.scaling[adapter], dropout_p=self.dropout_p[adapter], rng=self.lora_rng[adapter], training=self.training,
            scale=scale,
        )

    def mixed_forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A mixed batch: row ``i`` of ``x`` (leading dim) through adapter ``adapter_names[rows[i]]`` (-1: the base), one grouped op call."""
        adapters = self.adapter_names
        x, weight, bias, *factors = self._cast_for_op(
            x, self.base_weight(), self.bias, *(self.lora_A[a].weight for a in adapters), *(self.lora_B[a].weight for a in adapters))
        return lora_linear_grouped(
            x, weight, bias, factors[:len(adapters)], factors[len(adapters):],
            scalings=[self.scaling[a] for a in adapters], dropout_ps=[self.dropout_p[a] for a in adapters],
            rngs=[self.lora_rng[a] for a in adapters], adapter_index=rows, training=self.training,
        )

    def mixed_branches(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The LoRA terms alone of a mixed batch (row ``i``: adapter ``adapter_names[rows[i]]``, -1: none), ``[*, out]``,
        through the grouped op without a base weight; in the factors' dtype (autocast's under autocast)."""
        adapters = self.adapter_names
        lora_as, lora_bs = [self.lora_A[a].weight for a in adapters], [self.lora_B[a].weight for a in adapters]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else lora_as[0].dtype
        return lora_linear_grouped(
            x.to(dtype), None, None, [a.to(dtype) for a in lora_as], [b.to(dtype) for b in lora_bs],
            scalings=[self.scaling[a] for a in adapters], dropout_ps=[self.dropout_p[a] for a in adapters],
            rngs=[self.lora_rng[a] for a in adapters], adapter_index=rows, training=self.training,
        )

    def branch_dtype(self) -> torch.dtype:
        """The dtype new LoRA factors get: the base weight's (a quantized base overrides it)."""
        return self.weight.dtype

    def lora_branch(self, x: torch.Tensor, adapter: Optional[str] = None) -> torch.Tensor:
        """The LoRA term alone of adapter ``adapter`` (None: the active one), ``scaling · dropout(x) Aᵀ Bᵀ`` ``[*, out]``,
        through the LoRA op without a base weight; in the factors' dtype (autocast's under autocast). For layers whose
        base output comes from elsewhere."""
        adapter = adapter or self.active_adapter
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else lora_a.dtype
        x, lora_a, lora_b = (t.to(dtype) for t in (x, lora_a, lora_b))
        return lora_linear(
            x, None, None, lora_a, lora_b,
            scaling=self.scaling[adapter], dropout_p=self.dropout_p[adapter], rng=self.lora_rng[adapter], training=self.training,
        )

    @torch.no_grad()
    def delta_weight(self, adapter: Optional[str] = None) -> torch.Tensor:
        """``scaling · B A`` of adapter ``adapter`` (None: the active one) laid out like ``weight``
        (fp32 math for half-precision weights on CPU)."""
        adapter = adapter or self.active_adapter
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        compute_dtype = torch.float32 if (a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)) else a.dtype
        delta = (b.to(compute_dtype) @ a.to(compute_dtype)) * self.scaling[adapter]  # [out, in]
        return delta.t() if self.fan_in_fan_out else delta


@register_tuner("LORA")
class LoraTuner(LayerReplacementTuner):
    """Puts a LoRA layer where ``LoraConfig.target_modules`` says: :class:`LoraLinear` on linear layers,
    :class:`~lightning_peft.tuners.lora_embedding.LoraEmbedding` on embeddings,
    :class:`~lightning_peft.tuners.lora_conv.LoraConv` on 1-d / 2-d convolutions."""

    config: LoraConfig
    layer_types = LINEAR_TYPES + (nn.Embedding, nn.Conv1d, nn.Conv2d)
    holds_several_adapters = True
    quantized_kinds = ("4bit", "8bit")  # bitsandbytes Linear4bit / Linear8bitLt (QLoRA)

    def target_names(self, model: nn.Module) -> list[str]:
        names = super().target_names(model)
        principal = is_principal_init(self.config.init_lora_weights)
        for name in names:  # before any layer is built: a refusal leaves the model untouched
            module = model.get_submodule(name)
            if isinstance(module, LoraBranch):
                continue  # another adapter's layer: check_extendable decides
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                check_conv_supported(name, module)
            if self.config.use_dora and not isinstance(module, LINEAR_TYPES):
                raise ValueError(
                    f"use_dora=True adapts linear layers, but {name} is a {type(module).__name__}; leave it out of "
                    "target_modules (or use plain LoRA for it in a separate config)"
                )
            if principal and not (isinstance(module, LINEAR_TYPES) and module.weight.dtype in _PRINCIPAL_DTYPES):
                raise ValueError(
                    f"init_lora_weights={self.config.init_lora_weights!r} initialises from the weight of linear layers in "
                    f"floating point, but {name} is a {type(module).__name__} with {module.weight.dtype} weights; "
                    "target only linear layers (or use init_lora_weights=True)"
                )
        return names

    def make_layer(self, name: str, base: nn.Module) -> BaseLayerAdapter:
        cfg = self.config
        if isinstance(base, nn.Embedding):
            return LoraEmbedding(base, adapter=self.adapter_name, r=cfg.r, scaling=cfg.scaling, init=cfg.init_lora_weights)
        from lightning_peft.tuners.dora import DoraLinear  # dora.py builds on LoraLinear, defined above

        kind = LoraConv if isinstance(base, (nn.Conv1d, nn.Conv2d)) else DoraLinear if cfg.use_dora else LoraLinear
        if is_quantized_linear(base):  # a bitsandbytes layer (target_names refused any other quantized kind)
            from lightning_peft.tuners.lora_quantized import QuantizedDoraLinear, QuantizedLoraLinear

            kind = QuantizedDoraLinear if cfg.use_dora else QuantizedLoraLinear
        return kind(base, adapter=self.adapter_name, **self._branch_settings())

    def _branch_settings(self) -> dict:
        cfg = self.config
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: seed it for reproducible masks
        return dict(r=cfg.r, scaling=cfg.scaling, dropout_p=cfg.lora_dropout, init=cfg.init_lora_weights, seed=seed)

    # ---- a further named adapter on layers that already hold LoRA adapters

    @property
    def extendable_layer_types(self) -> tuple[type, ...]:  # type: ignore[override]
        return (LoraLinear, LoraConv, LoraEmbedding)

    @property
    def extendable_linear_types(self) -> tuple[type, ...]:  # type: ignore[override]
        return (LoraLinear,)

    def check_extendable(self, name: str, layer: BaseLayerAdapter) -> None:
        from lightning_peft.tuners.dora import DoraLinear

        assert isinstance(layer, LoraBranch)
        if self.adapter_name in layer.r:
            raise ValueError(f"{name} already has an adapter named {self.adapter_name!r}")
        if self.config.use_dora or isinstance(layer, DoraLinear):
            raise ValueError(
                f"{name} already holds LoRA adapter(s) {layer.adapter_names}; a layer with DoRA holds a single adapter, so "
                f"adapter {self.adapter_name!r} (use_dora={self.config.use_dora}) cannot be added to it. Give it other "
                "target_modules, or use plain LoRA (use_dora=False) for every adapter that shares layers"
            )
        if is_principal_init(self.config.init_lora_weights):
            raise ValueError(
                f"init_lora_weights={self.config.init_lora_weights!r} changes the base weight of {name}, which adapter(s) "
                f"{layer.adapter_names} were trained on; use it only for a model's first adapter (or init_lora_weights=True)"
            )
        if layer.merged:
            raise ValueError(f"{name} has adapter(s) {layer.merged_adapters} merged into its weight; unmerge_adapter() before adding one")

    def extend_layer(self, name: str, layer: BaseLayerAdapter) -> None:
        layer.add_adapter(self.adapter_name, **self._branch_settings())  # type: ignore[operator]

    def set_active(self, model: nn.Module, active: bool) -> None:
        """Make this adapter the one its layers apply (``active``), or let the layers it shares go to no adapter."""
        for _, layer in self.layers(model):
            if active:
                layer.set_active_adapter(self.adapter_name)
            elif layer.active_adapter == self.adapter_name:
                layer.set_active_adapter(None)

    def to_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # peft's files leave the adapter name out of the keys: "<layer>.lora_A.weight"
        return super().to_peft_state_dict(model, {self._file_key(k): v for k, v in state.items()})

    def from_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = super().from_peft_state_dict(model, state)
        ours = {self._file_key(k): k for k in self.adapter_parameter_names(model)}
        return {ours.get(k, k): v for k, v in state.items()}

    def _file_key(self, key: str) -> str:
        """Our key of this adapter's tensor without the adapter name after the branch's module name (peft's file key)."""
        return re.sub(rf"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.{re.escape(self.adapter_name)}(?=\.|$)", r".\1", key)

    def extra_trainable_parameter_names(self, model: nn.Module) -> list[str]:
        if self.config.bias == "all":
            return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if self.config.bias == "lora_only":
            return [f"{name}.bias" for name, layer in self.layers(model) if layer.bias is not None]
        return []

    def as_plain_lora(self, model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoraConfig]:
        """A PiSSA / OLoRA adapter state as an ordinary LoRA of the original weights (rank 2r), and its config.

        peft's ``path_initial_model_for_weight_conversion`` conversion, from the starting factors each
        layer kept (see :func:`~lightning_peft.tuners.lora_init.to_plain_lora`).
        """
        cfg = self.config
        if not is_principal_init(cfg.init_lora_weights):
            raise ValueError(
                f"only adapters initialised with PiSSA / OLoRA convert to a plain LoRA (this one has "
                f"init_lora_weights={cfg.init_lora_weights!r}); save it without path_initial_model_for_weight_conversion"
            )
        state = dict(state)
        adapter = self.adapter_name
        for name, layer in self.layers(model):
            a, b = to_plain_lora(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                                 layer.lora_A_initial[adapter], layer.lora_B_initial[adapter])
            state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"] = a.detach(), b.detach()
        alpha = cfg.lora_alpha * (math.sqrt(2) if cfg.use_rslora else 2)  # the same scaling at twice the rank
        return state, dataclasses.replace(cfg, r=2 * cfg.r, lora_alpha=alpha, init_lora_weights=True)


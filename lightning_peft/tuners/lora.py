"""LoRA: ``W x + b  ->  W x + b + scaling · B A dropout(x)`` with A ``[r, in]``, B ``[out, r]``.

:class:`LoraLinear` takes the place of an ``nn.Linear`` or a transformers ``Conv1D`` and keeps
the base ``weight`` / ``bias`` Parameters as its own attributes, so the base state-dict keys do
not change (``...q_proj.weight`` stays ``...q_proj.weight``) and a base checkpoint still loads.
The adapter is ``lora_A.weight`` / ``lora_B.weight`` (peft's key names) plus ``lora_rng``, the
``(seed, offset)`` pair that determines its dropout masks. All math goes through the
``lightning_peft::lora_linear_*`` ops.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional, Union

import torch
from torch import nn

from lightning_peft.ops import lora_linear
from lightning_peft.tuners.config import PeftConfig, register_config
from lightning_peft.tuners.injection import (
    AdapterLayer,
    ModuleReplacementTuner,
    describe_available_modules,
    match_module_names,
    register_tuner,
)

__all__ = ["LoraConfig", "LoraLinear", "LoraTuner"]

try:  # GPT-2 style layers store weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain nn.Modules
    Conv1D = None  # type: ignore[assignment,misc]

_LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
_LAYER_CONTAINER_NAMES = ("layers", "h", "layer", "blocks", "block")
_OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output", "qa_outputs")


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """LoRA settings, with HF peft's names and defaults.

    Args:
        r: rank of the update (> 0).
        lora_alpha: scaling numerator (> 0): the update is scaled by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: module names or suffixes (list), a regex matching whole names (str),
            or ``"all-linear"`` (every linear layer except the output head).
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (train the
            biases of the adapted layers).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: the adapted model starts equal
            to the base), ``"gaussian"`` (A normal with std 1/r, B zero) or ``False`` (A and B both
            random: the adapted model starts different; for tests).
        fan_in_fan_out: the target stores its weight as ``[in, out]`` (GPT-2 ``Conv1D``; set
            automatically for Conv1D).
        layers_to_transform: only adapt blocks with these indices (``layers.<i>.`` / ``h.<i>.``).
        layers_pattern: the container name holding the blocks, when it is not one of
            layers/h/layer/blocks/block.
    """

    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, Literal["gaussian"]] = True
    fan_in_fan_out: bool = False
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)

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
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if self.target_modules is None:
            raise ValueError(
                "LoraConfig.target_modules is not set: name the layers to adapt, e.g. "
                "target_modules=['q_proj', 'v_proj'], or target_modules='all-linear'"
            )
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    @property
    def scaling(self) -> float:
        """Multiplier of the LoRA term."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(AdapterLayer):
    """A linear layer with a LoRA update, in place of ``nn.Linear`` / ``Conv1D``.

    Args:
        base: the layer being adapted; its ``weight`` (and ``bias``) become this layer's.
        r, scaling, dropout_p: rank, multiplier, branch dropout probability.
        init: ``True`` / ``"gaussian"`` / ``False`` (see :class:`LoraConfig`).
        fan_in_fan_out: ``base.weight`` is ``[in, out]``.
        seed: key of this layer's dropout masks.

    Input ``[*, in_features]``, output ``[*, out_features]``.
    """

    adapter_parameter_names = ("lora_A.weight", "lora_B.weight")
    adapter_buffer_names = ("lora_rng",)

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int,
        scaling: float,
        dropout_p: float,
        init: Union[bool, str],
        fan_in_fan_out: bool,
        seed: int,
    ) -> None:
        super().__init__()
        weight: nn.Parameter = base.weight
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self.weight = weight
        self.bias = base.bias
        self.r, self.scaling, self.dropout_p = r, scaling, dropout_p
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self._init_lora(init)
        self.register_buffer("lora_rng", torch.tensor([seed, 0], dtype=torch.int64, device=weight.device))
        self.merged = False
        self.adapter_enabled = True
        # Kept out of the module tree (no duplicate state-dict entries); handed back by restore_base().
        self.__dict__["_base_layer"] = base

    @torch.no_grad()
    def _init_lora(self, init: Union[bool, str]) -> None:
        if init is False:
            return  # nn.Linear's default init for both: a deliberately non-identity start
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _base_weight_out_in(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._base_weight_out_in(), self.bias
        if self.merged or not self.adapter_enabled:
            return nn.functional.linear(x, weight, bias)
        lora_a, lora_b = self.lora_A.weight, self.lora_B.weight
        # Custom ops are invisible to autocast: cast like autocast would cast a linear.
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = weight.dtype
        x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(dtype) if bias is not None else None
        return lora_linear(
            x, weight, bias, lora_a, lora_b,
            scaling=self.scaling, dropout_p=self.dropout_p, rng=self.lora_rng, training=self.training,
        )

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` laid out like ``weight`` (fp32 math for half-precision weights on CPU)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        compute_dtype = torch.float32 if (a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)) else a.dtype
        delta = (b.to(compute_dtype) @ a.to(compute_dtype)) * self.scaling  # [out, in]
        return delta.t() if self.fan_in_fan_out else delta

    def _compute_dtype(self) -> torch.dtype:
        # Half-precision add/sub on CPU loses more than needed: do the arithmetic in fp32.
        return torch.float32 if self.weight.device.type == "cpu" else self.weight.dtype

    @torch.no_grad()
    def check_mergeable(self) -> None:
        """Raise ValueError if merging would write NaN/inf into ``weight`` (writes nothing)."""
        merged = (self.weight.to(self._compute_dtype()) + self.delta_weight()).to(self.weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging the LoRA layer {self.extra_repr()} would put NaN/inf into its weight "
                "(broken adapter weights, or an overflow in this dtype); nothing was merged"
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (forward then skips the LoRA branch). No-op if merged."""
        if self.merged:
            return
        self.weight.copy_((self.weight.to(self._compute_dtype()) + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``weight`` again. No-op if not merged."""
        if not self.merged:
            return
        base = self.weight.to(self._compute_dtype()) - self.delta_weight()
        self.weight.copy_(base.to(self.weight.dtype))
        self.merged = False

    def restore_base(self) -> nn.Module:
        base = self.__dict__["_base_layer"]
        base.weight, base.bias = self.weight, self.bias  # in case .to() replaced the Parameters
        return base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}, dropout_p={self.dropout_p:g}, merged={self.merged}"


def _layer_index(name: str, patterns: Optional[Union[list[str], str]]) -> Optional[int]:
    """The block index in a name like ``model.layers.3.self_attn.q_proj`` (None if none)."""
    containers = [patterns] if isinstance(patterns, str) else list(patterns or _LAYER_CONTAINER_NAMES)
    for container in containers:
        match = _block_index_regex(container).search(name)
        if match:
            return int(match.group(1))
    return None


def _block_index_regex(container: str):
    import re

    return re.compile(rf"(?:^|\.){re.escape(container)}\.(\d+)(?:\.|$)")


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head ("all-linear" skips it): HF's output embeddings, else a known head name."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {n for n, m in model.named_modules() if m is out}
    heads |= {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in _OUTPUT_HEAD_NAMES}
    return heads


@register_tuner("LORA")
class LoraTuner(ModuleReplacementTuner):
    """Puts :class:`LoraLinear` layers where ``LoraConfig.target_modules`` says."""

    config: LoraConfig
    can_merge = True

    def _target_names(self, model: nn.Module) -> list[str]:
        cfg = self.config
        names = [n for n, _ in model.named_modules() if n]
        if cfg.target_modules == "all-linear":
            heads = _output_head_names(model)
            targets = [n for n, m in model.named_modules() if n and isinstance(m, _LINEAR_TYPES) and n not in heads
                       and not any(n.startswith(h + ".") for h in heads)]
        else:
            targets = match_module_names(names, cfg.target_modules)
        if cfg.exclude_modules:
            excluded = set(match_module_names(targets, cfg.exclude_modules))
            targets = [t for t in targets if t not in excluded]
        if cfg.layers_to_transform is not None:
            wanted = set(cfg.layers_to_transform)
            targets = [t for t in targets if _layer_index(t, cfg.layers_pattern) in wanted]
        if cfg.modules_to_save:
            trained_whole = set(match_module_names(names, list(cfg.modules_to_save)))
            targets = [t for t in targets if t not in trained_whole]
        return targets

    def build_replacements(self, model: nn.Module) -> dict[str, AdapterLayer]:
        cfg = self.config
        targets = self._target_names(model)
        if not targets:
            raise ValueError(
                f"target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}"
                + (f" in layers {cfg.layers_to_transform}" if cfg.layers_to_transform is not None else "")
                + f". Linear layers it has: {describe_available_modules(model, _LINEAR_TYPES)}"
            )
        unsupported = [(t, type(model.get_submodule(t)).__name__) for t in targets if not isinstance(model.get_submodule(t), _LINEAR_TYPES)]
        if unsupported:
            shown = ", ".join(f"{n} ({k})" for n, k in unsupported[:5])
            raise TypeError(
                f"LoRA can adapt nn.Linear and transformers Conv1D layers, but target_modules={cfg.target_modules!r} "
                f"also matched: {shown}. Name the linear layers inside them instead, e.g. one of: "
                f"{describe_available_modules(model, _LINEAR_TYPES)}"
            )
        replacements: dict[str, AdapterLayer] = {}
        for name in targets:
            base = model.get_submodule(name)
            fan_in_fan_out = cfg.fan_in_fan_out
            if Conv1D is not None and isinstance(base, Conv1D) and not fan_in_fan_out:
                fan_in_fan_out = True  # Conv1D stores [in, out]; peft does the same switch
            elif isinstance(base, nn.Linear) and fan_in_fan_out:
                warnings.warn(f"fan_in_fan_out=True but {name} is an nn.Linear ([out, in] weight); using fan_in_fan_out=False")
                fan_in_fan_out = False
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: seed it for reproducible masks
            replacements[name] = LoraLinear(
                base, r=cfg.r, scaling=cfg.scaling, dropout_p=cfg.lora_dropout,
                init=cfg.init_lora_weights, fan_in_fan_out=fan_in_fan_out, seed=seed,
            )
        return replacements

    def extra_trainable_parameter_names(self, model: nn.Module) -> list[str]:
        if self.config.bias == "all":
            return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if self.config.bias == "lora_only":
            return [f"{name}.bias" for name, layer in self.layers(model) if layer.bias is not None]
        return []

    def dropout_rng_buffers(self, model: nn.Module) -> list[torch.Tensor]:
        return [layer.lora_rng for _, layer in self.layers(model)]

    def lora_layers(self, model: nn.Module) -> list[LoraLinear]:
        return [layer for _, layer in self.layers(model)]  # type: ignore[misc]

    def merge(self, model: nn.Module) -> None:
        layers = [layer for layer in self.lora_layers(model) if not layer.merged]
        for layer in layers:  # check all first, so a bad adapter leaves every weight untouched
            layer.check_mergeable()
        for layer in layers:
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        for layer in self.lora_layers(model):
            layer.unmerge()

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Run the base model alone: un-merge merged layers, skip LoRA branches; restore on exit."""
        layers = self.lora_layers(model)
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

"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations, with HF peft's names and semantics.

A target layer ``y = W x + b`` becomes ``y = (W x + b) ⊙ l`` (``l [out]``, attention-style targets)
or, for the layers named in ``feedforward_modules``, ``y = W (x ⊙ l) + b`` (``l [in]``). The
vectors start at one, so the adapted model starts equal to the base. Merging multiplies them
into the weight (and, for output scaling, the bias); it is undone by dividing again, which is
refused where a vector holds a zero. peft's file key is ``<layer>.ia3_l``: ``[out, 1]`` or ``[1, in]``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from lightning_peft.tuners.config import LayerTargetsConfig, register_config
from lightning_peft.tuners.injection import DEFAULT_ADAPTER, AdapterLayer, register_tuner
from lightning_peft.tuners.layers import LayerReplacementTuner, LinearAdapterLayer
from lightning_peft.tuners.targets import match_module_names

__all__ = ["IA3Config", "IA3Linear", "IA3Tuner"]

#: peft's defaults per transformers ``model_type``: (target_modules, feedforward_modules).
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}


@register_config
class IA3Config(LayerTargetsConfig):
    """(IA)³ settings, with HF peft's names and defaults.

    Args:
        target_modules: the layers to rescale (names / suffixes, a whole-name regex, or
            ``"all-linear"``); None: peft's defaults for the model type (Llama, Mistral, Qwen2,
            GPT-2, BERT, RoBERTa).
        feedforward_modules: those targets whose *input* is rescaled (the feed-forward output
            projections in the paper); the others' output is. Must be among ``target_modules``.
            None with default targets: peft's defaults; None otherwise: no feed-forward targets.
        init_ia3_weights: start the vectors at one (True) or random normal (False, for tests).
        fan_in_fan_out: read from the layer type (GPT-2 ``Conv1D``); kept for peft compatibility.

    Example::

        model = get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]))
    """

    peft_type = "IA3"
    method_name = "IA3"
    feedforward_modules: Optional[Union[list[str], str]] = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False

    def validate(self) -> None:
        super().validate()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if self.init_ia3_weights not in (True, False):
            raise ValueError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise ValueError(
                    f"IA3Config.feedforward_modules {outside} are not among target_modules {self.target_modules}: "
                    "every feed-forward module must also be a target (add it to target_modules, or remove it)"
                )


class IA3Linear(LinearAdapterLayer):
    """A linear layer whose input (``feedforward``) or output is rescaled by a learned vector ``ia3_l``.

    Args:
        base: the ``nn.Linear`` / ``Conv1D`` being adapted.
        feedforward: rescale the input (``ia3_l [1, in]``) instead of the output (``ia3_l [out, 1]``).
        init_ones: start at one (the identity); else standard normal.
    """

    adapter_parameter_names = ("ia3_l",)
    can_merge = True

    def __init__(self, base: nn.Module, *, feedforward: bool, init_ones: bool) -> None:
        super().__init__(base)
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.ia3_l = nn.Parameter(torch.ones(shape, **factory) if init_ones else torch.randn(shape, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_active():
            return self.base_forward(x)
        scale = self.ia3_l.flatten().to(x.dtype)
        if self.is_feedforward:
            return self.base_forward(x * scale)  # [*, in] ⊙ [in]
        return self.base_forward(x) * scale  # [*, out] ⊙ [out]

    def _weight_scale(self) -> torch.Tensor:
        """``ia3_l`` shaped to multiply ``weight`` (``[out, 1]`` rows or ``[1, in]`` columns, transposed for Conv1D)."""
        scale = self.ia3_l.to(self._compute_dtype())
        return scale.t() if self.fan_in_fan_out else scale

    @torch.no_grad()
    def _rescale(self, divide: bool) -> None:
        scale = self._weight_scale()
        weight = self.weight.to(self._compute_dtype())
        self.weight.copy_((weight / scale if divide else weight * scale).to(self.weight.dtype))
        if self.bias is not None and not self.is_feedforward:  # output scaling scales the bias too
            bias_scale = self.ia3_l.flatten().to(self._compute_dtype())
            bias = self.bias.to(self._compute_dtype())
            self.bias.copy_((bias / bias_scale if divide else bias * bias_scale).to(self.bias.dtype))

    @torch.no_grad()
    def check_mergeable(self, adapter: Optional[str] = None) -> None:
        if not torch.isfinite(self.weight.to(self._compute_dtype()) * self._weight_scale()).all():
            raise ValueError(f"merging the IA3 layer ({self.extra_repr()}) would put NaN/inf into its weight; nothing was merged")

    @torch.no_grad()
    def merge(self, adapter: Optional[str] = None) -> None:
        if not self.merged:
            self._rescale(divide=False)
            self.merged = True

    def check_unmergeable(self) -> None:
        if (self.ia3_l == 0).any():
            raise ValueError(
                f"cannot unmerge the IA3 layer ({self.extra_repr()}): its scaling vector holds zeros, so the "
                "original weights were lost when it was merged; nothing was unmerged. Reload the base model instead"
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.check_unmergeable()
            self._rescale(divide=True)
            self.merged = False

    def adapter_repr(self) -> str:
        return f"feedforward={self.is_feedforward}"


@register_tuner("IA3")
class IA3Tuner(LayerReplacementTuner):
    """Puts :class:`IA3Linear` layers on ``IA3Config.target_modules`` (input scaling for feed-forward ones)."""

    config: IA3Config

    def __init__(self, config: IA3Config, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__(config, adapter_name)
        #: The feed-forward targets as given, or peft's defaults for the model type (set by inject).
        self.feedforward_modules: Optional[Union[list[str], str]] = config.feedforward_modules

    def _model_defaults(self, model: nn.Module) -> Optional[tuple[list[str], list[str]]]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return DEFAULT_TARGETS.get(model_type) if isinstance(model_type, str) else None

    def default_targets(self, model: nn.Module) -> list[str]:
        defaults = self._model_defaults(model)
        if defaults is None:
            raise ValueError(
                f"IA3Config.target_modules is not set and {type(model).__name__} has no default IA3 targets (known model "
                f"types: {', '.join(DEFAULT_TARGETS)}); name them, e.g. target_modules=['k_proj', 'v_proj', 'down_proj'], "
                "feedforward_modules=['down_proj']"
            )
        return match_module_names([n for n, _ in model.named_modules() if n], defaults[0])

    def build_replacements(self, model: nn.Module) -> dict[str, AdapterLayer]:
        feedforward = self.config.feedforward_modules
        if feedforward is None and self.config.target_modules is None:  # peft's defaults come as a pair
            feedforward = (self._model_defaults(model) or ([], []))[1]
        self.feedforward_modules = feedforward
        return super().build_replacements(model)

    def make_layer(self, name: str, base: nn.Module) -> IA3Linear:
        feedforward = bool(match_module_names([name], self.feedforward_modules))
        return IA3Linear(base, feedforward=feedforward, init_ones=self.config.init_ia3_weights)

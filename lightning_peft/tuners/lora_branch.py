"""The LoRA branch every LoRA layer kind shares: ``lora_A`` / ``lora_B``, rank, scaling, dropout key, init."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

__all__ = ["LoraBranch"]


class LoraBranch:
    """Mixin of a LoRA layer with modules ``lora_A`` (in -> r) and ``lora_B`` (r -> out), peft's key names.

    Use before the layer kind: ``class LoraLinear(LoraBranch, LinearAdapterLayer)``.
    """

    adapter_parameter_names = ("lora_A.weight", "lora_B.weight")
    adapter_buffer_names = ("lora_rng",)
    dropout_rng_buffer_names = ("lora_rng",)
    can_merge = True

    def add_branch(self, lora_A: nn.Module, lora_B: nn.Module, *, r: int, scaling: float, dropout_p: float,
                   init: Union[bool, str], seed: int) -> None:
        """Attach the branch; ``init``: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal with
        std 1/r, B zero) or ``False`` (both keep their random default init); ``seed`` keys the dropout masks."""
        self.r, self.scaling, self.dropout_p = r, scaling, dropout_p
        self.lora_A, self.lora_B = lora_A, lora_B
        if init is not False:
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(lora_A.weight, std=1.0 / r)
                else:
                    nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(lora_B.weight)
        self.register_buffer("lora_rng", torch.tensor([seed, 0], dtype=torch.int64, device=lora_A.weight.device))

    def adapter_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout_p={self.dropout_p:g}"

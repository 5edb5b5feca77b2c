"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d``, in peft's layout.

``conv(x) + scaling · B(A(dropout(x)))`` where ``lora_A`` is a convolution ``in -> r`` with the base's
kernel, stride and padding and ``lora_B`` a 1x1 convolution ``r -> out``, both without bias
(peft's ``lora_A.weight [r, in, *kernel]`` / ``lora_B.weight [out, r, 1, ...]``). Merging adds
``scaling · B ∘ A`` (``[out, in, *kernel]``). Grouped or dilated convolutions and padding modes
other than zeros are refused: merging would not be exact (peft warns for groups and silently
ignores dilation).

Dropout masks are drawn from a generator keyed by the layer's ``(seed, offset)`` buffer, like
the LoRA op's, so a resumed run repeats them; on a GPU the key is read on the host once per call.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from lightning_peft.tuners.injection import DEFAULT_ADAPTER
from lightning_peft.tuners.layers import ConvAdapterLayer
from lightning_peft.tuners.lora_branch import LoraBranch

__all__ = ["LoraConv", "check_conv_supported"]

_CONV_BY_DIMS = {3: nn.Conv1d, 4: nn.Conv2d}  # weight.dim() -> conv class


def check_conv_supported(name: str, base: nn.Module) -> None:
    """Raise ValueError naming what LoRA cannot adapt exactly in the convolution ``name``."""
    problems = []
    if base.groups != 1:
        problems.append(f"groups={base.groups}")
    if any(d != 1 for d in base.dilation):
        problems.append(f"dilation={base.dilation}")
    if base.padding_mode != "zeros":
        problems.append(f"padding_mode={base.padding_mode!r}")
    if problems:
        raise ValueError(
            f"LoRA supports plain convolutions (groups=1, dilation=1, zero padding), but {name} has "
            f"{', '.join(problems)}; leave it out of target_modules (or add it to exclude_modules)"
        )


def _keyed_dropout(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
    """``x`` with each element dropped with probability ``p`` (kept ones scaled), the mask a function of ``rng``."""
    seed, offset = (int(v) for v in rng.tolist())
    generator = torch.Generator(device="cpu").manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (1 << 63))
    keep = torch.rand(x.shape, generator=generator) >= p
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)


class LoraConv(LoraBranch, ConvAdapterLayer):
    """A ``Conv1d`` / ``Conv2d`` with a LoRA branch.

    Args:
        base: the convolution being adapted (checked with :func:`check_conv_supported` first).
        r, scaling, dropout_p: rank, multiplier, branch dropout probability.
        init: ``True`` (A Kaiming-uniform, B zero) / ``"gaussian"`` (A normal, std 1/r) / ``False`` (random).
        seed: key of this layer's dropout masks.
    """

    def __init__(self, base: nn.Module, *, adapter: str = DEFAULT_ADAPTER, r: int, scaling: float, dropout_p: float,
                 init: Union[bool, str], seed: int) -> None:
        super().__init__(base)
        self.kernel_args = (base.kernel_size, base.stride, base.padding)
        self.init_branches()
        self.add_adapter(adapter, r=r, scaling=scaling, dropout_p=dropout_p, init=init, seed=seed)

    def add_adapter(self, adapter: str, *, r: int, scaling: float, dropout_p: float, init: Union[bool, str], seed: int) -> None:
        """Add adapter ``adapter``'s branch (A a conv ``in -> r`` with the base's kernel, B a 1x1 conv ``r -> out``)."""
        conv = _CONV_BY_DIMS[self.weight.dim()]
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        ones = (1,) * (self.weight.dim() - 2)  # lora_B: a 1x1 convolution
        self.add_branch(adapter, conv(self.in_channels, r, *self.kernel_args, bias=False, **factory),
                        conv(r, self.out_channels, ones, ones, bias=False, **factory),
                        r=r, scaling=scaling, dropout_p=dropout_p, init=init, seed=seed)

    def remove_adapter(self, adapter: str) -> bool:
        super().remove_adapter(adapter)
        self.delete_branch(adapter)
        return not self.r

    def branch_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """Adapter ``adapter``'s term ``scaling · B(A(dropout(x)))``, ``[N, out, *spatial]``."""
        if self.training and self.dropout_p[adapter] > 0:
            x = _keyed_dropout(x, self.dropout_p[adapter], self.lora_rng[adapter])
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        return lora_b(lora_a(x.to(lora_a.weight.dtype))) * self.scaling[adapter]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_branch_terms(self.base_forward(x), x)

    @torch.no_grad()
    def delta_weight(self, adapter: Optional[str] = None) -> torch.Tensor:
        """``scaling · B ∘ A`` of adapter ``adapter`` (None: the active one), ``[out, in, *kernel]`` (fp32 math for half
        precision on CPU)."""
        adapter = adapter or self.active_adapter
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = torch.float32 if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return torch.einsum("or,ri...->oi...", b.to(dtype).flatten(1), a.to(dtype)) * self.scaling[adapter]

"""DoRA (Liu et al., 2024): LoRA with a learned magnitude per output, peft's ``LoraConfig(use_dora=True)``.

``y = b + c ⊙ (x Wᵀ + s · dropout(x) Aᵀ Bᵀ)`` with ``c = m / ‖W + s B A‖`` (row norms, treated as a
constant in backward, as peft does) and ``m = lora_magnitude_vector [out]``, initialised to the row
norms so the adapted model starts as the base. The whole expression is the LoRA op with its
``scale`` argument, so DoRA runs through the same kernels: the scale is folded into the op's
products and its gradient formed from the saved output (no extra pass over the input, no
``[N, out]`` tensor kept besides the output). peft computes the
same at dropout 0; with dropout it also feeds the *dropped* input through the base weight for the
``(c - 1)`` part (a second base GEMM), which this layer does not: its dropout acts on the LoRA
branch only.

The row norms never materialise ``B A`` or ``W + s B A`` (``[out, in]``):
``‖W_o + s (BA)_o‖² = ‖W_o‖² + 2 s B_o · (A W_oᵀ) + s² B_o (A Aᵀ) B_oᵀ`` needs the ``[out, r]``
product ``W Aᵀ`` and the ``r × r`` Gram matrix; ``‖W_o‖²`` is kept while the frozen weight is unchanged.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from lightning_peft.tuners.injection import DEFAULT_ADAPTER
from lightning_peft.tuners.lora import LoraLinear

__all__ = ["DoraLinear"]


class DoraLinear(LoraLinear):
    """A LoRA linear layer with DoRA's magnitude vector (``lora_magnitude_vector [out]``, peft's key).

    Args: as :class:`~lightning_peft.tuners.lora.LoraLinear`.
    """

    def __init__(self, base: nn.Module, *, adapter: str = DEFAULT_ADAPTER, r: int, scaling: float, dropout_p: float,
                 init: Union[bool, str], seed: int) -> None:
        super().__init__(base, adapter=adapter, r=r, scaling=scaling, dropout_p=dropout_p, init=init, seed=seed)
        self.dora_adapter = adapter  # a DoRA layer holds this one adapter
        self._weight_sq: tuple[tuple, torch.Tensor] | None = None  # ((weight version, device, dtype), ‖W_o‖² [out])
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(self.row_norms())
        self.register_buffer("merged_scale", torch.ones_like(self.lora_magnitude_vector), persistent=False)

    @torch.no_grad()
    def row_norms(self) -> torch.Tensor:
        """``‖W_o + s (B A)_o‖`` for every output ``o``, ``[out]`` (fp32 on CPU for half precision), no grad."""
        w = self.base_weight()
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) and w.device.type == "cpu" else w.dtype
        adapter = self.dora_adapter
        w, a, b = w.to(dtype), self.lora_A[adapter].weight.to(dtype), self.lora_B[adapter].weight.to(dtype)
        key = (self.weight._version, w.device, w.dtype)
        if self._weight_sq is None or self._weight_sq[0] != key:  # the weight is frozen: usually computed once
            self._weight_sq = (key, w.square().sum(1))
        cross = (b * (w @ a.t())).sum(1)  # B_o · (A W_oᵀ), [out]
        quad = ((b @ (a @ a.t())) * b).sum(1)  # B_o (A Aᵀ) B_oᵀ, [out]
        s = self.scaling[adapter]
        return (self._weight_sq[1] + 2 * s * cross + s * s * quad).clamp_min(0).sqrt().to(self.branch_dtype())

    def adapter_parameter_names_of(self, adapter: str) -> list[str]:
        return super().adapter_parameter_names_of(adapter) + ["lora_magnitude_vector"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed_batch is not None:
            raise ValueError("DoRA adapters cannot serve a mixed batch (adapter_names=...); run one adapter at a time with set_adapter()")
        if self.branch_to_apply() is None:
            return self.base_forward(x)
        # scale ⊙ (x Wᵀ + s · dropout(x) Aᵀ Bᵀ) + bias in one op call: the scale is folded into its products
        return self.lora_op(x, self.bias, scale=self.magnitude_scale())

    def magnitude_scale(self) -> torch.Tensor:
        """``c = m / ‖W + s B A‖`` per output, ``[out]``: differentiable in ``m``, the norm a constant to autograd."""
        return self.lora_magnitude_vector / self.row_norms()

    def forget_weight_norms(self) -> None:
        """Drop the kept ``‖W_o‖²``: call after the base weight was replaced by another tensor object."""
        self._weight_sq = None

    def _merge_scale(self) -> torch.Tensor:
        return (self.lora_magnitude_vector.detach() / self.row_norms()).to(self._compute_dtype())

    @torch.no_grad()
    def check_mergeable(self, adapter: Optional[str] = None) -> None:
        merged = self._merge_scale()[:, None] * (self.base_weight().to(self._compute_dtype()) + self._delta_out_in())
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging the DoRA layer ({self.extra_repr()}) would put NaN/inf into its weight; nothing was merged")

    def _delta_out_in(self) -> torch.Tensor:
        delta = self.delta_weight().to(self._compute_dtype())
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``c ⊙ (W + s B A)`` for the base weight ``W [out, in]``, in the compute dtype, with the current ``c``,
        which is kept for :meth:`unmerged_weight`."""
        scale = self._merge_scale()
        self.merged_scale.copy_(scale.to(self.merged_scale.dtype))
        return scale[:, None] * (weight.to(self._compute_dtype()) + self._delta_out_in())

    @torch.no_grad()
    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W / c - s B A`` for a merged weight ``[out, in]``, in the compute dtype, with the ``c`` kept at merging."""
        return weight.to(self._compute_dtype()) / self.merged_scale.to(self._compute_dtype())[:, None] - self._delta_out_in()

    @torch.no_grad()
    def merge(self, adapter: Optional[str] = None) -> None:
        """``W <- c ⊙ (W + s B A)`` with the current ``c``, kept for :meth:`unmerge` (the bias is unchanged)."""
        if self.merged:
            return
        self.base_weight().copy_(self.merged_weight(self.base_weight()).to(self.weight.dtype))
        self.merged = True

    def check_unmergeable(self) -> None:
        if (self.merged_scale == 0).any():
            raise ValueError(f"cannot unmerge the DoRA layer ({self.extra_repr()}): a magnitude is 0; nothing was unmerged")

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.check_unmergeable()
        self.base_weight().copy_(self.unmerged_weight(self.base_weight()).to(self.weight.dtype))
        self.merged = False

    def adapter_repr(self) -> str:
        return super().adapter_repr() + ", dora=True"

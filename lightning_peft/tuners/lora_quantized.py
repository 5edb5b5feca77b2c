"""LoRA and DoRA on a bitsandbytes-quantized base layer (QLoRA): ``Linear4bit`` (nf4 / fp4, double
quantisation, any compute dtype) and ``Linear8bitLt``.

The base output is the bitsandbytes layer's own forward (its kernels, its compute dtype); the LoRA
term is added through the LoRA op without a base weight, in the adapter's dtype (fp32, as peft
keeps it on a quantized base; autocast's under autocast). Like every LoRA layer this one owns the
base ``weight`` / ``bias``: the quantized weight object itself (a ``Params4bit`` with its
``quant_state`` / an ``Int8Params``), and it writes the base layer's quantization entries into the
state dict, so the keys (``q_proj.weight``, ``q_proj.weight.absmax``, ..., ``q_proj.SCB``) are the
quantized base model's.

Merging dequantizes the weight, merges in fp32 and quantizes the result again (bitsandbytes'
own quantization, the layer's settings); the requantisation error is reported in a warning.
Unmerging does the same in reverse, so a merge / unmerge round trip gives back the base weight
only up to two requantisations (as in peft).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from lightning_peft.quantization import bnb_kind, dequantize_weight, requantize_weight
from lightning_peft.tuners.dora import DoraLinear
from lightning_peft.tuners.lora import LoraLinear

__all__ = ["QuantizedLoraLinear", "QuantizedDoraLinear"]


class _QuantizedBase:
    """What a LoRA layer on a bitsandbytes base does differently: base output, dense weight, merging storage.

    Use before the LoRA layer kind: ``class QuantizedLoraLinear(_QuantizedBase, LoraLinear)``.
    """

    def _bnb_layer(self) -> nn.Module:
        """The bitsandbytes base layer, holding this layer's current ``weight`` / ``bias`` and train / eval mode."""
        base = self.__dict__["_base_layer"]
        if base.weight is not self.weight or base.bias is not self.bias:  # e.g. after .to() replaced them
            base.weight, base.bias = self.weight, self.bias
        base.training = self.training  # outside the module tree, so .train() / .eval() do not reach it; its kernels differ
        return base

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bitsandbytes layer's own forward: ``[*, in] -> [*, out]`` (in ``x``'s dtype)."""
        return self._bnb_layer()(x)

    def base_weight(self) -> torch.Tensor:
        """The dequantized base weight ``[out, in]`` (a new float tensor, no grad)."""
        return dequantize_weight(self._bnb_layer())

    def branch_dtype(self) -> torch.dtype:
        # a packed-integer weight has no float dtype to follow: nn.Linear's default, as peft's factors get
        return torch.get_default_dtype()

    def _compute_dtype(self) -> torch.dtype:
        return torch.float32  # dequantize, merge and requantize in fp32

    def quantized_kind(self) -> str:
        """``"4bit"`` or ``"8bit"``."""
        kind = bnb_kind(self.__dict__["_base_layer"])
        assert kind is not None
        return kind

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # the base layer's entries first: weight, bias and its quantization state (absmax, quant_map, SCB, ...)
        self._bnb_layer()._save_to_state_dict(destination, prefix, keep_vars)
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    @torch.no_grad()
    def _store_dense(self, dense: torch.Tensor, what: str) -> None:
        """Quantize ``dense [out, in]`` into a new base weight and warn with the requantisation error."""
        base = self._bnb_layer()
        new = requantize_weight(base, dense)
        self.weight = base.weight = new
        if self.quantized_kind() == "8bit":
            base.state.reset_grads()  # scales derived from the previous weight
        error = (self.base_weight().float() - dense.float()).abs().max().item()
        warnings.warn(
            f"{what} the {type(self).__name__} layer ({self.extra_repr()}) requantized its {self.quantized_kind()} weight: "
            f"max abs error {error:.3g} against the merged fp32 weight, so outputs can differ slightly from the unmerged model's",
            stacklevel=4,
        )


class QuantizedLoraLinear(_QuantizedBase, LoraLinear):
    """LoRA on a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``: ``base(x) + scaling · dropout(x) Aᵀ Bᵀ``.

    Args: as :class:`~lightning_peft.tuners.lora.LoraLinear`. Input ``[*, in]``, output ``[*, out]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        rows = self.mixed_rows(x)
        if rows is not None:  # a mixed batch: each row's own adapter's term
            return result + self.mixed_branches(x, rows).to(result.dtype)
        adapter = self.branch_to_apply()
        return result if adapter is None else result + self.lora_branch(x, adapter).to(result.dtype)

    @torch.no_grad()
    def check_mergeable(self, adapter: Optional[str] = None) -> None:
        if not torch.isfinite(self.base_weight().float() + self.delta_weight(self.merge_target(adapter)).float()).all():
            raise ValueError(f"merging the {type(self).__name__} layer ({self.extra_repr()}) would put NaN/inf into its weight; nothing was merged")

    @torch.no_grad()
    def merge(self, adapter: Optional[str] = None) -> None:
        """``W <- Q(deq(W) + s B A)`` in fp32 for adapter ``adapter`` (None: the active one). No-op if it is merged."""
        adapter = self.merge_target(adapter)
        if adapter not in self.merged_adapters:
            self._store_dense(self.base_weight().float() + self.delta_weight(adapter).float(), "merging into")
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W <- Q(deq(W) - Σ s B A)`` in fp32 over every merged adapter (one requantisation). No-op if none is."""
        if self.merged_adapters:
            dense = self.base_weight().float()
            for adapter in reversed(self.merged_adapters):
                dense = dense - self.delta_weight(adapter).float()
            self._store_dense(dense, "unmerging from")
            self.merged_adapters.clear()


class QuantizedDoraLinear(_QuantizedBase, DoraLinear):
    """DoRA on a bitsandbytes base: ``b + c ⊙ (base(x) - b + scaling · dropout(x) Aᵀ Bᵀ)``, ``c = m / ‖deq(W) + s B A‖``.

    The row norms use the dequantized weight (as peft's). Args: as :class:`~lightning_peft.tuners.dora.DoraLinear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed_batch is not None:
            return super().forward(x)  # DoraLinear's refusal of mixed batches
        result = self.base_forward(x)
        adapter = self.branch_to_apply()
        if adapter is None:
            return result
        bias = self.bias.to(result.dtype) if self.bias is not None else None
        linear = result if bias is None else result - bias  # the bias is added after the scale
        y = (linear + self.lora_branch(x, adapter).to(result.dtype)) * self.magnitude_scale().to(result.dtype)
        return y if bias is None else y + bias

    @torch.no_grad()
    def merge(self, adapter: Optional[str] = None) -> None:
        """``W <- Q(c ⊙ (deq(W) + s B A))`` in fp32 with the current ``c``, kept for :meth:`unmerge`."""
        if not self.merged:
            self._store_dense(self.merged_weight(self.base_weight()), "merging into")
            self.forget_weight_norms()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W <- Q(deq(W) / c - s B A)`` in fp32. No-op if not merged."""
        if self.merged:
            self.check_unmergeable()
            self._store_dense(self.unmerged_weight(self.base_weight()), "unmerging from")
            self.forget_weight_norms()
            self.merged = False

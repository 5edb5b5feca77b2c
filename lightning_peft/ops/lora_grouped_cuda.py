"""CUDA kernels of the grouped LoRA op: routes CUDA tensors of ``lightning_peft::lora_grouped_*`` to csrc/.

Registers a ``"cuda"`` kernel for both ops of :mod:`lightning_peft.ops.lora_grouped` (schemas,
fake impls and autograd stay there). The compiled kernels are the private ops
``torch.ops.lightning_peft_cuda.lora_grouped_forward / lora_grouped_backward``
(csrc/lora_grouped_ops.cpp, built with the rest of csrc/ by :mod:`lightning_peft.ops.cuda_backend`,
whose loader, fallback switch and environment variables apply unchanged). The PyTorch
implementation runs instead when the fallback is forced, the kernels are not built, or the call is
outside what they cover (dtype not fp32/fp16/bf16, a rank outside 1..128, more than 64 adapters,
no adapters, factors in another dtype than x).

Here the units are sorted by adapter on the device (``lora_grouped.segments``: no host sync) and
the outputs the kernels do not make (order, offsets, mask_sizes) are added, so both
implementations return the same layouts and either backward accepts either forward's outputs.

Host syncs: the only one is the check that every adapter index lies in [-1, n), and only when
``adapter_index`` lives on the GPU; an index on the CPU (the natural form: it is built from a
list of adapter names) is checked on the host and copied to the device without a sync.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from lightning_peft.ops import cuda_backend
from lightning_peft.ops import lora_grouped as grouped
from lightning_peft.ops.kernel_loader import ops_registered

__all__ = ["MAX_ADAPTERS", "kernels_cover"]

MAX_ADAPTERS = 64  # csrc/lora_grouped.h kMaxGroups
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops_built() -> bool:
    return ops_registered("lightning_peft_cuda", "lora_grouped_forward")


def kernels_cover(x: Tensor, lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor]) -> bool:
    """Whether a call with these inputs takes the grouped kernels (loads them on first use)."""
    if x.dtype not in _KERNEL_DTYPES or not 1 <= len(lora_as) <= MAX_ADAPTERS:
        return False
    if any(not 1 <= a.shape[0] <= cuda_backend.MAX_RANK or a.dtype != x.dtype for a in lora_as):
        return False
    if any(b.dtype != x.dtype for b in lora_bs):
        return False
    return cuda_backend.is_available() and _ops_built()


def _unit_index_on_device(adapter_index: Tensor, n: int, device: torch.device) -> Tensor:
    """The index, checked (module docstring: a host sync only for an index already on the GPU), on ``device``."""
    grouped._check_index_values(adapter_index, n)
    return adapter_index.to(device, non_blocking=True)


@grouped.lora_grouped_forward.register_kernel("cuda")
def _forward_cuda(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor],
    rngs: List[Tensor], adapter_index: Tensor, scalings: List[float], dropout_ps: List[float], training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not kernels_cover(x, lora_as, lora_bs):
        return grouped.forward_pytorch(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps, training)
    grouped._check_inputs(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps)
    n = len(lora_as)
    unit_index = _unit_index_on_device(adapter_index, n, x.device)
    _, per_unit = grouped.units_of(adapter_index, x.shape[:-1])
    order, offsets = grouped.segments(unit_index, n)
    y, hidden, mask = torch.ops.lightning_peft_cuda.lora_grouped_forward(
        x, weight, bias, lora_as, lora_bs, rngs, order, offsets, per_unit, scalings, dropout_ps, training
    )
    mask_sizes = torch.zeros((n,), dtype=torch.int64, device=x.device)  # packed mask: no per-adapter sizes
    return y, hidden, order, offsets, mask, mask_sizes


@grouped.lora_grouped_backward.register_kernel("cuda")
def _backward_cuda(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor], hidden: Tensor,
    order: Tensor, offsets: Tensor, mask: Tensor, mask_sizes: Tensor, scalings: List[float], dropout_ps: List[float],
    compute_grad_x: bool,
) -> tuple[Tensor, List[Tensor], List[Tensor]]:
    # The packed mask layout is shared with the PyTorch path: either backward takes either forward's mask.
    if not kernels_cover(x, lora_as, lora_bs) or mask.dim() == 1 and mask.numel() > 0:
        return grouped.backward_pytorch(
            grad_y, x, weight, lora_as, lora_bs, hidden, order, offsets, mask, mask_sizes, scalings, dropout_ps, compute_grad_x
        )
    per_unit = x[..., 0].numel() // order.shape[0] if order.shape[0] else 1
    grad_x, grad_as, grad_bs = torch.ops.lightning_peft_cuda.lora_grouped_backward(
        grad_y, x, weight, lora_as, lora_bs, hidden, order, offsets, per_unit, mask, scalings, dropout_ps, compute_grad_x
    )
    return grad_x, list(grad_as), list(grad_bs)

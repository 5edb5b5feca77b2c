"""CPU kernels of the grouped LoRA op: each unit of the batch through the single op's CPU kernels.

Registers a ``"cpu"`` kernel for both ops of :mod:`lightning_peft.ops.lora_grouped` (schemas,
fake impls and autograd stay there). The base GEMM runs once over the whole batch, in place; then
each unit (a row of the batch under a per-row index: ``T`` contiguous tokens) that has an adapter
goes through csrc/cpu/lora_rows.cpp (:mod:`lightning_peft.ops.cpu_backend`), one call per adapter
over its units (``units``, ``rows_per_unit``), which adds that adapter's LoRA term to its rows in
place, with dropout drawn from the adapter's key over its rows as one sub-batch. Nothing is
gathered or scattered: gathering the batch into adapter order cost ~15% of a training step (an
``index_select`` of x, y, grad_y and grad_x per layer: 1.18x the single-adapter step, in
`benchmarks/bench_cpu_mixed_batch.py --reps 16`), and one call per unit instead of per adapter
1.13x.

So every adapter's rows get exactly what the single op's CPU kernels compute on that sub-batch
(the same hashed mask). The outputs keep the PyTorch implementation's layout (``hidden`` in
adapter order; the mask the adapters' 17-byte keys, concatenated in adapter order, with
``mask_sizes`` saying which belongs to whom), so either backward accepts either forward's
outputs. The PyTorch implementation runs instead:

* without dropout: its forms (batched, stacked) are as fast or faster (measured: inference on a
  mixed batch through these kernels 1.149x the frozen forward, through the batched form 1.056x);
* for units of fewer than :data:`MIN_UNIT_TOKENS` tokens (a per-token index: one call per token
  would cost more than it saves);
* when the CPU kernels do not cover every adapter (forced fallback, not compiled, dtype, rank > 64),
  or backward gets a mask they did not draw.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from lightning_peft.ops import cpu_backend
from lightning_peft.ops import lora_grouped as grouped
from lightning_peft.ops.dropout_mask import decode_hash_key, encode_hash_key, is_hash_key

__all__ = ["kernels_cover"]


def kernels_cover(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor]) -> bool:
    """Whether a CPU call with these inputs takes the CPU kernels: they cover every adapter."""
    return (
        x.device.type == "cpu"
        and len(lora_as) > 0
        and all(cpu_backend.kernels_cover(x, a, weight, bias, b) for a, b in zip(lora_as, lora_bs))
    )


MIN_UNIT_TOKENS = 16  # units of fewer tokens (per-token indices) take the PyTorch forms


def _units_by_adapter(order: Tensor, offsets: Tensor, n: int) -> List[Tensor]:
    """Per adapter, its units ``int64 [u_j]`` in sub-batch order (original order: ``segments`` sorts stably)."""
    bounds = offsets.tolist()
    return [order[bounds[j] : bounds[j + 1]] for j in range(n)]


@grouped.lora_grouped_forward.register_kernel("cpu")
def _forward_cpu(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor],
    rngs: List[Tensor], adapter_index: Tensor, scalings: List[float], dropout_ps: List[float], training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    active = [grouped._dropout_active(p, training) for p in dropout_ps]
    if not any(active):  # the common inference case: straight to the PyTorch forms, which check the inputs
        return grouped.forward_pytorch(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps, training)
    grouped._check_inputs(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps)
    tokens_per_unit = grouped.units_of(adapter_index, x.shape[:-1])[1]
    if tokens_per_unit < MIN_UNIT_TOKENS or not kernels_cover(x, weight, bias, lora_as, lora_bs):
        return grouped.forward_pytorch(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps, training)
    n = len(lora_as)
    k, d = x.shape[-1], grouped._out_features(weight, lora_bs, bias)
    x2 = x.reshape(-1, k).contiguous()  # [N, K]
    n_tokens, t = x2.shape[0], tokens_per_unit
    grouped._check_index_values(adapter_index, n)
    order, offsets = grouped.segments(adapter_index, n)
    hidden = x2.new_zeros((n_tokens, max(a.shape[0] for a in lora_as)))  # adapter order, as the PyTorch path
    mask_sizes = torch.zeros((n,), dtype=torch.int64)
    y = cpu_backend.base_output(x2, weight, bias, d)  # every row's base output; the kernels add each adapter's term
    keys: List[Tensor] = []
    bounds = [b * t for b in offsets.tolist()]  # adapter j's rows of hidden (adapter order)
    for j, units in enumerate(_units_by_adapter(order, offsets, n)):
        if units.numel() == 0:
            continue
        seed, offset = cpu_backend.rng_key(rngs[j]) if active[j] else (0, 0)
        hidden[bounds[j] : bounds[j + 1], : lora_as[j].shape[0]] = torch.ops.lightning_peft_cpu.lora_rows_forward(
            x2, lora_as[j], lora_bs[j], y, seed, offset, dropout_ps[j] if active[j] else 0.0, scalings[j], units, t
        )
        if active[j]:
            keys.append(encode_hash_key(rngs[j]))
            mask_sizes[j] = keys[-1].numel()
    mask = torch.cat(keys) if keys else x.new_empty((0,), dtype=torch.uint8)
    return y.view(*x.shape[:-1], d), hidden, order, offsets, mask, mask_sizes


def _hashed_keys(mask: Tensor, mask_sizes: Tensor, bounds: Sequence[int], dropout_ps: Sequence[float]) -> Optional[List[Optional[Tensor]]]:
    """Adapter j's key where its rows had dropout (None where not), or None if some adapter's mask is
    not a kernel key (a forward that ran in the PyTorch path)."""
    encoded = grouped._segment_masks(mask, mask_sizes)
    keys: List[Optional[Tensor]] = []
    for j, p in enumerate(dropout_ps):
        if p == 0.0 or bounds[j] == bounds[j + 1]:
            keys.append(None)
        elif encoded is None or not is_hash_key(encoded[j]):
            return None
        else:
            keys.append(encoded[j])
    return keys


@grouped.lora_grouped_backward.register_kernel("cpu")
def _backward_cpu(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor], hidden: Tensor,
    order: Tensor, offsets: Tensor, mask: Tensor, mask_sizes: Tensor, scalings: List[float], dropout_ps: List[float],
    compute_grad_x: bool,
) -> tuple[Tensor, List[Tensor], List[Tensor]]:
    k, d = x.shape[-1], grad_y.shape[-1]
    n_tokens = x.numel() // k
    t = n_tokens // order.shape[0] if order.shape[0] else 0
    bounds = [b * t for b in offsets.tolist()]
    keys = _hashed_keys(mask, mask_sizes, bounds, dropout_ps)
    if (keys is None or all(key is None for key in keys) or t < MIN_UNIT_TOKENS or grad_y.dtype != x.dtype
            or not kernels_cover(x, weight, None, lora_as, lora_bs)):
        return grouped.backward_pytorch(
            grad_y, x, weight, lora_as, lora_bs, hidden, order, offsets, mask, mask_sizes, scalings, dropout_ps, compute_grad_x
        )
    x2 = x.reshape(-1, k).contiguous()  # [N, K]
    g2 = grad_y.reshape(-1, d).contiguous()  # [N, D]
    grad_x = cpu_backend.base_grad_x(g2, weight, k, compute_grad_x)  # the kernels add each adapter's part
    grad_as: List[Tensor] = []
    grad_bs: List[Tensor] = []
    for j, units in enumerate(_units_by_adapter(order, offsets, len(lora_as))):
        a, b = lora_as[j], lora_bs[j]
        if units.numel() == 0:  # no rows: zero gradients (lora_grouped's module docstring)
            grad_as.append(torch.zeros_like(a))
            grad_bs.append(torch.zeros_like(b))
            continue
        seed, offset = decode_hash_key(keys[j]) if keys[j] is not None else (0, 0)
        grad_a, grad_b = torch.ops.lightning_peft_cpu.lora_rows_backward(
            g2, x2, a, b, hidden[bounds[j] : bounds[j + 1], : a.shape[0]].contiguous(), grad_x, seed, offset,
            dropout_ps[j] if keys[j] is not None else 0.0, scalings[j], units, t,
        )
        grad_as.append(grad_a)
        grad_bs.append(grad_b)
    return (grad_x.view(x.shape) if compute_grad_x else x.new_empty((0,))), grad_as, grad_bs

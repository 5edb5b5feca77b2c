"""The LoRA linear op: ``y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`` behind one ``torch.library`` op.

This module is the only place where LoRA math is chosen per device. The schema lives here in
Python so the op exists with or without the compiled extension; this file registers the lean
pure-PyTorch implementation for every device, and ``lightning_peft._C`` (csrc/) adds CUDA
kernels for the same two ops when it is built.

Two ops, like flash-attention's forward/backward pair, so autograd stays in Python and each
backend only implements plain tensor-in/tensor-out kernels:

``lightning_peft::lora_linear_forward(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training)``
    -> ``(y, lora_hidden, mask)``
``lightning_peft::lora_linear_backward(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x)``
    -> ``(grad_x, grad_a, grad_b)``

Shapes (N = product of x's leading dims, K = in features, D = out features, r = rank):
    x ``[*, K]``, weight ``[D, K]`` (any strides, e.g. a transposed GPT-2 Conv1D weight),
    bias ``[D]`` or None, lora_a ``[r, K]``, lora_b ``[D, r]``, rng ``int64 [2]`` = (seed, offset),
    y ``[*, D]``, lora_hidden ``[N, r]`` = dropout(x) Aᵀ (already divided by the keep probability),
    mask: what backward needs to rebuild the dropout mask (``[0]`` when dropout is off), either
      * ``uint8 [M]`` (1-D, M data-dependent) encoded drop positions: distances between drops, or
        the key to draw them again, never more than 1 bit per element (CPU tensors; see
        ``dropout_mask.encode_drop_positions``), or
      * ``uint8 [N, ceil(K/8)]`` packed keep-bits (other devices, and the CUDA kernels),
    grad_x ``[*, K]`` (``[0]`` when ``compute_grad_x`` is False), grad_a ``[r, K]``, grad_b ``[D, r]``.

What is kept for backward is x (which the frozen base linear would not need), the small
``lora_hidden`` and the mask in at most 1 bit per element: never the dropped-out copy of x.
Gradients of the frozen ``weight`` / ``bias`` are computed only when they require grad.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_peft.ops.dropout_mask import (
    apply_select_bits,
    decode_drop_positions,
    draw_drops,
    draw_packed_keep_mask,
    encode_drop_positions,
    keep_mask_from_positions,
    mask_bytes_per_row,
    quantized_drop_probability,
    unpack_mask,
    unpack_mask_as_select_bits,
)

__all__ = [
    "lora_linear",
    "lora_linear_forward",
    "lora_linear_backward",
    "forward_pytorch",
    "backward_pytorch",
    "dropout_keep_mask",
]


def _dropout_active(dropout_p: float, training: bool) -> bool:
    return training and dropout_p > 0.0


def _keep_scale(dropout_p: float) -> float:
    """1 / realised keep probability (see ``quantized_drop_probability``)."""
    return 1.0 / (1.0 - quantized_drop_probability(dropout_p))


def _check_inputs(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, rng: Tensor, dropout_p: float) -> None:
    k = x.shape[-1]
    torch._check(weight.dim() == 2 and weight.shape[1] == k, lambda: f"lora_linear: weight must be [D, K={k}], got {tuple(weight.shape)}")
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == k, lambda: f"lora_linear: lora_a must be [r, K={k}], got {tuple(lora_a.shape)}")
    torch._check(
        lora_b.dim() == 2 and lora_b.shape[0] == weight.shape[0] and lora_b.shape[1] == lora_a.shape[0],
        lambda: f"lora_linear: lora_b must be [D, r] = [{weight.shape[0]}, {lora_a.shape[0]}], got {tuple(lora_b.shape)}",
    )
    torch._check(rng.dtype == torch.int64 and rng.numel() == 2, lambda: "lora_linear: rng must be an int64 tensor of 2 elements (seed, offset)")
    torch._check(0.0 <= dropout_p < 1.0, lambda: f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


def _uses_drop_positions(device: torch.device) -> bool:
    """Whether the PyTorch path on ``device`` draws drop positions (True) or packed keep-bits.

    CPU: drawing positions is O(p · numel) and masking is a copy plus ``index_fill_``, cheaper
    than a draw per element plus unpacking and applying a bit mask. Other devices keep the packed
    bits, the layout the CUDA kernels produce, so either CUDA backward accepts either CUDA
    forward's mask.
    """
    return device.type == "cpu"


def _mask_holds_drop_positions(mask: Tensor) -> bool:
    return mask.dim() == 1  # packed keep-bits are [N, ceil(K/8)]


def _zero_at_(values: Tensor, positions: Tensor) -> Tensor:
    """Set the flat ``positions`` of the contiguous ``values [N, K]`` to 0, in place.

    A copy plus ``index_fill_`` touches memory about as often as the copy alone: cheaper than a
    full masking pass (dropped NaN / inf become exactly 0, as with ``torch.where``).
    """
    values.view(-1).index_fill_(0, positions, 0)
    return values


def _dropout_hidden(x2: Tensor, lora_a: Tensor, dropout_p: float, rng: Tensor) -> tuple[Tensor, Tensor]:
    """``dropout(x2) Aᵀ`` (scaled by 1 / keep probability) and what backward needs to rebuild the mask.

    Args:
        x2: ``[N, K]``; lora_a: ``[r, K]``; rng: ``int64 [2]`` (seed, offset).

    Returns:
        hidden ``[N, r]`` and mask: encoded drop positions ``uint8 [M]`` (CPU) or ``uint8 [N, ceil(K / 8)]``.
    """
    n, k = x2.shape
    if _uses_drop_positions(x2.device):
        drops = draw_drops(n * k, dropout_p, rng)
        x_kept = _zero_at_(x2.clone(memory_format=torch.contiguous_format), drops.positions)
        # Copies, never the rng buffer itself: the layer advances it in place before the next step.
        mask = encode_drop_positions(drops.positions, n * k, rng, drops.increments)
    else:
        mask = draw_packed_keep_mask(n, k, dropout_p, rng).to(x2.device)  # [N, ceil(K/8)] uint8
        select_bits = unpack_mask_as_select_bits(mask, k, x2.dtype)  # [N, K], transient
        x_kept = apply_select_bits(x2, select_bits, out=select_bits.view(x2.dtype))  # reuses the select bits' memory
    hidden = torch.mm(x_kept, lora_a.t())
    return hidden.mul_(_keep_scale(dropout_p)), mask  # scale the small [N, r] tensor, not x


class _Masking(NamedTuple):
    """Applies one dropout mask to ``[N, K]`` tensors, whichever form the mask is kept in."""

    copy: Callable[[Tensor], Tensor]  # masked copy (contiguous)
    in_place: Callable[[Tensor], Tensor]  # masks a contiguous tensor in place and returns it


def _masking_for(mask: Tensor, n: int, k: int, dtype: torch.dtype, dropout_p: float) -> _Masking:
    """The :class:`_Masking` of a forward's ``mask`` output for ``[n, k]`` tensors of ``dtype``."""
    if _mask_holds_drop_positions(mask):
        positions = decode_drop_positions(mask, n * k, dropout_p)
        return _Masking(
            copy=lambda t: _zero_at_(t.clone(memory_format=torch.contiguous_format), positions),
            in_place=lambda t: _zero_at_(t, positions),
        )
    select_bits = unpack_mask_as_select_bits(mask, k, dtype)  # [N, K], transient
    return _Masking(
        copy=lambda t: apply_select_bits(t, select_bits),
        in_place=lambda t: apply_select_bits(t, select_bits, out=t),
    )


def _dropout_backward(
    x2: Tensor,
    g2: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    d_hidden: Tensor,
    mask: Tensor,
    dropout_p: float,
    compute_grad_x: bool,
) -> tuple[Optional[Tensor], Tensor]:
    """grad_a ``[r, K]`` = d_hiddenᵀ (x2 ⊙ keep) and grad_x ``[N, K]`` = g2 W + keep ⊙ (d_hidden A).

    Args:
        x2: ``[N, K]``; g2: ``[N, D]``; weight: ``[D, K]``; lora_a: ``[r, K]``;
        d_hidden: ``[N, r]`` (scaling and 1 / keep probability applied);
        mask: the forward's encoded drop positions ``uint8 [M]`` or packed bits ``uint8 [N, ceil(K/8)]``.
    """
    masking = _masking_for(mask, *x2.shape, x2.dtype, dropout_p)
    x_kept = masking.copy(x2)
    grad_a = torch.mm(d_hidden.t(), x_kept)
    if not compute_grad_x:
        return None, grad_a
    # LoRA part first (in x_kept's memory, masked in place), then the base GEMM accumulates onto
    # it (beta = 1 inside the GEMM) instead of a separate read-modify-write pass.
    grad_x = masking.in_place(torch.mm(d_hidden, lora_a, out=x_kept))
    return grad_x.addmm_(g2, weight), grad_a


def dropout_keep_mask(mask: Tensor, rows: int, cols: int, dropout_p: float) -> Tensor:
    """The keep mask ``bool [rows, cols]`` behind a forward's ``mask`` output (either form).

    For inspection and tests: the LoRA path never materialises this.
    """
    if _mask_holds_drop_positions(mask):
        return keep_mask_from_positions(decode_drop_positions(mask, rows * cols, dropout_p), rows, cols)
    return unpack_mask(mask, cols)


def forward_pytorch(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    rng: Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch forward: the fallback for every device. Shapes: module docstring."""
    _check_inputs(x, weight, lora_a, lora_b, rng, dropout_p)
    k, d = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)  # [N, K]
    if _dropout_active(dropout_p, training):
        hidden, mask = _dropout_hidden(x2, lora_a, dropout_p, rng)
    else:
        hidden = torch.mm(x2, lora_a.t())
        mask = x.new_empty((0,), dtype=torch.uint8)
    # The small LoRA product first, then the base GEMM accumulates onto it (beta = 1 inside the
    # GEMM): one write of y instead of a write plus a read-modify-write pass for the LoRA term.
    scaled_hidden = hidden * scaling  # [N, r]
    y = torch.mm(scaled_hidden, lora_b.t()) if bias is None else torch.addmm(bias, scaled_hidden, lora_b.t())  # [N, D]
    y.addmm_(x2, weight.t())
    return y.view(*x.shape[:-1], d), hidden, mask


@torch.library.custom_op("lightning_peft::lora_linear_forward", mutates_args=())
def lora_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    rng: Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Default implementation for all devices; a device kernel registered later takes precedence."""
    return forward_pytorch(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training)


@lora_linear_forward.register_fake
def _lora_linear_forward_fake(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training):
    _check_inputs(x, weight, lora_a, lora_b, rng, dropout_p)
    k, d, r = x.shape[-1], weight.shape[0], lora_a.shape[0]
    n = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], d))
    hidden = x.new_empty((n, r))
    if _dropout_active(dropout_p, training) and _uses_drop_positions(x.device):
        mask = x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)
    elif _dropout_active(dropout_p, training):
        mask = x.new_empty((n, mask_bytes_per_row(k)), dtype=torch.uint8)
    else:
        mask = x.new_empty((0,), dtype=torch.uint8)
    return y, hidden, mask


def backward_pytorch(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    lora_hidden: Tensor,
    mask: Tensor,
    scaling: float,
    dropout_p: float,
    compute_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch backward. ``dropout_p`` is 0 when the forward ran without dropout. Shapes: module docstring."""
    k, d = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)  # [N, K]
    g2 = grad_y.reshape(-1, d)  # [N, D]
    # (hiddenᵀ g)ᵀ: the [r, N] x [N, D] orientation is ~3x faster on CPU BLAS than gᵀ hidden.
    grad_b = torch.mm(lora_hidden.t(), g2).t().mul_(scaling).contiguous()  # [D, r]
    d_hidden = torch.mm(g2, lora_b).mul_(scaling * _keep_scale(dropout_p))  # [N, r]; keep scale is 1 at p = 0
    if dropout_p > 0.0:
        grad_x, grad_a = _dropout_backward(x2, g2, weight, lora_a, d_hidden, mask, dropout_p, compute_grad_x)
    else:
        grad_a = torch.mm(d_hidden.t(), x2)  # [r, K]
        if compute_grad_x:
            # LoRA term first, then the base GEMM accumulates onto it (beta = 1).
            grad_x = torch.mm(d_hidden, lora_a).addmm_(g2, weight)  # [N, K]
    if not compute_grad_x:
        grad_x = x.new_empty((0,))
    return grad_x.view(x.shape) if compute_grad_x else grad_x, grad_a, grad_b


@torch.library.custom_op("lightning_peft::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    lora_hidden: Tensor,
    mask: Tensor,
    scaling: float,
    dropout_p: float,
    compute_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Default implementation for all devices; a device kernel registered later takes precedence."""
    return backward_pytorch(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x)


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    return grad_x, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training = inputs
    _, hidden, mask = output
    ctx.mark_non_differentiable(hidden, mask)
    ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, mask)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p if _dropout_active(dropout_p, training) else 0.0


def _backward(ctx, grad_y, _grad_hidden, _grad_mask):
    x, weight, lora_a, lora_b, hidden, mask = ctx.saved_tensors
    needs_x, needs_w, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
    grad_y = grad_y.contiguous()
    grad_x, grad_a, grad_b = torch.ops.lightning_peft.lora_linear_backward(
        grad_y, x, weight, lora_a, lora_b, hidden, mask, ctx.scaling, ctx.dropout_p, needs_x
    )
    # The base weight and bias are frozen in every PEFT setup; if a user unfreezes them
    # (bias="all" / "lora_only", or a full fine-tune), plain matmuls give their gradients.
    grad_w = torch.mm(grad_y.reshape(-1, weight.shape[0]).t(), x.reshape(-1, x.shape[-1])) if needs_w else None
    grad_bias = grad_y.reshape(-1, weight.shape[0]).sum(0) if needs_bias else None
    return (
        grad_x if needs_x else None,
        grad_w,
        grad_bias,
        grad_a if needs_a else None,
        grad_b if needs_b else None,
        None,
        None,
        None,
        None,
    )


lora_linear_forward.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scaling: float,
    dropout_p: float,
    rng: Tensor,
    training: bool,
) -> Tensor:
    """``x Wᵀ + b + scaling · dropout_p(x) Aᵀ Bᵀ``; differentiable in x, A, B (and W, b if they require grad).

    Args:
        x: ``[*, K]`` input.
        weight: ``[D, K]`` frozen base weight (any strides).
        bias: ``[D]`` or None.
        lora_a: ``[r, K]``; lora_b: ``[D, r]``.
        scaling: multiplier of the LoRA term (``alpha / r`` or ``alpha / sqrt(r)``).
        dropout_p: drop probability of the LoRA branch's input, in [0, 1).
        rng: ``int64 [2]`` (seed, offset) that determines the dropout mask; same key, same mask.
        training: dropout applies only when True.

    Returns:
        ``[*, D]`` output.
    """
    return torch.ops.lightning_peft.lora_linear_forward(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training)[0]

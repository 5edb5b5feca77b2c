"""The LoRA linear op: ``y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`` behind one ``torch.library`` op.

The schema lives here in Python so the op exists with or without compiled code; this file
registers the lean pure-PyTorch implementation for every device. Two backends take precedence
where they load: :mod:`~lightning_peft.ops.cpu_backend` (csrc/cpu/lora_rows.cpp, fused row passes
on the CPU, compiled on first use) and :mod:`~lightning_peft.ops.cuda_backend` (csrc/, CUDA).

Two ops, like flash-attention's forward/backward pair, so autograd stays in Python and each
backend only implements plain tensor-in/tensor-out kernels:

``lightning_peft::lora_linear_forward(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale=None)``
    -> ``(y, lora_hidden, mask)``
``lightning_peft::lora_linear_backward(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x, scale=None)``
    -> ``(grad_x, grad_a, grad_b)``

With ``scale`` (DoRA's ``m / ‖W + s B A‖``): ``y = scale ⊙ (x Wᵀ + scaling · dropout(x) Aᵀ Bᵀ) + b``.
The backward op then returns the gradients with the scale folded in; ``grad_scale`` (the sum over
rows of ``grad_y ⊙ (y − b) / scale``) comes from a third op, from the saved output:
``lightning_peft::lora_linear_scale_grad(grad_y, y, bias, scale, x, weight, lora_b, lora_hidden, scaling)`` -> ``[D]``.

Shapes (N = product of x's leading dims, K = in features, D = out features, r = rank):
    x ``[*, K]``, weight ``[D, K]`` (any strides, e.g. a transposed GPT-2 Conv1D weight) or None:
      no base term, ``y = b + scaling · dropout(x) Aᵀ Bᵀ`` (the branch alone, for a quantized base
      layer whose output the caller computes and adds; D is then lora_b's),
    bias ``[D]`` or None, lora_a ``[r, K]``, lora_b ``[D, r]``, rng ``int64 [2]`` = (seed, offset),
    y ``[*, D]``, lora_hidden ``[N, r]`` = dropout(x) Aᵀ (already divided by the keep probability),
    mask: what backward needs to rebuild the dropout mask (``[0]`` when dropout is off), either
      * ``uint8 [M]`` (1-D, M data-dependent) on CPU tensors: the CPU kernels' key (17 bytes; they
        draw the mask again, ``dropout_mask.encode_hash_key``), or this file's encoded drop
        positions: distances between drops, or the key to draw them again, never more than 1 bit
        per element (``dropout_mask.encode_drop_positions``), or
      * ``uint8 [N, ceil(K/8)]`` packed keep-bits (other devices: the CUDA kernels' Philox bits,
        drawn by the fallback too, on the device: ``philox.philox_keep_mask``),
    scale ``[D]`` or None, grad_x ``[*, K]`` (``[0]`` when ``compute_grad_x`` is False), grad_a ``[r, K]``, grad_b ``[D, r]``.

What is kept for backward is x (which the frozen base linear would not need), the small
``lora_hidden`` and the mask in at most 1 bit per element: never the dropped-out copy of x.
Gradients of the frozen ``weight`` / ``bias`` are computed only when they require grad. With a
``scale`` that requires grad, the output y is saved too: the scale's gradient needs the pre-scale
output, and y is that up to the scale and bias, stored once where the next layer saves it anyway
(e.g. SiLU's input, the gate's other factor, attention's values), while recomputing it would cost
a third base GEMM. An in-place change of that output before backward is then an autograd error.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_peft.ops.dropout_mask import (
    decode_drop_positions,
    draw_drops,
    drop_threshold,
    encode_drop_positions,
    quantized_drop_probability,
    unpack_mask,
)
from lightning_peft.ops.philox import philox_keep_mask

__all__ = [
    "lora_linear",
    "lora_linear_forward",
    "lora_linear_backward",
    "lora_linear_scale_grad",
    "forward_pytorch",
    "backward_pytorch",
    "scale_grad_pytorch",
    "dropout_keep_mask",
]


def _dropout_active(dropout_p: float, training: bool) -> bool:
    return training and dropout_p > 0.0


def _keep_scale(dropout_p: float) -> float:
    """1 / realised keep probability (see ``quantized_drop_probability``)."""
    return 1.0 / (1.0 - quantized_drop_probability(dropout_p))


def _out_features(weight: Optional[Tensor], lora_b: Tensor) -> int:
    """D: the base weight's rows, or lora_b's when there is no base weight."""
    return weight.shape[0] if weight is not None else lora_b.shape[0]


def _check_inputs(x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, rng: Tensor, dropout_p: float) -> None:
    k = x.shape[-1]
    if weight is not None:
        torch._check(weight.dim() == 2 and weight.shape[1] == k, lambda: f"lora_linear: weight must be [D, K={k}], got {tuple(weight.shape)}")
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == k, lambda: f"lora_linear: lora_a must be [r, K={k}], got {tuple(lora_a.shape)}")
    torch._check(lora_b.dim() == 2, lambda: f"lora_linear: lora_b must be [D, r], got {tuple(lora_b.shape)}")
    d = _out_features(weight, lora_b)
    torch._check(
        lora_b.shape[0] == d and lora_b.shape[1] == lora_a.shape[0],
        lambda: f"lora_linear: lora_b must be [D, r] = [{d}, {lora_a.shape[0]}], got {tuple(lora_b.shape)}",
    )
    torch._check(rng.dtype == torch.int64 and rng.numel() == 2, lambda: "lora_linear: rng must be an int64 tensor of 2 elements (seed, offset)")
    torch._check(0.0 <= dropout_p < 1.0, lambda: f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


def _check_scale(scale: Optional[Tensor], d: int) -> None:
    if scale is not None:
        torch._check(scale.dim() == 1 and scale.shape[0] == d, lambda: f"lora_linear: scale must be [D={d}], got {tuple(scale.shape)}")


def _folds_scale(n: int, k: int) -> bool:
    """Whether ``scale`` is folded into W's and B's rows (``[D, K]`` elements scaled) rather than applied
    to the ``[N, D]`` output / output gradient: whichever touches fewer elements."""
    return k <= n


def _scaled_rows(t: Optional[Tensor], scale: Tensor) -> Optional[Tensor]:
    """``scale[:, None] ⊙ t`` for a ``[D, *]`` tensor (None stays None)."""
    return None if t is None else t * scale.unsqueeze(1)


def _fold_scale_forward(
    n: int, k: int, weight: Optional[Tensor], lora_b: Tensor, scale: Optional[Tensor]
) -> tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    """``(weight, lora_b, output_scale)`` for a forward with DoRA's ``scale``: folded into W's and B's
    rows (``scale ⊙ (x Wᵀ + s h Bᵀ) = x (scale ⊙ W)ᵀ + s h (scale ⊙ B)ᵀ``, output_scale None), or left
    for the caller to apply to the output (output_scale = scale) when that touches fewer elements."""
    if scale is None or not _folds_scale(n, k):
        return weight, lora_b, scale
    return _scaled_rows(weight, scale), _scaled_rows(lora_b, scale), None


def _fold_scale_backward(
    n: int, k: int, g2: Tensor, weight: Optional[Tensor], lora_b: Tensor, scale: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """``(g2, weight, lora_b, b_scale)`` for a backward with DoRA's ``scale``, as its forward folded it:
    into W's and B's rows (grad_b's rows then still need multiplying by ``b_scale``), or into the
    output gradient ``g2 ⊙ scale``, which then carries it into every product."""
    if scale is None:
        return g2, weight, lora_b, None
    if _folds_scale(n, k):
        return g2, _scaled_rows(weight, scale), _scaled_rows(lora_b, scale), scale
    return g2 * scale, weight, lora_b, None


def _uses_drop_positions(device: torch.device) -> bool:
    """Whether the op on ``device`` draws CPU drop positions (True) or Philox packed keep-bits.

    Measured: Philox keep-bits on CPU make the all-linear p=0.1 step 1.32 ± 0.11x the positions' (CPU time, 12 interleaved rotations, `benchmarks/bench_cpu_op_ab.py --targets all --reps 12`).
    Elsewhere the kernels' packed bits, drawn on the device, so either CUDA backward accepts either
    CUDA forward's mask.
    """
    return device.type == "cpu"


def _zero_dropped_(values: Tensor, dropped: Tensor) -> Tensor:
    """Zero the dropped elements of the contiguous ``values [N, K]`` in place and return it.

    ``dropped``: ``int64 [n_dropped]`` flat positions (CPU: a copy plus ``index_fill_`` touches
    memory about as often as the copy alone) or ``bool [N, K]``. Dropped NaN / inf become exactly 0.
    """
    if dropped.dtype == torch.bool:
        return values.masked_fill_(dropped, 0)
    values.view(-1).index_fill_(0, dropped, 0)
    return values


def _dropped_of(mask: Tensor, n: int, k: int, dropout_p: float) -> Tensor:
    """The drops behind a forward's ``mask`` output, in the form :func:`_zero_dropped_` takes."""
    if mask.dim() == 1:  # encoded CPU drop positions; packed keep-bits are [N, ceil(K/8)]
        return decode_drop_positions(mask, n * k, dropout_p)
    return ~unpack_mask(mask, k)


def _d_hidden(g2: Tensor, lora_b: Tensor, alpha: float) -> Tensor:
    """``alpha · g2 B``, ``[N, r]`` (g2 ``[N, D]``, lora_b ``[D, r]``), computed as ``(Bᵀ g2ᵀ)ᵀ``: an
    ``[N, r]`` view with strides ``(1, N)``, which the following products take as they are.

    Measured: 0.18 / 0.48 ms against 0.41 / 1.09 ms for g2 B (N = 2048, D = 512 / 1376, r = 8, 2 threads); the backward of a decoder layer's 7 LoRA linears 0.983x (median of 40 interleaved pairs, quartiles 0.956-0.999), below the step's noise in `benchmarks/bench_cpu_op_ab.py --variants positions,dh_gb` (0.997x, 24 rotations, loaded machine).
    """
    return torch.mm(lora_b.t(), g2.t()).mul_(alpha).t()


def _dropout_hidden(x2: Tensor, lora_a: Tensor, dropout_p: float, rng: Tensor) -> tuple[Tensor, Tensor]:
    """``dropout(x2) Aᵀ`` (scaled by 1 / keep probability) and what backward needs to rebuild the mask.

    Args:
        x2: ``[N, K]``; lora_a: ``[r, K]``; rng: ``int64 [2]`` (seed, offset).

    Returns:
        hidden ``[N, r]`` and mask: encoded drop positions ``uint8 [M]`` (CPU) or ``uint8 [N, ceil(K / 8)]``.
    """
    n, k = x2.shape
    if _uses_drop_positions(x2.device):
        dropped, increments = draw_drops(n * k, dropout_p, rng)
        mask = encode_drop_positions(increments, n * k, rng)
    else:  # drawn from the rng tensor on the device: no host sync
        mask = philox_keep_mask(rng.to(x2.device), n, k, drop_threshold(dropout_p))
        dropped = ~unpack_mask(mask, k)
    x_kept = _zero_dropped_(x2.clone(memory_format=torch.contiguous_format), dropped)
    hidden = torch.mm(x_kept, lora_a.t())
    return hidden.mul_(_keep_scale(dropout_p)), mask  # scale the small [N, r] tensor, not x


def dropout_keep_mask(mask: Tensor, rows: int, cols: int, dropout_p: float) -> Tensor:
    """The keep mask ``bool [rows, cols]`` behind a forward's ``mask`` output (either form; for inspection and tests)."""
    dropped = _dropped_of(mask, rows, cols, dropout_p)
    if dropped.dtype == torch.bool:
        return ~dropped
    return torch.ones(rows * cols, dtype=torch.bool).index_fill_(0, dropped, False).view(rows, cols)


def forward_pytorch(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, rng: Tensor, scaling: float,
    dropout_p: float, training: bool, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch forward: the fallback for every device. Shapes: module docstring."""
    _check_inputs(x, weight, lora_a, lora_b, rng, dropout_p)
    k, d = x.shape[-1], _out_features(weight, lora_b)
    _check_scale(scale, d)
    x2 = x.reshape(-1, k)  # [N, K]
    weight, lora_b, output_scale = _fold_scale_forward(x2.shape[0], k, weight, lora_b, scale)
    if _dropout_active(dropout_p, training):
        hidden, mask = _dropout_hidden(x2, lora_a, dropout_p, rng)
    else:
        hidden = torch.mm(x2, lora_a.t())
        mask = x.new_empty((0,), dtype=torch.uint8)
    # The small LoRA product first, then the base GEMM accumulates onto it (beta = 1 inside the
    # GEMM): one write of y instead of a write plus a read-modify-write pass for the LoRA term.
    scaled_hidden = hidden * scaling  # [N, r]
    if bias is None or output_scale is not None:
        y = torch.mm(scaled_hidden, lora_b.t())  # [N, D]
    else:
        y = torch.addmm(bias, scaled_hidden, lora_b.t())
    if weight is not None:
        y.addmm_(x2, weight.t())
    if output_scale is not None:
        y = y.mul_(output_scale) if bias is None else torch.addcmul(bias, y, output_scale)
    return y.view(*x.shape[:-1], d), hidden, mask


@torch.library.custom_op("lightning_peft::lora_linear_forward", mutates_args=())
def lora_linear_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, rng: Tensor, scaling: float,
    dropout_p: float, training: bool, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Default implementation for all devices; a device kernel registered later takes precedence."""
    return forward_pytorch(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale)


@lora_linear_forward.register_fake
def _lora_linear_forward_fake(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale=None):
    _check_inputs(x, weight, lora_a, lora_b, rng, dropout_p)
    k, d, r = x.shape[-1], _out_features(weight, lora_b), lora_a.shape[0]
    _check_scale(scale, d)
    n = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], d))
    hidden = x.new_empty((n, r))
    if _dropout_active(dropout_p, training) and _uses_drop_positions(x.device):
        mask = x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)
    elif _dropout_active(dropout_p, training):
        mask = x.new_empty((n, (k + 7) // 8), dtype=torch.uint8)
    else:
        mask = x.new_empty((0,), dtype=torch.uint8)
    return y, hidden, mask


def backward_pytorch(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, lora_hidden: Tensor, mask: Tensor,
    scaling: float, dropout_p: float, compute_grad_x: bool, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch backward. ``dropout_p`` is 0 when the forward ran without dropout. Shapes: module docstring."""
    n, k, d = lora_hidden.shape[0], x.shape[-1], lora_b.shape[0]
    _check_scale(scale, d)
    x2 = x.reshape(-1, k)  # [N, K]
    g2, weight, lora_b, b_scale = _fold_scale_backward(n, k, grad_y.reshape(-1, d), weight, lora_b, scale)
    # (hiddenᵀ g)ᵀ: the [r, N] x [N, D] orientation is ~3x faster on CPU BLAS than gᵀ hidden.
    grad_b_t = torch.mm(lora_hidden.t(), g2)  # [r, D]
    grad_b_t = grad_b_t.mul_(scaling) if b_scale is None else grad_b_t.mul_(b_scale * scaling)
    grad_b = grad_b_t.t().contiguous()  # [D, r]
    d_hidden = _d_hidden(g2, lora_b, scaling * _keep_scale(dropout_p))  # [N, r]; keep scale is 1 at p = 0
    dropped = _dropped_of(mask, n, k, dropout_p) if dropout_p > 0.0 else None
    x_kept = x2 if dropped is None else _zero_dropped_(x2.clone(memory_format=torch.contiguous_format), dropped)
    grad_a = torch.mm(d_hidden.t(), x_kept)  # [r, K]
    if not compute_grad_x:
        return x.new_empty((0,)), grad_a, grad_b
    # The LoRA part first (reusing x_kept's memory, masked in place), then the base GEMM accumulates
    # onto it (beta = 1 inside the GEMM) instead of a separate read-modify-write pass.
    if dropped is None:
        grad_x = torch.mm(d_hidden, lora_a)
    else:
        grad_x = _zero_dropped_(torch.mm(d_hidden, lora_a, out=x_kept), dropped)
    if weight is not None:
        grad_x.addmm_(g2, weight)
    return grad_x.view(x.shape), grad_a, grad_b


@torch.library.custom_op("lightning_peft::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, lora_hidden: Tensor, mask: Tensor,
    scaling: float, dropout_p: float, compute_grad_x: bool, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Default implementation for all devices; a device kernel registered later takes precedence."""
    return backward_pytorch(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x, scale)


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x, scale=None):
    _check_scale(scale, lora_b.shape[0])
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    return grad_x, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale = inputs
    y, hidden, mask = output
    ctx.mark_non_differentiable(hidden, mask)
    # y only for the scale's gradient (module docstring), bias only to take it back out of y
    needs_scale = scale is not None and scale.requires_grad
    ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, mask, scale, y if needs_scale else None, bias if needs_scale else None)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p if _dropout_active(dropout_p, training) else 0.0


def scale_grad_pytorch(
    grad_y: Tensor, y: Tensor, bias: Optional[Tensor], scale: Tensor, x: Tensor, weight: Optional[Tensor], lora_b: Tensor,
    lora_hidden: Tensor, scaling: float,
) -> Tensor:
    """``grad_scale [D] = Σ_rows grad_y ⊙ z`` with ``z = x Wᵀ + scaling · lora_hidden Bᵀ`` the pre-scale output.

    z is ``(y − b) / scale`` (relative error ~ eps · (1 + |b| / |scale ⊙ z|)); the columns whose
    scale is exactly 0 lost z in y and are recomputed from x, W, lora_hidden and B (a GEMM of those
    columns only; finding them is a host sync on GPUs). Shapes: grad_y, y ``[*, D]``, x ``[*, K]``,
    lora_hidden ``[N, r]``.
    """
    d, k = lora_b.shape[0], x.shape[-1]
    g2, y2 = grad_y.reshape(-1, d), y.reshape(-1, d)
    shifted = y2 if bias is None else y2 - bias
    grad = torch.linalg.vecdot(shifted, g2, dim=0)  # [D]
    zero = scale == 0
    if not bool(zero.any()):
        return grad.div_(scale)
    cols = zero.nonzero().squeeze(1)
    z = torch.mm(lora_hidden, lora_b[cols].t()).mul_(scaling)  # [N, n_zero]
    if weight is not None:
        z.addmm_(x.reshape(-1, k), weight[cols].t())
    return grad.div_(torch.where(zero, 1, scale)).index_copy_(0, cols, torch.linalg.vecdot(z, g2[:, cols], dim=0))


@torch.library.custom_op("lightning_peft::lora_linear_scale_grad", mutates_args=())
def lora_linear_scale_grad(
    grad_y: Tensor, y: Tensor, bias: Optional[Tensor], scale: Tensor, x: Tensor, weight: Optional[Tensor], lora_b: Tensor,
    lora_hidden: Tensor, scaling: float,
) -> Tensor:
    """The scale's gradient (:func:`scale_grad_pytorch`), an op of its own: its zero-scale branch is
    data-dependent, which traced backward graphs cannot hold. Aten ops only: every device."""
    return scale_grad_pytorch(grad_y, y, bias, scale, x, weight, lora_b, lora_hidden, scaling)


@lora_linear_scale_grad.register_fake
def _lora_linear_scale_grad_fake(grad_y, y, bias, scale, x, weight, lora_b, lora_hidden, scaling):
    return scale.new_empty(scale.shape)


def _backward(ctx, grad_y, _grad_hidden, _grad_mask):
    x, weight, lora_a, lora_b, hidden, mask, scale, y, bias = ctx.saved_tensors
    needs_x, needs_w, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
    needs_scale = len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9]  # (a call without scale passes 9 inputs)
    grad_y = grad_y.contiguous()
    grad_x, grad_a, grad_b = torch.ops.lightning_peft.lora_linear_backward(
        grad_y, x, weight, lora_a, lora_b, hidden, mask, ctx.scaling, ctx.dropout_p, needs_x, scale
    )
    grad_scale = None
    if needs_scale:
        grad_scale = torch.ops.lightning_peft.lora_linear_scale_grad(grad_y, y, bias, scale, x, weight, lora_b, hidden, ctx.scaling)
    d, k = lora_b.shape[0], x.shape[-1]
    g2 = grad_y.reshape(-1, d)
    # The base weight and bias are frozen in every PEFT setup; if a user unfreezes them
    # (bias="all" / "lora_only", or a full fine-tune), plain matmuls give their gradients.
    grad_w = torch.mm((g2 if scale is None else g2 * scale).t(), x.reshape(-1, k)) if needs_w else None
    grad_bias = g2.sum(0) if needs_bias else None
    grad_x, grad_a, grad_b = (g if needed else None for g, needed in ((grad_x, needs_x), (grad_a, needs_a), (grad_b, needs_b)))
    return (grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None, grad_scale)[: len(ctx.needs_input_grad)]


lora_linear_forward.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, *, scaling: float, dropout_p: float,
    rng: Tensor, training: bool, scale: Optional[Tensor] = None,
) -> Tensor:
    """``x Wᵀ + b + scaling · dropout_p(x) Aᵀ Bᵀ`` (``scale ⊙ (x Wᵀ + scaling · dropout_p(x) Aᵀ Bᵀ) + b``
    with a scale); differentiable in x, A, B, scale (and W, b if they require grad).

    Args:
        x: ``[*, K]`` input.
        weight: ``[D, K]`` frozen base weight (any strides), or None for the LoRA branch alone
            (``b + scaling · dropout_p(x) Aᵀ Bᵀ``: a quantized base layer's caller adds its output).
        bias: ``[D]`` or None.
        lora_a: ``[r, K]``; lora_b: ``[D, r]``.
        scaling: multiplier of the LoRA term (``alpha / r`` or ``alpha / sqrt(r)``).
        dropout_p: drop probability of the LoRA branch's input, in [0, 1).
        rng: ``int64 [2]`` (seed, offset) that determines the dropout mask; same key, same mask.
        training: dropout applies only when True.
        scale: ``[D]`` per-output multiplier of everything but the bias (DoRA's magnitude over the
            row norms), or None. When it requires grad the output is saved for backward: modify it
            in place afterwards and backward raises.

    Returns:
        ``[*, D]`` output.
    """
    return torch.ops.lightning_peft.lora_linear_forward(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale)[0]

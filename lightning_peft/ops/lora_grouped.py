"""The grouped LoRA op: one batch whose rows use different adapters (or none), behind one ``torch.library`` op pair.

Batch row ``b`` of ``x`` uses adapter ``adapter_index[b]`` (``-1``: the base model only). The rows
of adapter ``j`` get exactly what the single-adapter op
(:func:`lightning_peft.ops.lora_linear.lora_linear`) gives on the sub-batch of those rows, in
their original order::

    y[rows_j] = lora_linear(x[rows_j], W, b, A_j, B_j, scaling_j, p_j, rng_j, training)
    y[rows_-1] = x[rows_-1] Wᵀ + b

including the dropout mask: adapter ``j``'s mask is keyed by ``rng_j = (seed_j, offset_j)`` over
its sub-batch (row ``i`` of the sub-batch is row ``i`` of the single op's mask), so a batch that
mixes adapters draws, bit for bit, the masks each adapter would draw alone.

Two ops, like the single-adapter pair, so autograd stays in Python and a device backend only
implements plain tensor-in/tensor-out kernels:

``lightning_peft::lora_grouped_forward(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps, training)``
    -> ``(y, hidden, order, offsets, mask, mask_sizes)``
``lightning_peft::lora_grouped_backward(grad_y, x, weight, lora_as, lora_bs, hidden, order, offsets, mask, mask_sizes, scalings, dropout_ps, compute_grad_x)``
    -> ``(grad_x, grad_as, grad_bs)``

Shapes (N = product of x's leading dims = tokens, B = x.shape[0] batch rows, K in features,
D out features, n adapters, r_j rank of adapter j, R = max r_j (0 without adapters)):
    x ``[B, *rest, K]``; weight ``[D, K]`` (any strides, e.g. a transposed Conv1D weight) or None
    (no base term: the LoRA branch plus bias only, for a quantized base its caller adds itself);
    bias ``[D]`` or None; lora_as[j] ``[r_j, K]``; lora_bs[j] ``[D, r_j]``; rngs[j] ``int64 [2]``;
    adapter_index ``int64 [B]`` (per batch row) or ``[N]`` (per token), values in [-1, n);
    y ``[B, *rest, D]``;
    units: the entries of adapter_index, U of them: batch rows (T = N / B tokens each) or, for a
      per-token index, tokens (T = 1); a unit's tokens are contiguous in x;
    order ``int64 [U]``: the units stably sorted by adapter (base units first), so that adapter j's
      units are ``order[offsets[j]:offsets[j + 1]]`` in their original order; the *sorted token
      order* lists the tokens of ``order[0]``, then of ``order[1]``, and so on;
    offsets ``int64 [n + 1]``: segment starts in ``order`` (``offsets[0]`` = number of base units,
      ``offsets[n]`` = U);
    hidden ``[N, R]`` in sorted token order: the row of token t of adapter j = ``dropout(x_t) A_jᵀ`` (already divided by
      the keep probability, like the single op's ``lora_hidden``), zero past ``r_j`` and on base rows;
    mask (``[0]`` when dropout is off for every adapter), per device like the single op:
      * CPU: ``uint8 [M]``, the single op's encoded drop positions of each adapter's sub-batch,
        concatenated in adapter order; ``mask_sizes[j]`` is adapter j's byte count (0 without
        dropout or rows);
      * other devices: packed keep-bits ``uint8 [N, ceil(K/8)]`` in sorted token order; row s holds
        row ``s - T * offsets[j]`` of adapter j's Philox mask; base rows are 0;
    mask_sizes ``int64 [n]``;
    grad_x ``[B, *rest, K]`` (``[0]`` when ``compute_grad_x`` is False); grad_as[j] ``[r_j, K]``;
    grad_bs[j] ``[D, r_j]``: an adapter without rows gets zero gradients (not None), so that
    optimizers step every adapter the same way (weight decay and momentum included).

The PyTorch implementation has three forms (:func:`choose_form` picks one from the shapes alone,
so the fake implementation knows the outputs' layout too):

* *segmented* (dropout on a per-token index, or the shapes the others do not fit): sort the units
  by adapter (a stable sort; nothing moves when they are sorted already), gather x into that order
  once (whole units: one memcpy per batch row), one GEMM pair per adapter on its contiguous segment
  writing the LoRA term straight into the sorted output, the base GEMM once over the whole batch
  accumulating onto it (beta = 1), and one gather puts the rows back;
* *batched* (units of many tokens: a per-row index over sequences, with or without dropout): every
  unit takes its adapter's zero-padded factors, two batched GEMMs (``bmm``), nothing moves; with
  dropout, each adapter's drops (drawn over its sub-batch, as the single op draws them) are moved
  to token order and mask one copy of x, as the single op masks its own; the backward likewise
  (per-unit ``bmm`` on x and grad_y in place, the units' factor gradients summed per adapter);
* *stacked* (no dropout, per-token index, few small adapters): all adapters' A stacked into one
  ``[sum r, K]`` GEMM over the whole batch, the columns of other adapters zeroed per token, one
  GEMM with the stacked, scaled B: no gathers, but GEMMs of width ``sum r`` instead of ``r_j``.

CUDA tensors take the kernels of csrc/lora_grouped.cu when they are built
(:mod:`lightning_peft.ops.lora_grouped_cuda`).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from lightning_peft.ops import cpu_backend
from lightning_peft.ops.dropout_mask import draw_drops, drop_threshold, encode_drop_positions, encode_hash_key
from lightning_peft.ops.philox import philox_keep_mask

# The module, not the package attribute of the same name (lightning_peft.ops re-exports the
# function lora_linear); its private helpers are looked up at each call, so a monkeypatched
# ``_uses_drop_positions`` (the tests' packed-mask mode) applies to both ops alike.
_single = importlib.import_module("lightning_peft.ops.lora_linear")

__all__ = [
    "lora_linear_grouped",
    "lora_grouped_forward",
    "lora_grouped_backward",
    "forward_pytorch",
    "backward_pytorch",
    "segments",
    "units_of",
    "choose_form",
    "FORMS",
    "BATCHED_MIN_TOKEN_RATIO",
    "STACKED_MAX_RANK_SUM",
]

# Thresholds of choose_form. The batched form gathers R·(K + D) weights per unit to save moving
# the unit's T·K inputs and T·D outputs; the stacked form's GEMMs have width sum(r_j) over the
# whole batch where the others have r_j (or R), but it moves nothing. Measured on CPU
# (benchmarks/bench_cpu_grouped.py, 8 rows x 128 tokens, 4 adapters r = 8, time / frozen base
# forward, 1 thread, a loaded 2-core machine): per-row index, batched 1.09-1.19x, stacked
# 1.15-1.27x, segmented 1.11-1.51x; per-token index, stacked 1.16-1.32x, segmented 1.12-1.36x.
BATCHED_MIN_TOKEN_RATIO = 2
STACKED_MAX_RANK_SUM = 64


_NAME = "lora_linear_grouped"  # error messages name the public function


def _dropout_active(dropout_p: float, training: bool) -> bool:
    return training and dropout_p > 0.0


def _require(ok: bool, message: Callable[[], str]) -> None:
    """Raise ``RuntimeError(message())`` unless ``ok``: a plain check (``torch._check`` costs ~2 us a
    call, and this op makes ~20 of them per call); the shapes it sees under compile are backed."""
    if not ok:
        raise RuntimeError(f"{_NAME}: {message()}")


def _out_features(weight: Optional[Tensor], lora_bs: Sequence[Tensor], bias: Optional[Tensor]) -> int:
    if weight is not None:
        return weight.shape[0]
    if len(lora_bs) > 0:
        return lora_bs[0].shape[0]
    _require(bias is not None, lambda: "with weight=None and no adapters, pass a bias to define the output size")
    return bias.shape[0]


def _check_inputs(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    rngs: Sequence[Tensor],
    adapter_index: Tensor,
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
) -> None:
    """Shapes, dtypes and list lengths (not the values of adapter_index: see :func:`_check_index_values`)."""
    n = len(lora_as)
    _require(
        len(lora_bs) == n and len(rngs) == n and len(scalings) == n and len(dropout_ps) == n,
        lambda: "lora_as, lora_bs, rngs, scalings and dropout_ps must have one entry per adapter, got lengths "
        f"{len(lora_as)}, {len(lora_bs)}, {len(rngs)}, {len(scalings)}, {len(dropout_ps)}",
    )
    _require(x.dim() >= 2, lambda: f"x must be [B, *, K] (a batch dimension first), got {tuple(x.shape)}")
    k = x.shape[-1]
    d = _out_features(weight, lora_bs, bias)
    if weight is not None:
        _require(weight.dim() == 2 and weight.shape[1] == k, lambda: f"weight must be [D, K={k}], got {tuple(weight.shape)}")
    if bias is not None:
        _require(bias.dim() == 1 and bias.shape[0] == d, lambda: f"bias must be [D={d}], got {tuple(bias.shape)}")
    for j in range(n):
        a, b, rng = lora_as[j], lora_bs[j], rngs[j]
        _require(a.dim() == 2 and a.shape[1] == k, lambda: f"lora_as[{j}] must be [r, K={k}], got {tuple(a.shape)}")
        _require(
            b.dim() == 2 and b.shape[0] == d and b.shape[1] == a.shape[0],
            lambda: f"lora_bs[{j}] must be [D, r] = [{d}, {a.shape[0]}], got {tuple(b.shape)}",
        )
        _require(rng.dtype == torch.int64 and rng.numel() == 2, lambda: f"rngs[{j}] must be an int64 tensor of 2 elements (seed, offset)")
        _require(0.0 <= dropout_ps[j] < 1.0, lambda: f"dropout_ps[{j}] must be in [0, 1), got {dropout_ps[j]}")
    _require(
        adapter_index.dtype == torch.int64 and adapter_index.dim() == 1,
        lambda: "adapter_index must be a 1-D int64 tensor (one entry per batch row), got "
        f"{adapter_index.dtype} {tuple(adapter_index.shape)}; build it with torch.tensor(indices, dtype=torch.int64)",
    )
    rows, tokens = x.shape[0], math.prod(x.shape[:-1])
    _require(
        adapter_index.shape[0] == rows or adapter_index.shape[0] == tokens,
        lambda: f"adapter_index has {adapter_index.shape[0]} entries but x {tuple(x.shape)} has {rows} batch rows "
        f"({tokens} tokens); give one adapter index per batch row",
    )


def _check_index_values(token_index: Tensor, n: int) -> None:
    """Every index in [-1, n) (one host sync: the op needs the segment sizes on the host anyway)."""
    if token_index.numel() == 0:
        return
    lo, hi = torch.aminmax(token_index)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= n:
        bad = lo if lo < -1 else hi
        raise ValueError(f"{_NAME}: adapter_index holds {bad}, outside [-1, {n}) for {n} adapters (-1 = base model only)")


def units_of(adapter_index: Tensor, lead_shape: Sequence[int]) -> tuple[int, int]:
    """``(U, T)``: the index's units (batch rows, or tokens for a per-token index) and tokens per unit.

    Args:
        adapter_index: ``int64 [B]`` or ``[N]``.
        lead_shape: x's leading dims ``[B, *rest]``; N is their product.
    """
    tokens = math.prod(lead_shape)
    units = adapter_index.shape[0]
    if units == tokens or units == 0:
        return units, 1
    return units, tokens // units


def segments(unit_index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(order, offsets)``: units stably sorted by adapter and the segment starts (module docstring).

    No host sync: a stable sort and a ``searchsorted`` on the index's device.
    """
    sorted_index, order = torch.sort(unit_index, stable=True)
    bounds = torch.arange(n + 1, dtype=torch.int64, device=unit_index.device)
    offsets = torch.searchsorted(sorted_index, bounds)  # offsets[j] = first sorted position with index >= j
    return order, offsets


FORMS = ("batched", "stacked", "segmented")


def choose_form(ranks: Sequence[int], dropout_active: bool, tokens_per_unit: int, k: int, d: int) -> str:
    """The forward's form for these shapes (module docstring; measured in benchmarks/bench_cpu_grouped.py).

    * ``"segmented"`` without adapters;
    * ``"batched"`` when each unit's tokens outweigh the adapter weights gathered for it:
      ``T·K >= BATCHED_MIN_TOKEN_RATIO · R·(K + D)`` (a per-row index over sequences; never for a
      per-token index, which would gather a weight copy per token), with or without dropout;
    * ``"segmented"`` with dropout otherwise (each adapter needs its own masked copy of its rows anyway);
    * ``"stacked"`` when the stacked width ``sum r_j`` is at most :data:`STACKED_MAX_RANK_SUM`
      (per-token indices with few, small adapters: it gathers nothing);
    * ``"segmented"`` otherwise.

    The backward takes the batched form for the shapes where the forward does (the others: segmented).
    """
    if sum(ranks) == 0:
        return "segmented"
    if tokens_per_unit * k >= BATCHED_MIN_TOKEN_RATIO * max(ranks) * (k + d):
        return "batched"
    if dropout_active:
        return "segmented"
    if sum(ranks) <= STACKED_MAX_RANK_SUM:
        return "stacked"
    return "segmented"


class _Permutation:
    """Moves ``[N, C]`` tensors between token order and sorted order, whole units at a time.

    ``order`` is a permutation of the U units of T tokens each; a unit is ``T * C`` contiguous
    elements, so a gather moves rows of ``T * C`` elements (one memcpy each for a per-row index).
    When the units are already sorted (``identity``) nothing moves.
    """

    def __init__(self, order: Tensor) -> None:
        self.order = order
        self.units = order.shape[0]
        self.identity = bool(torch.equal(order, torch.arange(self.units, device=order.device)))
        self._inverse: Optional[Tensor] = None

    def to_sorted(self, t2: Tensor) -> Tensor:
        """``t2 [N, C]`` (original order) in sorted order (``t2`` itself when nothing moves)."""
        if self.identity:
            return t2
        return t2.reshape(self.units, -1).index_select(0, self.order).view(t2.shape)

    def from_sorted(self, t2: Tensor) -> Tensor:
        """Inverse of :meth:`to_sorted`. A gather by the inverse permutation (CPU ``index_select``
        runs ~3x faster than ``index_copy_`` for these row sizes)."""
        if self.identity:
            return t2
        if self._inverse is None:
            self._inverse = torch.empty_like(self.order).index_copy_(
                0, self.order, torch.arange(self.units, device=self.order.device)
            )
        return t2.reshape(self.units, -1).index_select(0, self._inverse).view(t2.shape)


def _draw_segment_mask(n: int, k: int, x: Tensor, lora_a: Tensor, dropout_p: float, rng: Tensor) -> tuple[Tensor, Tensor]:
    """The single op's dropout draw for a sub-batch of ``n`` tokens ``[n, K]`` of ``x`` with adapter
    weight ``lora_a``: ``(dropped, mask)``.

    Same draw, same key, same layout as the single op on that sub-batch (its CPU kernels' hashed
    mask when they would run, else ``lora_linear._dropout_hidden``'s), so the mask is the one the
    single op would draw.
    """
    if cpu_backend.draws_hashed_masks(x, lora_a):
        keep = cpu_backend.hashed_keep_mask(rng, n, k, dropout_p)
        return (~keep).view(-1).nonzero().squeeze(1), encode_hash_key(rng)
    if _single._uses_drop_positions(x.device):
        dropped, increments = draw_drops(n * k, dropout_p, rng)
        return dropped, encode_drop_positions(increments, n * k, rng)
    mask = philox_keep_mask(rng.to(x.device), n, k, drop_threshold(dropout_p))
    return ~_single.unpack_mask(mask, k), mask


class _TokenOrderDrops:
    """Collects each adapter's drops (over its sub-batch, sorted order) as drops of ``[N, K]`` in token order.

    A sub-batch's unit ``i`` is unit ``units_j[i]`` of the batch, ``T·K`` contiguous elements in
    both, so the drop positions of unit ``i`` move by ``(units_j[i] - i)·TK``; bool drops (the
    packed form) are copied unit by unit. :meth:`zero_` then masks a whole-batch tensor at once.
    """

    def __init__(self, units: int, unit_numel: int, device: torch.device) -> None:
        self.units, self.unit_numel, self.device = units, unit_numel, device
        self.positions: List[Tensor] = []
        self.flags: Optional[Tensor] = None

    def add(self, dropped: Tensor, units_j: Tensor) -> None:
        """``dropped``: sorted int64 flat positions over the sub-batch (moved in place), or bool ``[n_j, K]``; ``units_j int64 [u_j]``."""
        if dropped.dtype == torch.bool:
            if self.flags is None:
                self.flags = torch.zeros((self.units, self.unit_numel), dtype=torch.bool, device=self.device)
            self.flags.index_copy_(0, units_j, dropped.reshape(units_j.shape[0], -1))
            return
        # The positions are sorted (draw_drops' order): unit i's drops are one slice, moved by a
        # scalar add: 17 us against 65 us for a per-drop int64 floor division and gather
        # (interleaved A/B, one adapter's 2 units x 256 tokens x 512 features, p = 0.1).
        step, targets = self.unit_numel, units_j.tolist()
        cuts = [0, *torch.searchsorted(dropped, torch.arange(1, len(targets), device=dropped.device) * step).tolist(), dropped.shape[0]]
        for i, unit in enumerate(targets):
            if unit != i and cuts[i] < cuts[i + 1]:
                dropped[cuts[i] : cuts[i + 1]] += (unit - i) * step  # dropped is the caller's fresh tensor
        self.positions.append(dropped)

    def zero_(self, values: Tensor) -> Tensor:
        """Zero the collected drops of the contiguous ``values [N, K]`` in place and return it."""
        if self.flags is not None:
            return values.masked_fill_(self.flags.view(values.shape), 0)
        if self.positions:
            values.view(-1).index_fill_(0, torch.cat(self.positions) if len(self.positions) > 1 else self.positions[0], 0)
        return values


def _unit_factors(
    lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor], slots: List[int], scale: Tensor, r_max: int, like: Tensor, d: int,
) -> tuple[Tensor, Tensor]:
    """Each unit's zero-padded factors: ``(A [U, R, K], B [U, D, R] · scale[u])``; slot n is the zero adapter of base units."""
    n, k = len(lora_as), like.shape[1]
    pad = torch.nn.functional.pad  # only for ranks below R (a copy each)
    a_pad = [a if a.shape[0] == r_max else pad(a, (0, 0, 0, r_max - a.shape[0])) for a in lora_as]
    b_pad = [b if b.shape[1] == r_max else pad(b, (0, r_max - b.shape[1])) for b in lora_bs]
    if n in slots:
        a_pad.append(like.new_zeros((r_max, k)))
        b_pad.append(like.new_zeros((d, r_max)))
    a_rows = torch.stack([a_pad[j] for j in slots])
    b_rows = torch.stack([b_pad[j] for j in slots]).mul_(scale[:, None, None])
    return a_rows, b_rows


def _forward_batched(
    x2: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
    unit_index: Tensor, tokens_per_unit: int, scalings: Sequence[float], order: Tensor, hidden: Tensor, d: int,
    drops: Optional[_TokenOrderDrops] = None, keeps: Optional[Sequence[float]] = None,
) -> Tensor:
    """The batched form: ``y [N, D]`` with each unit's own (zero-padded) factors in two batched GEMMs.

    Every unit gathers its adapter's ``A [R, K]`` and scaled ``B [D, R]`` (a zero pair for base
    units), so the LoRA GEMMs cost what the single op's do at rank R and x, y never move. With
    dropout (``drops``: every adapter's drops in token order; ``keeps[j]``: 1 / keep probability)
    one masked copy of x feeds the A GEMM, like the single op's. Measured against the segmented
    form (its x / y / grad gathers), the mixed training step of benchmarks/bench_cpu_mixed_batch.py
    over our single-adapter step (interleaved, medians): 1.04x -> 0.99x (CPU time, 1 thread, 9
    rotations, spread 0.96-1.11x vs 0.98-1.12x), 1.09-1.13x -> 1.05-1.06x (wall, 2 threads).
    """
    n, r_max, k = len(lora_as), hidden.shape[1], x2.shape[1]
    units = unit_index.shape[0]
    slots = [j if j >= 0 else n for j in unit_index.tolist()]
    scale = torch.tensor([scalings[j] if j < n else 0.0 for j in slots], dtype=x2.dtype, device=x2.device)
    a_rows, b_rows = _unit_factors(lora_as, lora_bs, slots, scale, r_max, x2, d)  # [U, R, K], [U, D, R] scaled
    x_lora = x2 if drops is None else drops.zero_(x2.clone(memory_format=torch.contiguous_format))
    x3 = x_lora.view(units, tokens_per_unit, k)
    # [R, K] x [K, T] per unit, then viewed [U, T, R]: the faster orientation on CPU BLAS (~1.4x)
    h = torch.bmm(a_rows, x3.transpose(1, 2)).transpose(1, 2)
    if keeps is not None:  # 1 / keep probability on the small [U, T, R] hidden (the single op's order)
        h = h * torch.tensor([keeps[j] if j < n else 1.0 for j in slots], dtype=x2.dtype, device=x2.device)[:, None, None]
    # The LoRA term first, then the base GEMM accumulates onto it (beta = 1), as in the single op.
    b_t = b_rows.transpose(1, 2)  # [U, R, D]
    y = torch.bmm(h, b_t) if bias is None else torch.baddbmm(bias, h, b_t)
    y2 = y.view(-1, d)
    if weight is not None:
        y2.addmm_(x2, weight.t())
    hidden.view(units, tokens_per_unit, r_max).copy_(h.index_select(0, order))  # sorted order, zero past r_j
    return y2


def _backward_batched(
    g2: Tensor, x2: Tensor, weight: Optional[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor], hidden: Tensor,
    order: Tensor, bounds_units: List[int], drops: Optional[_TokenOrderDrops], scalings: Sequence[float],
    dropout_ps: Sequence[float], compute_grad_x: bool,
) -> tuple[Optional[Tensor], List[Tensor], List[Tensor]]:
    """The batched form's backward: per-unit batched GEMMs on x, grad_y in token order (nothing moves
    but the small hidden), per-adapter sums of the units' factor gradients. ``grad_x [N, K]`` or None.

    It saves the segmented backward's three gathers (x, grad_y, grad_x): part of the gain measured
    in :func:`_forward_batched`.
    """
    n, units = len(lora_as), order.shape[0]
    r_max, k, d = hidden.shape[1], x2.shape[1], g2.shape[1]
    per_unit = x2.shape[0] // units
    slots = [n] * units
    order_list = order.tolist()
    for j in range(n):
        for u in order_list[bounds_units[j] : bounds_units[j + 1]]:
            slots[u] = j
    slot_t = torch.tensor(slots, dtype=torch.int64, device=x2.device)
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(units, device=order.device))
    h = hidden.view(units, per_unit, r_max).index_select(0, inverse)  # [U, T, R] token order
    factor = [s * (_single._keep_scale(p) if p > 0.0 else 1.0) for s, p in zip(scalings, dropout_ps)]
    scale = torch.tensor([factor[j] if j < n else 0.0 for j in slots], dtype=x2.dtype, device=x2.device)
    a_rows, b_rows = _unit_factors(lora_as, lora_bs, slots, scale, r_max, x2, d)  # B scaled by s_j / keep_j
    g3 = g2.view(units, per_unit, d)
    # (Bᵀ gᵀ)ᵀ per unit: [R, D] x [D, T] runs ~3x faster on CPU BLAS than [T, D] x [D, R]
    d_h = torch.bmm(b_rows.transpose(1, 2), g3.transpose(1, 2)).transpose(1, 2)  # [U, T, R]
    # (hᵀ g) per unit, [R, T] x [T, D]: the fast orientation on CPU BLAS (as in the single op)
    grad_b_units = torch.bmm(h.transpose(1, 2), g3)  # [U, R, D]
    x_lora = x2 if drops is None else drops.zero_(x2.clone(memory_format=torch.contiguous_format))
    grad_a_units = torch.bmm(d_h.transpose(1, 2), x_lora.view(units, per_unit, k))  # [U, R, K]
    # per adapter: the sum over its units (an adapter without units: zeros)
    grad_b_sum = grad_b_units.new_zeros((n + 1, r_max, d)).index_add_(0, slot_t, grad_b_units)
    grad_a_sum = grad_a_units.new_zeros((n + 1, r_max, k)).index_add_(0, slot_t, grad_a_units)
    grad_as = [grad_a_sum[j, : a.shape[0]].clone() for j, a in enumerate(lora_as)]  # own storage: outputs may not alias
    grad_bs = [grad_b_sum[j, : a.shape[0]].t().mul(scalings[j]).contiguous() for j, a in enumerate(lora_as)]
    if not compute_grad_x:
        return None, grad_as, grad_bs
    grad_x = torch.bmm(d_h, a_rows).view(-1, k)  # [N, K]: the LoRA term
    if drops is not None:
        drops.zero_(grad_x)
    if weight is not None:
        grad_x.addmm_(g2, weight)  # the base term accumulates onto the LoRA term (beta = 1)
    return grad_x, grad_as, grad_bs


def _forward_stacked(
    x2: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
    unit_index: Tensor, tokens_per_unit: int, scalings: Sequence[float], order: Tensor, hidden: Tensor, d: int,
) -> Tensor:
    """The stacked form: ``y [N, D]`` with two whole-batch GEMMs for the LoRA terms; fills ``hidden`` (sorted order)."""
    ranks = [a.shape[0] for a in lora_as]
    device = x2.device
    a_cat = torch.cat(list(lora_as), 0)  # [S, K], S = sum r_j
    b_cat = torch.cat([b * s for b, s in zip(lora_bs, scalings)], 1)  # [D, S], scalings folded in
    # column c belongs to adapter owner[c]; a token keeps the columns of its own adapter only
    rank_of = torch.tensor(ranks, device=device)
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=device), rank_of)
    h_all = torch.mm(x2, a_cat.t())  # [N, S]
    h_all.view(-1, tokens_per_unit, h_all.shape[1]).mul_(owner == unit_index[:, None, None])  # base units match no column
    # The LoRA term first, then the base GEMM accumulates onto it (beta = 1), as in the single op.
    y = torch.mm(h_all, b_cat.t()) if bias is None else torch.addmm(bias, h_all, b_cat.t())
    if weight is not None:
        y.addmm_(x2, weight.t())
    if hidden.shape[1] > 0:
        # backward's layout: row s of hidden = the own-adapter columns of the s-th sorted token, left-aligned
        h_sorted = h_all.view(order.shape[0], -1).index_select(0, order).view(h_all.shape)
        seg = unit_index[order].repeat_interleave(tokens_per_unit)  # adapter of each sorted token
        starts = torch.cumsum(rank_of, 0) - rank_of
        cols = torch.arange(hidden.shape[1], device=device)
        own = seg.clamp(min=0)
        src = (starts[own][:, None] + cols).clamp(max=h_all.shape[1] - 1)
        keep = (seg >= 0)[:, None] & (cols < rank_of[own][:, None])
        hidden.copy_(torch.gather(h_sorted, 1, src).mul_(keep))
    return y


def forward_pytorch(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
    rngs: Sequence[Tensor], adapter_index: Tensor, scalings: Sequence[float], dropout_ps: Sequence[float], training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pure-PyTorch forward: the fallback for every device. Shapes: module docstring."""
    _check_inputs(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps)
    n = len(lora_as)
    k, d = x.shape[-1], _out_features(weight, lora_bs, bias)
    x2 = x.reshape(-1, k)  # [N, K]
    n_tokens = x2.shape[0]
    unit_index = adapter_index.to(x.device)
    _check_index_values(unit_index, n)
    _, per_unit = units_of(adapter_index, x.shape[:-1])
    order, offsets = segments(unit_index, n)
    ranks = [a.shape[0] for a in lora_as]
    hidden = x2.new_zeros((n_tokens, max(ranks, default=0)))
    mask_sizes = torch.zeros((n,), dtype=torch.int64, device=x.device)
    active = [_dropout_active(p, training) for p in dropout_ps]
    empty_mask = x.new_empty((0,), dtype=torch.uint8)
    form = choose_form(ranks, any(active), per_unit, k, d)
    positions = _single._uses_drop_positions(x.device)
    packed = None if positions or not any(active) else torch.zeros((n_tokens, (k + 7) // 8), dtype=torch.uint8, device=x.device)
    if form == "stacked":
        _require(not any(active), lambda: "the stacked form has no dropout; choose_form gave it with dropout active")
        y = _forward_stacked(x2, weight, bias, lora_as, lora_bs, unit_index, per_unit, scalings, order, hidden, d)
        return y.view(*x.shape[:-1], d), hidden, order, offsets, empty_mask, mask_sizes
    if form == "batched":
        drops, keeps = None, None
        if any(active):
            drops = _TokenOrderDrops(order.shape[0], per_unit * k, x.device)
            keeps = [_single._keep_scale(p) if a else 1.0 for p, a in zip(dropout_ps, active)]
            chunks_b: List[Tensor] = []
            unit_bounds = offsets.tolist()
            for j in range(n):
                start, end = unit_bounds[j], unit_bounds[j + 1]
                if not active[j] or start == end:
                    continue
                dropped, mask_j = _draw_segment_mask((end - start) * per_unit, k, x, lora_as[j], dropout_ps[j], rngs[j])
                drops.add(dropped, order[start:end])
                if packed is not None:
                    packed[start * per_unit : end * per_unit] = mask_j
                else:
                    chunks_b.append(mask_j)
                    mask_sizes[j] = mask_j.numel()
            mask_b = packed if packed is not None else torch.cat(chunks_b) if chunks_b else empty_mask
        else:
            mask_b = empty_mask
        y = _forward_batched(x2, weight, bias, lora_as, lora_bs, unit_index, per_unit, scalings, order, hidden, d, drops, keeps)
        return y.view(*x.shape[:-1], d), hidden, order, offsets, mask_b, mask_sizes

    chunks: List[Tensor] = []
    perm = _Permutation(order)
    bounds = [b * per_unit for b in offsets.tolist()]  # token bounds of the segments in sorted order
    x_sorted = perm.to_sorted(x2)
    y_sorted = x2.new_empty((n_tokens, d))
    base_rows = y_sorted[: bounds[0]]
    base_rows.copy_(bias.expand_as(base_rows)) if bias is not None else base_rows.zero_()
    for j in range(n):
        start, end = bounds[j], bounds[j + 1]
        if start == end:
            continue
        x_seg = x_sorted[start:end]  # [n_j, K]: adapter j's sub-batch in its original order
        if active[j]:
            x_seg = x_seg.clone()  # x itself (or the sorted copy the base GEMM reads) stays intact
            dropped, mask_j = _draw_segment_mask(end - start, k, x, lora_as[j], dropout_ps[j], rngs[j])
            _single._zero_dropped_(x_seg, dropped)
            if packed is not None:
                packed[start:end] = mask_j
            else:
                chunks.append(mask_j)
                mask_sizes[j] = mask_j.numel()
        h = torch.mm(x_seg, lora_as[j].t())  # [n_j, r_j]
        if active[j]:
            h.mul_(_single._keep_scale(dropout_ps[j]))
        hidden[start:end, : ranks[j]] = h
        # The LoRA term first, written straight into the output rows (contiguous: sorted order).
        out = y_sorted[start:end]
        if bias is None:
            torch.mm(h, lora_bs[j].t(), out=out).mul_(scalings[j])
        else:
            torch.addmm(bias, h, lora_bs[j].t(), alpha=scalings[j], out=out)
    if weight is not None:
        y_sorted.addmm_(x_sorted, weight.t())  # the base GEMM once, accumulating onto the LoRA terms (beta = 1)
    y = perm.from_sorted(y_sorted)
    mask = packed if packed is not None else torch.cat(chunks) if chunks else empty_mask
    return y.view(*x.shape[:-1], d), hidden, order, offsets, mask, mask_sizes


@torch.library.custom_op("lightning_peft::lora_grouped_forward", mutates_args=())
def lora_grouped_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor],
    rngs: List[Tensor], adapter_index: Tensor, scalings: List[float], dropout_ps: List[float], training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Default implementation for all devices; a device kernel registered later takes precedence."""
    return forward_pytorch(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps, training)


@lora_grouped_forward.register_fake
def _lora_grouped_forward_fake(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps, training):
    _check_inputs(x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps)
    n = len(lora_as)
    k, d = x.shape[-1], _out_features(weight, lora_bs, bias)
    n_tokens = math.prod(x.shape[:-1])
    r_max = max((a.shape[0] for a in lora_as), default=0)
    y = x.new_empty((*x.shape[:-1], d))
    hidden = x.new_empty((n_tokens, r_max))
    order = x.new_empty((adapter_index.shape[0],), dtype=torch.int64)
    offsets = x.new_empty((n + 1,), dtype=torch.int64)
    any_active = any(_dropout_active(p, training) for p in dropout_ps)
    if any_active and _single._uses_drop_positions(x.device):
        mask = x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)
    elif any_active:
        mask = x.new_empty((n_tokens, (k + 7) // 8), dtype=torch.uint8)
    else:
        mask = x.new_empty((0,), dtype=torch.uint8)
    mask_sizes = x.new_empty((n,), dtype=torch.int64)
    return y, hidden, order, offsets, mask, mask_sizes


def _segment_masks(mask: Tensor, mask_sizes: Tensor) -> Optional[List[Tensor]]:
    """Adapter j's encoded CPU mask (``mask`` 1-D), or None for the packed form / no dropout."""
    if mask.dim() != 1 or mask.numel() == 0:
        return None
    return list(torch.split(mask, mask_sizes.tolist()))


def backward_pytorch(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor],
    hidden: Tensor, order: Tensor, offsets: Tensor, mask: Tensor, mask_sizes: Tensor,
    scalings: Sequence[float], dropout_ps: Sequence[float], compute_grad_x: bool,
) -> tuple[Tensor, List[Tensor], List[Tensor]]:
    """Pure-PyTorch backward. ``dropout_ps[j]`` is 0 where the forward ran without dropout. Shapes: module docstring."""
    n = len(lora_as)
    k = x.shape[-1]
    d = grad_y.shape[-1]
    x2 = x.reshape(-1, k)  # [N, K]
    g2 = grad_y.reshape(-1, d)  # [N, D]
    n_tokens = x2.shape[0]
    per_unit = n_tokens // order.shape[0] if order.shape[0] else 1
    unit_bounds = offsets.tolist()
    bounds = [b * per_unit for b in unit_bounds]
    encoded = _segment_masks(mask, mask_sizes)
    ranks = [a.shape[0] for a in lora_as]
    if n_tokens and choose_form(ranks, False, per_unit, k, d) == "batched":
        drops = None
        if any(p > 0.0 for p in dropout_ps):
            drops = _TokenOrderDrops(order.shape[0], per_unit * k, x.device)
            for j in range(n):
                start, end = bounds[j], bounds[j + 1]
                if dropout_ps[j] > 0.0 and start < end:
                    seg_mask = encoded[j] if encoded is not None else mask[start:end]
                    drops.add(_single._dropped_of(seg_mask, end - start, k, dropout_ps[j]), order[unit_bounds[j] : unit_bounds[j + 1]])
        grad_x, grad_as, grad_bs = _backward_batched(
            g2, x2, weight, lora_as, lora_bs, hidden, order, unit_bounds, drops, scalings, dropout_ps, compute_grad_x
        )
        return (grad_x.view(x.shape) if grad_x is not None else x.new_empty((0,))), grad_as, grad_bs
    perm = _Permutation(order)
    g_sorted = perm.to_sorted(g2)
    x_sorted = perm.to_sorted(x2)
    private_x = not perm.identity  # a gathered copy: may be masked in place
    gx_sorted = x2.new_empty((n_tokens, k)) if compute_grad_x else None
    if gx_sorted is not None:
        gx_sorted[: bounds[0]].zero_()  # base rows: no LoRA term
    grad_as: List[Tensor] = []
    grad_bs: List[Tensor] = []
    for j in range(n):
        a, b, s, p = lora_as[j], lora_bs[j], scalings[j], dropout_ps[j]
        start, end = bounds[j], bounds[j + 1]
        if start == end:  # no rows: zero gradients (module docstring)
            grad_as.append(torch.zeros_like(a))
            grad_bs.append(torch.zeros_like(b))
            continue
        g_seg = g_sorted[start:end]  # [n_j, D]
        h = hidden[start:end, : a.shape[0]]  # [n_j, r_j]
        # (hᵀ g)ᵀ: the [r, n] x [n, D] orientation is the fast one on CPU BLAS (as in the single op)
        grad_bs.append(torch.mm(h.t(), g_seg).t().mul_(s).contiguous())
        keep = _single._keep_scale(p) if p > 0.0 else 1.0
        d_h = torch.mm(g_seg, b).mul_(s * keep)  # [n_j, r_j]
        x_seg = x_sorted[start:end]
        dropped = None
        if p > 0.0:
            seg_mask = encoded[j] if encoded is not None else mask[start:end]
            dropped = _single._dropped_of(seg_mask, end - start, k, p)
            x_seg = _single._zero_dropped_(x_seg if private_x else x_seg.clone(), dropped)
        grad_as.append(torch.mm(d_h.t(), x_seg))
        if gx_sorted is not None:
            gx = torch.mm(d_h, a, out=gx_sorted[start:end])
            if dropped is not None:
                _single._zero_dropped_(gx, dropped)
    if gx_sorted is None:
        return x.new_empty((0,)), grad_as, grad_bs
    grad_x = perm.from_sorted(gx_sorted)
    if weight is not None:
        grad_x.addmm_(g2, weight)  # the base term accumulates onto the LoRA term (beta = 1)
    return grad_x.view(x.shape), grad_as, grad_bs


@torch.library.custom_op("lightning_peft::lora_grouped_backward", mutates_args=())
def lora_grouped_backward(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor], hidden: Tensor,
    order: Tensor, offsets: Tensor, mask: Tensor, mask_sizes: Tensor, scalings: List[float], dropout_ps: List[float],
    compute_grad_x: bool,
) -> tuple[Tensor, List[Tensor], List[Tensor]]:
    """Default implementation for all devices; a device kernel registered later takes precedence."""
    return backward_pytorch(grad_y, x, weight, lora_as, lora_bs, hidden, order, offsets, mask, mask_sizes, scalings, dropout_ps, compute_grad_x)


@lora_grouped_backward.register_fake
def _lora_grouped_backward_fake(grad_y, x, weight, lora_as, lora_bs, hidden, order, offsets, mask, mask_sizes, scalings, dropout_ps, compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    return grad_x, [a.new_empty(a.shape) for a in lora_as], [b.new_empty(b.shape) for b in lora_bs]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_as, lora_bs, rngs, adapter_index, scalings, dropout_ps, training = inputs
    _, hidden, order, offsets, mask, mask_sizes = output
    ctx.mark_non_differentiable(hidden, order, offsets, mask, mask_sizes)
    n = len(lora_as)
    ctx.n = n
    ctx.has_weight = weight is not None
    ctx.save_for_backward(x, weight, hidden, order, offsets, mask, mask_sizes, *lora_as, *lora_bs)
    ctx.scalings = list(scalings)
    ctx.dropout_ps = [p if _dropout_active(p, training) else 0.0 for p in dropout_ps]
    # Flags of the actual tensors: ctx.needs_input_grad flattens list arguments.
    ctx.needs = (
        x.requires_grad,
        weight is not None and weight.requires_grad,
        bias is not None and bias.requires_grad,
        [a.requires_grad for a in lora_as],
        [b.requires_grad for b in lora_bs],
    )


def _backward(ctx, grad_y, _hidden, _order, _offsets, _mask, _mask_sizes):
    x, weight, hidden, order, offsets, mask, mask_sizes, *factors = ctx.saved_tensors
    lora_as, lora_bs = factors[: ctx.n], factors[ctx.n :]
    needs_x, needs_w, needs_bias, needs_as, needs_bs = ctx.needs
    grad_y = grad_y.contiguous()
    grad_x, grad_as, grad_bs = torch.ops.lightning_peft.lora_grouped_backward(
        grad_y, x, weight, lora_as, lora_bs, hidden, order, offsets, mask, mask_sizes, ctx.scalings, ctx.dropout_ps, needs_x
    )
    d = grad_y.shape[-1]
    # A frozen base in every PEFT setup; if a user unfreezes it, plain matmuls give its gradients.
    grad_w = torch.mm(grad_y.reshape(-1, d).t(), x.reshape(-1, x.shape[-1])) if needs_w else None
    grad_bias = grad_y.reshape(-1, d).sum(0) if needs_bias else None
    grad_as = [g if needed else None for g, needed in zip(grad_as, needs_as)]
    grad_bs = [g if needed else None for g, needed in zip(grad_bs, needs_bs)]
    # The float lists are leaves of autograd's input structure, except when empty (then a list).
    floats = None if ctx.n else []
    return grad_x if needs_x else None, grad_w, grad_bias, grad_as, grad_bs, [None] * ctx.n, None, floats, floats, None


lora_grouped_forward.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_grouped(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    *,
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    rngs: Sequence[Tensor],
    adapter_index: Tensor,
    training: bool,
) -> Tensor:
    """A mixed-adapter batch: row b gets ``lora_linear`` with adapter ``adapter_index[b]`` (-1: base only).

    Differentiable in x and every adapter's factors (and W, b if they require grad); an adapter
    without rows in the batch gets zero gradients.

    Args:
        x: ``[B, *, K]`` input; every token of batch row b uses adapter ``adapter_index[b]``.
        weight: ``[D, K]`` frozen base weight (any strides), or None for no base term.
        bias: ``[D]`` or None.
        lora_as: adapter j's ``A_j [r_j, K]`` (ranks may differ); lora_bs: ``B_j [D, r_j]``.
        scalings: adapter j's multiplier of its LoRA term.
        dropout_ps: adapter j's drop probability in [0, 1).
        rngs: adapter j's ``int64 [2]`` (seed, offset): its mask over its sub-batch, as the single op draws it.
        adapter_index: ``int64 [B]`` (or ``[N]``, one per token), values in [-1, len(lora_as)).
        training: dropout applies only when True.

    Returns:
        ``[B, *, D]`` output.
    """
    return torch.ops.lightning_peft.lora_grouped_forward(
        x, weight, bias, list(lora_as), list(lora_bs), list(rngs), adapter_index, list(scalings), list(dropout_ps), training
    )[0]

"""The grouped LoRA op (mixed-adapter batches) against the single-adapter op on each adapter's sub-batch
and against a from-scratch float64 recomputation, plus op-registration, compile and bad-input checks."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from lightning_peft.ops import cpu_backend, lora_grouped_cpu, lora_linear, lora_linear_grouped
from lightning_peft.ops.dropout_mask import quantized_drop_probability
from lightning_peft.ops.lora_linear import dropout_keep_mask

single_module = importlib.import_module("lightning_peft.ops.lora_linear")
grouped_module = importlib.import_module("lightning_peft.ops.lora_grouped")
OP_FWD = torch.ops.lightning_peft.lora_grouped_forward.default
OP_BWD = torch.ops.lightning_peft.lora_grouped_backward.default
SINGLE_FWD = torch.ops.lightning_peft.lora_linear_forward.default

RANKS = (2, 5, 3)
SCALINGS = (0.5, 1.25, 2.0)


@pytest.fixture(params=["kernels", "positions", "packed"])
def mask_form(request, monkeypatch):
    """Each CPU mask form: the compiled CPU kernels' hashed mask (the grouped op's CPU kernels with
    dropout, its PyTorch path otherwise: both draw it), and
    the PyTorch path's CPU drop positions and the Philox packed keep-bits other devices draw (here
    on CPU tensors); both ops follow the same switches."""
    if request.param == "kernels":
        assert cpu_backend.load(), cpu_backend.status()["reason"]
        # the grouped CPU kernels on every unit, however few tokens (per-token indices included)
        monkeypatch.setattr(lora_grouped_cpu, "MIN_UNIT_TOKENS", 1)
    monkeypatch.setattr(cpu_backend._state, "force_fallback", request.param != "kernels")
    replay = request.param != "packed"
    monkeypatch.setattr(single_module, "_uses_drop_positions", lambda device: replay)
    return request.param


@pytest.fixture(params=["auto", *grouped_module.FORMS])
def form(request, monkeypatch):
    """The forward's (and backward's) form: as choose_form picks it, or forced to each one (stacked: without dropout)."""
    if request.param != "auto":

        def forced(ranks, dropout_active, *shape):
            # without adapters the segmented form is the only one; the stacked form has no dropout
            return "segmented" if sum(ranks) == 0 or (dropout_active and request.param == "stacked") else request.param

        monkeypatch.setattr(grouped_module, "choose_form", forced)
    return request.param


def make_case(lead=(6, 3), k=19, d=13, ranks=RANKS, dtype=torch.float64, bias=True, weight="plain", seed=0):
    """x, weight (plain [D, K], a transposed [K, D] view, or None), bias, As, Bs, rngs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, dtype=dtype, generator=g)
    if weight == "transposed":  # GPT-2 Conv1D stores [in, out]; the op gets a transposed view
        w = torch.randn(k, d, dtype=dtype, generator=g).t()
    elif weight == "plain":
        w = torch.randn(d, k, dtype=dtype, generator=g)
    else:
        w = None
    b = torch.randn(d, dtype=dtype, generator=g) if bias else None
    a_s = [torch.randn(r, k, dtype=dtype, generator=g) for r in ranks]
    b_s = [torch.randn(d, r, dtype=dtype, generator=g) for r in ranks]
    rngs = [torch.tensor([101 + 7 * j, 3 + j]) for j in range(len(ranks))]
    return x, w, b, a_s, b_s, rngs


def leaves(x, a_s, b_s):
    """Fresh leaf copies requiring grad: (x, As, Bs)."""
    return x.detach().clone().requires_grad_(True), [a.detach().clone().requires_grad_(True) for a in a_s], [
        b.detach().clone().requires_grad_(True) for b in b_s
    ]


def token_rows(adapter_index, lead, j):
    """The flat token indices of adapter j (original order), for a per-row or per-token index."""
    n_tokens = math.prod(lead)
    per = n_tokens // adapter_index.shape[0]
    units = (adapter_index == j).nonzero().flatten()
    return (units[:, None] * per + torch.arange(per)).flatten()


def per_adapter_reference(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y):
    """Output and gradients from the single-adapter op on each adapter's sub-batch (base rows: x Wᵀ + b)."""
    k, lead = x.shape[-1], x.shape[:-1]
    x_l, a_l, b_l = leaves(x, a_s, b_s)
    w_eff = w if w is not None else torch.zeros(b_s[0].shape[0], k, dtype=x.dtype)  # no base term
    x2, g2 = x_l.reshape(-1, k), grad_y.reshape(-1, grad_y.shape[-1])
    y = torch.empty(x2.shape[0], w_eff.shape[0], dtype=x.dtype)
    total = sum((a.sum() + bb.sum()) * 0 for a, bb in zip(a_l, b_l))  # adapters without rows: zero grads
    for j in range(-1, len(a_s)):
        rows = token_rows(index, lead, j)
        if rows.numel() == 0:
            continue
        if j < 0:
            out = x2[rows] @ w_eff.t() + (b if b is not None else 0)
        else:
            out = lora_linear(x2[rows], w_eff, b, a_l[j], b_l[j], scaling=SCALINGS[j], dropout_p=ps[j], rng=rngs[j], training=training)
        y[rows] = out.detach()
        total = total + (out * g2[rows]).sum()
    grads = torch.autograd.grad(total, [x_l, *a_l, *b_l])
    return y.view(*lead, -1), grads


def from_scratch_reference(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y):
    """Plain float64 math; adapter j's keep mask is the single op's mask on its sub-batch."""
    k, lead = x.shape[-1], x.shape[:-1]
    x_l, a_l, b_l = leaves(x.double(), [a.double() for a in a_s], [bb.double() for bb in b_s])
    x2 = x_l.reshape(-1, k)
    d = b_s[0].shape[0]
    y = x2 @ w.double().t() if w is not None else torch.zeros(x2.shape[0], d, dtype=torch.float64)
    if b is not None:
        y = y + b.double()
    lora = torch.zeros_like(y)
    for j in range(len(a_s)):
        rows = token_rows(index, lead, j)
        if rows.numel() == 0:
            lora = lora + 0 * (a_l[j].sum() + b_l[j].sum())
            continue
        xj = x2[rows]
        if training and ps[j] > 0:
            _, _, mask = SINGLE_FWD(x[..., :].reshape(-1, k)[rows], a_s[j].new_zeros(d, k), None, a_s[j], b_s[j], rngs[j], 1.0, ps[j], True)
            keep = dropout_keep_mask(mask, rows.numel(), k, ps[j]).double()
            xj = xj * keep / (1.0 - quantized_drop_probability(ps[j]))
        lora = lora.index_add(0, rows, SCALINGS[j] * (xj @ a_l[j].t()) @ b_l[j].t())
    y = y + lora
    grads = torch.autograd.grad((y * grad_y.reshape(y.shape).double()).sum(), [x_l, *a_l, *b_l])
    return y.view(*lead, d), grads


def run_grouped(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y):
    x_l, a_l, b_l = leaves(x, a_s, b_s)
    y = lora_linear_grouped(x_l, w, b, a_l, b_l, scalings=SCALINGS[: len(a_s)], dropout_ps=ps, rngs=rngs, adapter_index=index, training=training)
    grads = torch.autograd.grad(y, [x_l, *a_l, *b_l], grad_y)
    return y.detach(), grads


# (name, lead dims, adapter_index): unsorted rows; an adapter with no rows; all base; already sorted;
# a per-token index; a 2-D input; a single batch row.
INDEX_CASES = [
    ("unsorted", (6, 3), [2, -1, 0, 2, 1, -1]),
    ("adapter_without_rows", (6, 3), [2, -1, 0, 2, 0, -1]),
    ("all_base", (6, 3), [-1, -1, -1, -1, -1, -1]),
    ("sorted_no_base", (6, 3), [0, 0, 1, 2, 2, 2]),
    ("per_token", (2, 4), [1, 0, -1, 2, 2, 0, 1, 1]),
    ("two_dim", (7,), [1, 0, -1, 2, 2, 0, 1]),
    ("three_lead_dims", (4, 2, 3), [2, 0, 0, 1]),
    ("one_row", (1, 5), [1]),
]
MODES = [(0.0, True), (0.3, True), (0.3, False), (0.1, True)]  # (dropout_p, training)


@pytest.mark.parametrize("drop_p,training", MODES)
@pytest.mark.parametrize("name,lead,index", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_matches_single_op_on_each_sub_batch(name, lead, index, drop_p, training, mask_form, form):
    x, w, b, a_s, b_s, rngs = make_case(lead=lead)
    index = torch.tensor(index)
    ps = [drop_p] * len(a_s)
    grad_y = torch.randn(*lead, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, grads = run_grouped(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y)
    y_ref, grads_ref = per_adapter_reference(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y)
    y_fs, grads_fs = from_scratch_reference(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_fs, rtol=1e-12, atol=1e-12)
    for ours, ref, fs in zip(grads, grads_ref, grads_fs):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours, fs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight", ["plain", "transposed", None])
@pytest.mark.parametrize("drop_p,training", [(0.0, True), (0.3, True)])
def test_weight_layouts_and_optional_terms(weight, bias, drop_p, training, mask_form, form):
    x, w, b, a_s, b_s, rngs = make_case(bias=bias, weight=weight)
    index = torch.tensor([2, -1, 0, 2, 1, -1])
    ps = [drop_p] * 3
    grad_y = torch.randn(6, 3, 13, dtype=torch.float64)
    y, grads = run_grouped(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y)
    y_ref, grads_ref = from_scratch_reference(x, w, b, a_s, b_s, rngs, ps, index, training, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(grads, grads_ref):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    if weight is None:  # no base term at all: base rows are the bias (or zero)
        torch.testing.assert_close(y[1], b.expand(3, -1) if bias else torch.zeros(3, 13, dtype=torch.float64))


def test_per_adapter_dropout_probabilities_and_keys(mask_form):
    """Adapters with p = 0 and p > 0 in one batch, each with its own key, match the single op."""
    x, w, b, a_s, b_s, rngs = make_case(lead=(8, 4))
    index = torch.tensor([1, 0, 2, 1, -1, 0, 2, 2])
    ps = [0.0, 0.25, 0.05]
    grad_y = torch.randn(8, 4, 13, dtype=torch.float64)
    y, grads = run_grouped(x, w, b, a_s, b_s, rngs, ps, index, True, grad_y)
    y_ref, grads_ref = per_adapter_reference(x, w, b, a_s, b_s, rngs, ps, index, True, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(grads, grads_ref):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("drop_p", [0.1, 0.3])
def test_masks_are_the_single_ops_masks_bit_for_bit(drop_p, mask_form, form):
    x, w, b, a_s, b_s, rngs = make_case(lead=(6, 3))
    index = torch.tensor([2, -1, 0, 2, 1, 0])
    k = x.shape[-1]
    y, hidden, order, offsets, mask, mask_sizes = OP_FWD(x, w, b, a_s, b_s, rngs, index, list(SCALINGS), [drop_p] * 3, True)
    torch.testing.assert_close(order, torch.sort(index, stable=True).indices, rtol=0, atol=0)
    torch.testing.assert_close(offsets, torch.tensor([1, 3, 4, 6]), rtol=0, atol=0)
    chunks = list(torch.split(mask, mask_sizes.tolist())) if mask_form != "packed" else None
    for j in range(3):
        rows = token_rows(index, (6, 3), j)
        _, hidden_j, mask_j = SINGLE_FWD(x.reshape(-1, k)[rows], w, b, a_s[j], b_s[j], rngs[j], SCALINGS[j], drop_p, True)
        start, end = 3 * int(offsets[j]), 3 * int(offsets[j + 1])
        ours = chunks[j] if chunks is not None else mask[start:end]
        assert ours.dtype == torch.uint8 and torch.equal(ours, mask_j), f"adapter {j}"
        torch.testing.assert_close(hidden[start:end, : RANKS[j]], hidden_j, rtol=1e-13, atol=1e-13)
        assert not hidden[start:end, RANKS[j] :].any()  # zero padding past r_j
    assert not hidden[:3].any()  # the base row


def test_all_base_rows_give_the_frozen_linear_and_zero_adapter_grads(form):
    x, w, b, a_s, b_s, rngs = make_case()
    x_l, a_l, b_l = leaves(x, a_s, b_s)
    y = lora_linear_grouped(x_l, w, b, a_l, b_l, scalings=SCALINGS, dropout_ps=[0.3] * 3, rngs=rngs, adapter_index=torch.full((6,), -1), training=True)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-13, atol=1e-13)
    y.sum().backward()
    for t in (*a_l, *b_l):
        assert t.grad is not None and not t.grad.any()  # zeros, not None: optimizers step every adapter alike
    torch.testing.assert_close(x_l.grad, torch.ones(6, 3, 13, dtype=torch.float64) @ w, rtol=1e-13, atol=1e-13)


def test_frozen_base_weight_and_bias_gradients_when_they_require_grad(mask_form):
    x, w, b, a_s, b_s, rngs = make_case()
    index = torch.tensor([2, -1, 0, 2, 1, -1])
    w_l, bias_l = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    grad_y = torch.randn(6, 3, 13, dtype=torch.float64)
    y = lora_linear_grouped(x, w_l, bias_l, a_s, b_s, scalings=SCALINGS, dropout_ps=[0.3] * 3, rngs=rngs, adapter_index=index, training=True)
    gw, gb = torch.autograd.grad(y, [w_l, bias_l], grad_y)
    torch.testing.assert_close(gw, grad_y.reshape(-1, 13).t() @ x.reshape(-1, 19), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, grad_y.reshape(-1, 13).sum(0), rtol=1e-12, atol=1e-12)


def test_gradcheck_float64_with_dropout(mask_form, form):
    x, w, b, a_s, b_s, rngs = make_case(lead=(4, 2), k=6, d=5, ranks=(2, 3))
    index = torch.tensor([1, -1, 0, 1])

    def f(x, w, b, a0, a1, b0, b1):
        return lora_linear_grouped(x, w, b, [a0, a1], [b0, b1], scalings=[1.3, 0.7], dropout_ps=[0.3, 0.2], rngs=rngs, adapter_index=index, training=True)

    inputs = tuple(t.clone().requires_grad_(True) for t in (x, w, b, *a_s, *b_s))
    assert torch.autograd.gradcheck(f, inputs)


def test_different_keys_give_different_masks_same_key_same_mask(mask_form):
    x, w, b, a_s, b_s, rngs = make_case(lead=(4, 8), k=40)
    index = torch.tensor([0, 1, 0, 1])
    first = OP_FWD(x, w, b, a_s[:2], b_s[:2], [rngs[0], rngs[0]], index, [1.0, 1.0], [0.3, 0.3], True)
    again = OP_FWD(x, w, b, a_s[:2], b_s[:2], [rngs[0], rngs[0]], index, [1.0, 1.0], [0.3, 0.3], True)
    other = OP_FWD(x, w, b, a_s[:2], b_s[:2], [rngs[0], rngs[1]], index, [1.0, 1.0], [0.3, 0.3], True)
    assert torch.equal(first[4], again[4])
    assert not torch.equal(first[4], other[4])


@pytest.mark.parametrize(
    "ranks,active,per_unit,k,d,expected",
    [
        ((8, 8, 8, 8), True, 128, 512, 512, "batched"),  # dropout on sequences: one masked copy of x
        ((8, 8, 8, 8), True, 1, 512, 512, "segmented"),  # dropout, per-token index: each adapter masks its own copy
        ((), False, 128, 512, 512, "segmented"),  # no adapters
        ((8, 8, 8, 8), False, 128, 512, 512, "batched"),  # sequences: x and y never move
        ((8, 16), False, 128, 512, 1536, "batched"),
        ((8, 8, 8, 8), False, 1, 512, 512, "stacked"),  # per-token index, few small adapters
        ((64, 64), False, 1, 512, 512, "segmented"),  # per-token index, stacked width too large
        ((64, 64), False, 4, 512, 512, "segmented"),  # short units: the weight gather would cost more
    ],
)
def test_choose_form(ranks, active, per_unit, k, d, expected):
    assert grouped_module.choose_form(ranks, active, per_unit, k, d) == expected


# ---- op registration -------------------------------------------------------------------------


def _opcheck_samples():
    """(name, args) of the forward op: dropout on/off/eval, bias / weight None, per-token index, empty adapter list."""
    x, w, b, a_s, b_s, rngs = make_case(lead=(6, 3), dtype=torch.float32)
    index = torch.tensor([2, -1, 0, 2, 1, -1])
    yield "dropout", (x, w, b, a_s, b_s, rngs, index, list(SCALINGS), [0.3] * 3, True)
    yield "no_dropout", (x, w, b, a_s, b_s, rngs, index, list(SCALINGS), [0.0] * 3, True)
    yield "eval", (x, w, b, a_s, b_s, rngs, index, list(SCALINGS), [0.3] * 3, False)
    yield "no_bias_no_weight", (x, None, None, a_s, b_s, rngs, index, list(SCALINGS), [0.2, 0.0, 0.1], True)
    yield "transposed_weight", (x, w.t().contiguous().t(), b, a_s, b_s, rngs, index, list(SCALINGS), [0.3] * 3, True)
    per_token = torch.tensor([0, 1, -1, 2] * 4 + [1, 1])
    yield "per_token", (x, w, b, a_s, b_s, rngs, per_token, list(SCALINGS), [0.3] * 3, True)
    yield "no_adapters", (x, w, b, [], [], [], torch.full((6,), -1), [], [], True)


@pytest.mark.parametrize("name,args", list(_opcheck_samples()), ids=[n for n, _ in _opcheck_samples()])
def test_opcheck_forward(name, args, mask_form, form):
    x, w, b, a_s, b_s, *rest = args
    for t in (x, *a_s, *b_s):
        t.requires_grad_(True)
    torch.library.opcheck(OP_FWD, (x, w, b, a_s, b_s, *rest))


@pytest.mark.parametrize("name,args", list(_opcheck_samples()), ids=[n for n, _ in _opcheck_samples()])
@pytest.mark.parametrize("compute_grad_x", [True, False])
def test_opcheck_backward(name, args, compute_grad_x, mask_form):
    x, w, b, a_s, b_s, rngs, index, scalings, ps, training = args
    y, hidden, order, offsets, mask, mask_sizes = OP_FWD(*args)
    effective = [p if training else 0.0 for p in ps]
    torch.library.opcheck(
        OP_BWD, (torch.randn_like(y), x, w, a_s, b_s, hidden, order, offsets, mask, mask_sizes, scalings, effective, compute_grad_x)
    )


@pytest.mark.parametrize("drop_p,training", [(0.0, False), (0.3, True)])
def test_torch_compile_fullgraph_matches_eager(drop_p, training, mask_form):
    x, w, b, a_s, b_s, rngs = make_case(lead=(6, 3), dtype=torch.float32)
    index = torch.tensor([2, -1, 0, 2, 1, -1])

    def f(x, a0, a1, a2, b0, b1, b2):
        y = lora_linear_grouped(x, w, b, [a0, a1, a2], [b0, b1, b2], scalings=SCALINGS, dropout_ps=[drop_p] * 3, rngs=rngs, adapter_index=index, training=training)
        return torch.nn.functional.gelu(y).sum()

    eager_in = [t.clone().requires_grad_(True) for t in (x, *a_s, *b_s)]
    compiled_in = [t.clone().requires_grad_(True) for t in (x, *a_s, *b_s)]
    torch._dynamo.reset()
    out_c = torch.compile(f, fullgraph=True)(*compiled_in)
    out_e = f(*eager_in)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-4)
    out_c.backward()
    out_e.backward()
    for c, e in zip(compiled_in, eager_in):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-5, atol=1e-4)


def test_half_precision_inputs_run(mask_form):
    x, w, b, a_s, b_s, rngs = make_case(dtype=torch.bfloat16)
    index = torch.tensor([2, -1, 0, 2, 1, -1])
    x_l, a_l, b_l = leaves(x, a_s, b_s)
    y = lora_linear_grouped(x_l, w, b, a_l, b_l, scalings=SCALINGS, dropout_ps=[0.1] * 3, rngs=rngs, adapter_index=index, training=True)
    y_ref, _ = from_scratch_reference(x, w, b, a_s, b_s, rngs, [0.1] * 3, index, True, torch.ones(6, 3, 13))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=0.05, atol=0.5)
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (x_l, *a_l, *b_l))


# ---- bad input ---------------------------------------------------------------------------------


def _call(x, w, b, a_s, b_s, rngs, index, scalings=SCALINGS, ps=(0.1, 0.1, 0.1)):
    return lora_linear_grouped(x, w, b, a_s, b_s, scalings=scalings, dropout_ps=ps, rngs=rngs, adapter_index=index, training=True)


@pytest.mark.parametrize(
    "index,error,match",
    [
        (torch.tensor([0, 1, 3, 0, 0, 0]), ValueError, r"adapter_index holds 3, outside \[-1, 3\)"),
        (torch.tensor([0, 1, -2, 0, 0, 0]), ValueError, r"adapter_index holds -2"),
        (torch.tensor([0, 1, 2]), RuntimeError, r"adapter_index has 3 entries but x \(6, 3, 19\) has 6 batch rows"),
        (torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32), RuntimeError, "adapter_index must be a 1-D int64 tensor"),
        (torch.tensor([0.0, 1, 2, 0, 1, 2]), RuntimeError, "adapter_index must be a 1-D int64 tensor"),
        (torch.zeros(6, 1, dtype=torch.int64), RuntimeError, "adapter_index must be a 1-D int64 tensor"),
    ],
)
def test_rejects_bad_adapter_index(index, error, match):
    x, w, b, a_s, b_s, rngs = make_case()
    with pytest.raises(error, match=match):
        _call(x, w, b, a_s, b_s, rngs, index)


def test_rejects_mismatched_lists_and_shapes():
    x, w, b, a_s, b_s, rngs = make_case()
    index = torch.tensor([2, -1, 0, 2, 1, -1])
    with pytest.raises(RuntimeError, match="must have one entry per adapter, got lengths 3, 2, 3, 3, 3"):
        _call(x, w, b, a_s, b_s[:2], rngs, index)
    with pytest.raises(RuntimeError, match="must have one entry per adapter"):
        _call(x, w, b, a_s, b_s, rngs, index, scalings=(1.0, 1.0))
    with pytest.raises(RuntimeError, match="must have one entry per adapter"):
        _call(x, w, b, a_s, b_s, rngs[:1], index)
    with pytest.raises(RuntimeError, match=r"lora_as\[1\] must be \[r, K=19\]"):
        _call(x, w, b, [a_s[0], a_s[1][:, :-1], a_s[2]], b_s, rngs, index)
    with pytest.raises(RuntimeError, match=r"lora_bs\[2\] must be \[D, r\] = \[13, 3\]"):
        _call(x, w, b, a_s, [b_s[0], b_s[1], b_s[2][:, :-1]], rngs, index)
    with pytest.raises(RuntimeError, match=r"weight must be \[D, K=19\]"):
        _call(x, w[:, :-1], b, a_s, b_s, rngs, index)
    with pytest.raises(RuntimeError, match=r"bias must be \[D=13\]"):
        _call(x, w, b[:-1], a_s, b_s, rngs, index)
    with pytest.raises(RuntimeError, match=r"rngs\[0\] must be an int64 tensor of 2 elements"):
        _call(x, w, b, a_s, b_s, [torch.tensor([1.0, 2.0]), *rngs[1:]], index)
    with pytest.raises(RuntimeError, match=r"dropout_ps\[1\] must be in \[0, 1\)"):
        _call(x, w, b, a_s, b_s, rngs, index, ps=(0.1, 1.0, 0.1))
    with pytest.raises(RuntimeError, match="x must be"):
        _call(x[0, 0], w, b, a_s, b_s, rngs, index)
    with pytest.raises(RuntimeError, match="with weight=None and no adapters, pass a bias"):
        _call(x, None, None, [], [], [], torch.full((6,), -1), scalings=(), ps=())

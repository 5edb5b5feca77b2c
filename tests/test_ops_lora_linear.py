"""The LoRA op against a from-scratch float64 recomputation, plus op-registration checks."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from lightning_peft.ops import cpu_backend, lora_linear
from lightning_peft.ops.dropout_mask import (
    decode_drop_positions,
    draw_drops,
    drop_threshold,
    encode_drop_positions,
    hashed_keep_mask,
    pack_mask,
    quantized_drop_probability,
    unpack_mask,
)
from lightning_peft.ops.lora_linear import dropout_keep_mask
from lightning_peft.ops.philox import philox_keep_mask

# The module (the package's ops/__init__ re-exports the function of the same name).
lora_linear_module = importlib.import_module("lightning_peft.ops.lora_linear")
OP_FWD = torch.ops.lightning_peft.lora_linear_forward.default
OP_BWD = torch.ops.lightning_peft.lora_linear_backward.default


@pytest.fixture(params=["kernels", "positions", "packed"])
def mask_form(request, monkeypatch):
    """Run a test on each CPU implementation: the compiled CPU kernels (hashed mask, its key kept),
    and the PyTorch path with each of its two mask forms: the CPU's drop positions, and the Philox
    packed keep-bits that other devices (and the CUDA kernels) draw, here on CPU tensors."""
    if request.param == "kernels":
        assert cpu_backend.load(), cpu_backend.status()["reason"]
    monkeypatch.setattr(cpu_backend._state, "force_fallback", request.param != "kernels")
    replay = request.param != "packed"  # the kernels' key, like positions, is a 1-D CPU mask
    monkeypatch.setattr(lora_linear_module, "_uses_drop_positions", lambda device: replay)
    return request.param


def make_inputs(lead=(3, 5), k=19, d=13, r=4, dtype=torch.float64, bias=True, weight_transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, dtype=dtype, generator=g)
    if weight_transposed:  # GPT-2 Conv1D stores [in, out]; the op gets a transposed view
        weight = torch.randn(k, d, dtype=dtype, generator=g).t()
    else:
        weight = torch.randn(d, k, dtype=dtype, generator=g)
    b = torch.randn(d, dtype=dtype, generator=g) if bias else None
    a = torch.randn(r, k, dtype=dtype, generator=g)
    bb = torch.randn(d, r, dtype=dtype, generator=g)
    return x, weight, b, a, bb


def forward_keep_mask(mask_form, seed, offset, rows, cols, p):
    """The keep mask bool [rows, cols] a CPU forward with key (seed, offset) draws, recomputed independently."""
    if mask_form == "kernels":
        return hashed_keep_mask(seed, offset, rows, cols, p)
    if mask_form == "packed":
        return unpack_mask(philox_keep_mask(torch.tensor([seed, offset]), rows, cols, drop_threshold(p)), cols)
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[draw_drops(rows * cols, p, torch.tensor([seed, offset]))[0]] = False
    return keep.view(rows, cols)


def reference(x, weight, bias, a, b, scaling, keep, drop_p):
    """y = x Wᵀ + b + scaling · ((x ∘ keep) / (1 - p)) Aᵀ Bᵀ, all in float64 (no x Wᵀ when weight is None)."""
    xd = x * keep.reshape(x.shape).to(x.dtype) / (1.0 - drop_p)
    y = scaling * (xd @ a.t()) @ b.t()
    if weight is not None:  # weight None: the LoRA branch alone
        y = y + x @ weight.t()
    return y + bias if bias is not None else y


@pytest.mark.parametrize("drop_p,training", [(0.0, True), (0.25, True), (0.25, False)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_transposed", [False, True])
def test_matches_float64_reference(drop_p, training, bias, weight_transposed, mask_form):
    x, w, b, a, bb = make_inputs(bias=bias, weight_transposed=weight_transposed)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    rng = torch.tensor([11, 3])
    y, hidden, mask = OP_FWD(x, w, b, a, bb, rng, 0.7, drop_p, training)
    active = training and drop_p > 0
    if active:
        assert mask.dtype == torch.uint8 and mask.dim() == (2 if mask_form == "packed" else 1)
        keep = dropout_keep_mask(mask, x.shape[:-1].numel(), x.shape[-1], drop_p)
        p_eff = quantized_drop_probability(drop_p)
    else:
        assert mask.numel() == 0  # no mask work at p = 0 or in eval
        keep, p_eff = torch.ones(x.shape[:-1] + (x.shape[-1],), dtype=torch.bool).reshape(-1, x.shape[-1]), 0.0
    ref = reference(x, w, b, a, bb, 0.7, keep, p_eff)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    grad_y = torch.randn_like(ref)
    ours = torch.autograd.grad(lora_linear(x, w, b, a, bb, scaling=0.7, dropout_p=drop_p, rng=rng, training=training), (x, a, bb), grad_y)
    theirs = torch.autograd.grad(ref, (x, a, bb), grad_y)
    for g_ours, g_ref in zip(ours, theirs):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64_with_dropout(mask_form):
    x, w, b, a, bb = make_inputs(lead=(2, 3), k=10, d=7, r=3)
    w.requires_grad_(True)  # also the (rarely used) base-weight / bias gradients
    b.requires_grad_(True)
    rng = torch.tensor([5, 9])

    def f(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, scaling=1.3, dropout_p=0.3, rng=rng, training=True)

    inputs = tuple(t.requires_grad_(True) for t in (x, w, b, a, bb))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("drop_p,training", [(0.0, True), (0.3, True), (0.3, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(drop_p, training, bias, mask_form):
    x, w, b, a, bb = make_inputs(dtype=torch.float32, bias=bias)
    for t in (x, a, bb):
        t.requires_grad_(True)
    torch.library.opcheck(OP_FWD, (x, w, b, a, bb, torch.tensor([1, 2]), 0.5, drop_p, training))


@pytest.mark.parametrize("drop_p", [0.0, 0.3])
@pytest.mark.parametrize("compute_grad_x", [True, False])
def test_opcheck_backward(drop_p, compute_grad_x, mask_form):
    x, w, b, a, bb = make_inputs(dtype=torch.float32)
    y, hidden, mask = OP_FWD(x, w, b, a, bb, torch.tensor([1, 2]), 0.5, drop_p, True)
    torch.library.opcheck(OP_BWD, (torch.randn_like(y), x, w, a, bb, hidden, mask, 0.5, drop_p, compute_grad_x))


@pytest.mark.parametrize("drop_p,training", [(0.0, True), (0.25, True), (0.25, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_without_base_weight_matches_float64_reference(drop_p, training, bias, mask_form):
    """weight=None: y = b + scaling · dropout(x) Aᵀ Bᵀ, gradients of x / A / B of that alone; D from lora_b."""
    x, _, b, a, bb = make_inputs(bias=bias, d=11)
    leaves = [t.requires_grad_(True) for t in (x, a, bb)]
    rng = torch.tensor([4, 1])
    y, _, mask = OP_FWD(x, None, b, a, bb, rng, 0.7, drop_p, training)
    assert y.shape == (3, 5, 11)
    if training and drop_p > 0:
        keep, p_eff = dropout_keep_mask(mask, 15, x.shape[-1], drop_p), quantized_drop_probability(drop_p)
    else:
        keep, p_eff = torch.ones(15, x.shape[-1], dtype=torch.bool), 0.0
    ref = reference(x, None, b, a, bb, 0.7, keep, p_eff)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(ref)
    ours = torch.autograd.grad(lora_linear(x, None, b, a, bb, scaling=0.7, dropout_p=drop_p, rng=rng, training=training), leaves, grad_y)
    theirs = torch.autograd.grad(ref, leaves, grad_y)
    for g_ours, g_ref in zip(ours, theirs):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_without_base_weight_gradcheck_and_opcheck(mask_form):
    x, _, b, a, bb = make_inputs(lead=(2, 3), k=10, d=7, r=3)
    rng = torch.tensor([5, 9])
    inputs = tuple(t.requires_grad_(True) for t in (x, b, a, bb))
    assert torch.autograd.gradcheck(
        lambda x, b, a, bb: lora_linear(x, None, b, a, bb, scaling=1.3, dropout_p=0.3, rng=rng, training=True), inputs
    )
    x, _, b, a, bb = make_inputs(dtype=torch.float32)
    for t in (x, a, bb):
        t.requires_grad_(True)
    for drop_p in (0.0, 0.3):
        torch.library.opcheck(OP_FWD, (x, None, b, a, bb, torch.tensor([1, 2]), 0.5, drop_p, True))
        with torch.no_grad():
            y, hidden, mask = OP_FWD(x, None, b, a, bb, torch.tensor([1, 2]), 0.5, drop_p, True)
        for need_x in (True, False):
            torch.library.opcheck(OP_BWD, (torch.randn_like(y), x.detach(), None, a.detach(), bb.detach(), hidden, mask, 0.5, drop_p, need_x))


# (lead, K): N = 15 < K = 19 scales the output, N = 32 >= K folds the scale into W's and B's rows
SCALE_SHAPES = {"scale_output": ((3, 5), 19), "fold_into_weights": ((4, 8), 19)}


@pytest.mark.parametrize("path", list(SCALE_SHAPES))
@pytest.mark.parametrize("drop_p,training", [(0.0, True), (0.25, True), (0.25, False)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_scale_matches_float64_reference(path, drop_p, training, bias, with_weight, mask_form):
    """y = scale ⊙ (x Wᵀ + s · dropout(x) Aᵀ Bᵀ) + b and the gradients of x, A, B and scale, vs autograd
    through that formula; one scale entry is exactly 0 (its gradient cannot come from y)."""
    lead, k = SCALE_SHAPES[path]
    x, w, b, a, bb = make_inputs(lead=lead, k=k, bias=bias)
    w = w if with_weight else None
    scale = torch.randn(bb.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    scale[4] = 0.0
    leaves = [t.requires_grad_(True) for t in (x, a, bb, scale)]
    rng = torch.tensor([6, 2])
    y = lora_linear(x, w, b, a, bb, scaling=0.7, dropout_p=drop_p, rng=rng, training=training, scale=scale)
    mask = OP_FWD(x, w, b, a, bb, rng, 0.7, drop_p, training, scale)[2]
    n = x.shape[:-1].numel()
    if training and drop_p > 0:
        keep, p_eff = dropout_keep_mask(mask, n, k, drop_p), quantized_drop_probability(drop_p)
    else:
        keep, p_eff = torch.ones(n, k, dtype=torch.bool), 0.0
    ref = reference(x, w, None, a, bb, 0.7, keep, p_eff) * scale
    ref = ref + b if b is not None else ref
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(ref)
    ours = torch.autograd.grad(y, leaves, grad_y)
    theirs = torch.autograd.grad(ref, leaves, grad_y)
    for name, g_ours, g_ref in zip(("x", "A", "B", "scale"), ours, theirs):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("path", list(SCALE_SHAPES))
def test_scale_gradcheck_and_opcheck(path, mask_form):
    lead, k = SCALE_SHAPES[path]
    x, w, b, a, bb = make_inputs(lead=lead, k=k, d=7, r=3)
    scale = torch.rand(7, dtype=torch.float64) + 0.5
    rng = torch.tensor([5, 9])
    w.requires_grad_(True)  # and the rarely used base-weight gradient, which the scale reaches too
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b, a, bb, scale))
    assert torch.autograd.gradcheck(
        lambda x, w, b, a, bb, scale: lora_linear(x, w, b, a, bb, scaling=1.3, dropout_p=0.3, rng=rng, training=True, scale=scale), inputs
    )
    x, w, b, a, bb = (t.detach().float() for t in (x, w, b, a, bb))
    scale = scale.detach().float().requires_grad_(True)
    for t in (x, a, bb):
        t.requires_grad_(True)
    for weight in (w, None):
        for drop_p in (0.0, 0.3):
            torch.library.opcheck(OP_FWD, (x, weight, b, a, bb, torch.tensor([1, 2]), 0.5, drop_p, True, scale))
            with torch.no_grad():
                y, hidden, mask = OP_FWD(x, weight, b, a, bb, torch.tensor([1, 2]), 0.5, drop_p, True, scale)
            for need_x in (True, False):
                args = (torch.randn_like(y), x.detach(), weight, a.detach(), bb.detach(), hidden, mask, 0.5, drop_p, need_x, scale.detach())
                torch.library.opcheck(OP_BWD, args)
            with_zero = scale.detach().clone()
            with_zero[2] = 0.0  # the recomputed column
            args = (torch.randn_like(y), y, b, with_zero, x.detach(), weight, bb.detach(), hidden, 0.5)
            torch.library.opcheck(torch.ops.lightning_peft.lora_linear_scale_grad.default, args)


def test_scale_saves_the_output_only_when_it_needs_a_gradient():
    """A scale that requires grad adds the output y to what backward keeps (nothing else of size N x D)."""
    x, w, b, a, bb = make_inputs(dtype=torch.float32, lead=(32,), k=64, d=48, r=4)
    a.requires_grad_(True)
    for needs_grad in (True, False):
        scale = torch.rand(48).requires_grad_(needs_grad)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = lora_linear(x, w, b, a, bb, scaling=1.0, dropout_p=0.1, rng=torch.tensor([0, 0]), training=True, scale=scale)
        big = [t for t in saved if t.numel() >= 32 * 48 and t.data_ptr() not in (x.data_ptr(), w.data_ptr())]
        assert [t.data_ptr() for t in big] == ([y.data_ptr()] if needs_grad else [])


def test_rejects_bad_shapes_and_probability():
    x, w, b, a, bb = make_inputs(dtype=torch.float32)
    rng = torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match="lora_a must be"):
        lora_linear(x, w, b, a[:, :-1], bb, scaling=1.0, dropout_p=0.0, rng=rng, training=True)
    with pytest.raises(RuntimeError, match=r"lora_b must be \[D, r\] = \[13, 3\]"):  # weight None: D is lora_b's, r must match
        lora_linear(x, None, b, a[:3], bb, scaling=1.0, dropout_p=0.0, rng=rng, training=True)
    with pytest.raises(RuntimeError, match=r"scale must be \[D=13\]"):
        lora_linear(x, w, b, a, bb, scaling=1.0, dropout_p=0.0, rng=rng, training=True, scale=torch.ones(12))
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        lora_linear(x, w, b, a, bb, scaling=1.0, dropout_p=1.0, rng=rng, training=True)


def _positions_from_scratch(numel, p, rng):
    """Recompute the drop positions in plain Python floats from the same 31-bit draws: U = (v + 1) / 2^31,
    gap = floor(ln U / ln(1 - q)) kept elements before each drop."""
    from lightning_peft.ops.dropout_mask import _generator_for

    q = quantized_drop_probability(p)
    if q == 0.0:  # p < 2^-17 quantizes to "never drop"
        return []
    stream = torch.empty(numel + 64, dtype=torch.int32).random_(generator=_generator_for(rng)).tolist()
    positions, next_pos = [], 0
    for v in stream:
        next_pos += math.floor(math.log((v + 1) / 2**31) / math.log1p(-q))
        if next_pos >= numel:
            return positions
        positions.append(next_pos)
        next_pos += 1
    raise AssertionError("stream too short")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.05, 1 / 65536, 0.9, 1e-6])
@pytest.mark.parametrize("numel", [1, 100, 5000])
def test_drop_positions_are_geometric_gaps_of_the_keyed_stream(p, numel):
    rng = torch.tensor([5, 9])
    expected = _positions_from_scratch(numel, p, rng)
    positions, increments = draw_drops(numel, p, rng)
    assert positions.dtype == increments.dtype == torch.int64
    assert positions.tolist() == expected
    assert increments.tolist() == [b - a for a, b in zip([0] + expected, expected)]


def test_drop_positions_continue_the_stream_when_a_batch_falls_short(monkeypatch):
    """Batches sized far too small (forced) give the same positions as one batch: the stream continues."""
    import lightning_peft.ops.dropout_mask as dropout_mask

    rng = torch.tensor([1, 2])
    one_batch = dropout_mask.draw_drops(20_000, 0.1, rng)
    monkeypatch.setattr(dropout_mask, "_POSITION_BATCH_SIGMAS", -25.0)  # ~ a quarter of the drops per batch
    monkeypatch.setattr(dropout_mask, "_POSITION_BATCH_EXTRA", 0)
    several_batches = dropout_mask.draw_drops(20_000, 0.1, rng)
    assert torch.equal(several_batches[0], one_batch[0])
    assert torch.equal(several_batches[1], one_batch[1])  # increments across batch boundaries too


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_positions_are_independent_bernoulli(p):
    """Drop rate, and the rate of dropping both of two neighbours (along a row and along a column),
    match q and q² within 5 sigma: no correlation between neighbouring elements."""
    rows, cols = 1024, 1000
    dropped = torch.zeros(rows * cols, dtype=torch.bool)
    dropped[draw_drops(rows * cols, p, torch.tensor([42, 0]))[0]] = True
    dropped = dropped.view(rows, cols)
    q = quantized_drop_probability(p)

    def within_5_sigma(events, prob):
        n = events.numel()
        return abs(events.double().mean().item() - prob) < 5 * math.sqrt(prob * (1 - prob) / n)

    assert within_5_sigma(dropped, q)
    assert within_5_sigma(dropped[:, 1:] & dropped[:, :-1], q * q)
    assert within_5_sigma(dropped[1:] & dropped[:-1], q * q)
    assert within_5_sigma(dropped[:, 0], q)  # row starts are not special


def test_drop_positions_edge_cases():
    assert draw_drops(0, 0.5, torch.tensor([0, 0]))[0].numel() == 0
    assert draw_drops(1000, 1e-7, torch.tensor([0, 0]))[0].numel() == 0  # quantizes to "never drop"
    nearly_all = draw_drops(1000, 1 - 1e-7, torch.tensor([0, 0]))[0]  # capped at 65535 / 65536
    assert nearly_all.numel() >= 990 and torch.equal(nearly_all, nearly_all.unique())


def test_dropout_keep_rate_and_scaling(mask_form):
    """Keep rate ≈ 1 - p (binomial 5-sigma bound) and kept values scaled so E[dropout(x)] = x."""
    p, n, k = 0.1, 4096, 256
    # hidden = dropout(x) @ Aᵀ with A = identity rows: mean of dropout(ones) must be ~1.
    x = torch.ones(n, k)
    w = torch.zeros(1, k)
    a = torch.eye(k)[:4]
    b = torch.zeros(1, 4)
    _, hidden, mask = OP_FWD(x, w, None, a, b, torch.tensor([7, 0]), 1.0, p, True)
    keep = dropout_keep_mask(mask, n, k, p)
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / (n * k))
    assert abs(rate - (1 - p)) < 5 * sigma + abs(quantized_drop_probability(p) - p)
    assert abs(hidden.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / hidden.numel())
    # kept values of x = 1 are exactly the scale, dropped ones 0
    expected_hidden = keep[:, :4].to(hidden.dtype) / (1 - quantized_drop_probability(p))
    torch.testing.assert_close(hidden, expected_hidden)


def test_packed_draw_keep_rate():
    from lightning_peft.ops.philox import philox_keep_mask

    p, n, k = 0.1, 4096, 256
    keep = unpack_mask(philox_keep_mask(torch.tensor([123, 0]), n, k, drop_threshold(p)), k)
    sigma = math.sqrt(p * (1 - p) / (n * k))
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma + abs(quantized_drop_probability(p) - p)


def _keep_mask_of_call(x, w, b, a, bb, key, p):
    mask = OP_FWD(x, w, b, a, bb, torch.tensor(key), 1.0, p, True)[2]
    return dropout_keep_mask(mask, x.shape[:-1].numel(), x.shape[-1], p)


def test_same_key_same_mask_other_key_other_mask(mask_form):
    x, w, b, a, bb = make_inputs(dtype=torch.float32, lead=(64,), k=64)
    masks = {key: _keep_mask_of_call(x, w, b, a, bb, key, 0.5) for key in [(1, 0), (1, 1), (2, 0)]}
    again = _keep_mask_of_call(x, w, b, a, bb, (1, 0), 0.5)
    assert torch.equal(masks[(1, 0)], again)
    assert not torch.equal(masks[(1, 0)], masks[(1, 1)])
    assert not torch.equal(masks[(1, 0)], masks[(2, 0)])


def test_global_rng_does_not_change_the_mask(mask_form):
    """Masks depend on the (seed, offset) key alone, not on what else consumed the global RNG."""
    x, w, b, a, bb = make_inputs(dtype=torch.float32)
    torch.manual_seed(0)
    first = _keep_mask_of_call(x, w, b, a, bb, (4, 4), 0.5)
    torch.rand(1000)
    second = _keep_mask_of_call(x, w, b, a, bb, (4, 4), 0.5)
    assert torch.equal(first, second)


@pytest.mark.parametrize("k", [8, 13, 64, 67])
def test_pack_unpack_round_trip(k):
    keep = torch.rand(9, k) > 0.4
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (9, (k + 7) // 8)
    assert torch.equal(unpack_mask(packed, k), keep)
    # bit j of byte b is element 8b + j (the layout the CUDA kernels share)
    for col in (0, k - 1):
        assert torch.equal(((packed[:, col // 8] >> (col % 8)) & 1).bool(), keep[:, col])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropped_nan_and_inf_become_exactly_zero(dtype, mask_form):
    """Dropped elements are zeroed like torch.where (a multiply by 0 would turn NaN / inf into NaN):
    hidden and grad_a equal those of the same call on x with its dropped elements set to 0."""
    x, w, b, a, bb = make_inputs(dtype=dtype, lead=(16,), k=32)
    keep = _keep_mask_of_call(x, w, b, a, bb, (2, 5), 0.5)
    poison = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)[torch.arange(x.numel()) % 3].view_as(x)
    results = []
    for dropped_values in (poison, torch.zeros_like(x)):
        xi = torch.where(keep, x, dropped_values)
        ai = a.clone().requires_grad_(True)
        hidden = OP_FWD(xi, w, b, ai, bb, torch.tensor([2, 5]), 1.0, 0.5, True)[1]
        y = lora_linear(xi, w, b, ai, bb, scaling=1.0, dropout_p=0.5, rng=torch.tensor([2, 5]), training=True)
        results.append((hidden, *torch.autograd.grad(y.sum(), ai)))
    assert torch.isfinite(results[0][0]).all()
    for poisoned, clean in zip(*results):
        assert torch.equal(poisoned, clean)


def test_saved_for_backward_is_x_plus_at_most_a_bit_per_element(mask_form):
    """Backward keeps x, the small [N, r] hidden and the mask in at most 1 bit per element
    (the CPU kernels' key, encoded drop positions on CPU, packed bits elsewhere): no dropped-out
    copy of x, no byte mask."""
    x, w, b, a, bb = make_inputs(dtype=torch.float32, lead=(32,), k=64, d=48, r=4)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, w, b, a, bb, scaling=1.0, dropout_p=0.1, rng=torch.tensor([0, 0]), training=True)
    n, k = 32, 64
    big = [t for t in saved if t.numel() >= n * k and t.data_ptr() not in (x.data_ptr(), w.data_ptr())]
    assert big == []
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert len(masks) == 1
    if mask_form == "kernels":  # the key alone: the kernels draw the mask again
        assert masks[0].shape == (17,)
    elif mask_form == "positions":
        assert masks[0].dim() == 1 and masks[0].numel() <= 1 + n * k // 8
    else:
        assert masks[0].shape == (n, k // 8)


@pytest.mark.parametrize(
    "p, numel, form",
    [
        (0.1, 100_000, "uint8"),  # increments fit a byte (the largest of ~10^4 is ~100)
        (0.01, 100_000, "key"),  # some increments pass 255
        (0.3, 100_000, "key"),  # a byte per drop would be 2.4 bits per element
        (1e-7, 1000, "uint8"),  # nothing dropped: an empty list of increments
    ],
)
def test_drop_positions_encode_in_at_most_a_bit_per_element(p, numel, form):
    rng = torch.tensor([8, 1])
    positions, increments = draw_drops(numel, p, rng)
    encoded = encode_drop_positions(increments, numel, rng)
    assert encoded.dtype == torch.uint8 and encoded.dim() == 1
    assert {0: "key", 1: "uint8"}[int(encoded[0])] == form
    assert (encoded.numel() - 1) * 8 <= max(numel, 128)  # at most 1 bit per element (or the 16-byte key)
    rng += 1  # the layer's buffer advances in place: the encoded mask must not depend on it
    assert torch.equal(decode_drop_positions(encoded, numel, p), positions)


@pytest.mark.parametrize(
    "jump, form",
    [
        (255, "uint8"),  # the largest increment a byte holds
        (256, "key"),  # would wrap to 0 as a byte
        (512 + 3, "key"),  # would wrap to 3
    ],
)
def test_drop_positions_encode_detects_an_increment_that_does_not_fit(jump, form):
    """One wide increment among small ones keeps the key instead (no silent wrap), and distances
    decode to exactly the same positions."""
    before = list(range(0, 40, 2))
    positions = torch.tensor(before + [before[-1] + jump + k for k in range(0, 40, 3)], dtype=torch.int64)
    numel = 200_000
    encoded = encode_drop_positions(torch.diff(positions, prepend=positions.new_zeros(1)), numel, torch.tensor([4, 4]))
    assert {0: "key", 1: "uint8"}[int(encoded[0])] == form
    if form != "key":  # (a key decodes to the key's own draw, not to these hand-made positions)
        assert torch.equal(decode_drop_positions(encoded, numel, 0.1), positions)


@pytest.mark.parametrize("p", [0.1, 0.4])  # distances kept as bytes / the key kept and drawn again
def test_backward_uses_the_forwards_mask_after_the_key_advances(p, mask_form):
    """The layer advances its rng buffer in place after forward; backward must still use the forward's mask."""
    x, w, b, a, bb = make_inputs(lead=(6,), k=24, d=5, r=3)
    a.requires_grad_(True)
    rng = torch.tensor([3, 0])
    y = lora_linear(x, w, b, a, bb, scaling=1.0, dropout_p=p, rng=rng, training=True)
    keep = forward_keep_mask(mask_form, 3, 0, 6, 24, p)
    rng[1] += 1  # what advance_dropout_rng does before the next step
    (grad_a,) = torch.autograd.grad(y.sum(), a)
    ref = reference(x, w, b, a, bb, 1.0, keep, quantized_drop_probability(p))
    (ref_grad_a,) = torch.autograd.grad(ref.sum(), a)
    torch.testing.assert_close(grad_a, ref_grad_a, rtol=1e-12, atol=1e-12)


def test_half_precision_inputs_run():
    x, w, b, a, bb = make_inputs(dtype=torch.bfloat16)
    y = lora_linear(x, w, b, a, bb, scaling=1.0, dropout_p=0.1, rng=torch.tensor([0, 0]), training=True)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 13)

"""The CUDA kernels of the LoRA op against fp64 recomputation, on fresh random inputs.

Every test needs a GPU (skipped with reason "needs CUDA" elsewhere) and the compiled kernels:
on a GPU machine a missing build is a failure, not a skip, because the point is to test them.
Tolerance: flash-attention's rule (tests/test_cuda_reference.py::assert_flash_rule), i.e. the
kernels' error vs fp64 may be at most twice plain PyTorch's error in the same dtype.

Inputs sit in NaN-guarded memory. At H200 occupancy the small shapes give each block one or two
iterations, so the tests that matter for races run with the kernels' debug switch forcing one
split (every block walks all its 64-column chunks / 64-row tiles), with poisoned outputs;
``test_every_kernel_instantiation_walks_many_tiles`` is also the workload benchmarks/gpu_check.sh
runs under compute-sanitizer. One test runs the target shape (N=8192, K=4096, r=16, bf16).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.ops import cuda_backend, lora_linear
from lightning_peft.ops.dropout_mask import quantized_drop_probability, unpack_mask
from test_cuda_reference import (
    assert_flash_rule,
    fresh_seed,
    hidden_eager,
    kernel_debug_options,
    lora_eager,
    max_err,
    nan_guarded,
    philox_mask_reference,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

OP_FWD = torch.ops.lightning_peft.lora_linear_forward.default
OP_BWD = torch.ops.lightning_peft.lora_linear_backward.default
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims, K, D, r): odd sizes, partial tiles, K % 8 != 0 (scalar loads), every rank bucket.
SHAPES = [
    ((), 8, 8, 1),
    ((7,), 19, 13, 3),
    ((3, 5), 64, 48, 16),
    ((2, 33), 136, 72, 17),
    ((129,), 1000, 300, 64),
    ((2, 70), 264, 520, 128),
    ((5, 3, 7), 333, 65, 100),
    ((1024,), 1024, 2048, 8),
    ((4, 1000), 512, 256, 33),
]
MODES = [(0.0, True), (0.1, True), (0.5, True), (0.1, False)]  # (dropout_p, training)


@pytest.fixture(scope="module", autouse=True)
def kernels_loaded():
    assert cuda_backend.load(), f"CUDA kernels did not load: {cuda_backend.status()}"
    cuda_backend.set_force_fallback(False)


def debug_options(**switches):
    """The kernels' test-only switches (poison, splits, sm_count), restored on exit."""
    return kernel_debug_options(torch.ops.lightning_peft_cuda, **switches)


def make_case(lead, k, d, r, dtype, seed, bias=True, weight_transposed=False):
    """Random inputs on CUDA; weights scaled so outputs are O(1). lora_b is random (never zeros)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    x = torch.randn(*lead, k, device=dev, generator=g).to(dtype)
    if weight_transposed:  # GPT-2 Conv1D: the op gets a transposed view of an [in, out] weight
        weight = (torch.randn(k, d, device=dev, generator=g) / math.sqrt(k)).to(dtype).t()
    else:
        weight = (torch.randn(d, k, device=dev, generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(d, device=dev, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, k, device=dev, generator=g) / math.sqrt(k)).to(dtype)
    bb = (torch.randn(d, r, device=dev, generator=g) / math.sqrt(r)).to(dtype)
    rng = torch.tensor([seed, 3], dtype=torch.int64, device=dev)
    x, a, bb = nan_guarded(x), nan_guarded(a), nan_guarded(bb)
    weight = nan_guarded(weight.t()).t() if weight_transposed else nan_guarded(weight)
    b = None if b is None else nan_guarded(b)
    return x, weight, b, a, bb, rng


def keep_of(mask, x, active):
    return unpack_mask(mask, x.shape[-1]) if active else None


def check_against_fp64(x, weight, bias, a, bb, rng, scaling, drop_p, training, context):
    """Forward + backward through the public op vs fp64 and plain eager with the op's own mask."""
    dtype = x.dtype
    active = training and drop_p > 0
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
    xl, al, bl = leaves
    y, hidden, mask = OP_FWD(xl, weight, bias, al, bl, rng, scaling, drop_p, training)
    if active:
        n, kb = math.prod(x.shape[:-1]), (x.shape[-1] + 7) // 8
        assert mask.shape == (n, kb) and mask.dtype == torch.uint8, context
    else:
        assert mask.numel() == 0, f"no mask work at p=0 / eval {context}"
    keep = keep_of(mask, x, active)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)

    ref_in = [t.detach().double().requires_grad_(True) for t in (x, a, bb)]
    y_ref = lora_eager(ref_in[0], None if weight is None else weight.double(), None if bias is None else bias.double(), ref_in[1], ref_in[2], scaling, keep, drop_p)
    grads_ref = torch.autograd.grad(y_ref, ref_in, grad_y.double())
    eager_in = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
    y_eager = lora_eager(eager_in[0], weight, bias, eager_in[1], eager_in[2], scaling, keep, drop_p)
    grads_eager = torch.autograd.grad(y_eager, eager_in, grad_y)

    assert_flash_rule("y", y, y_eager, y_ref, dtype, context)
    h_ref = hidden_eager(x.double(), a.double(), keep, drop_p)
    assert_flash_rule("lora_hidden", hidden, hidden_eager(x, a, keep, drop_p), h_ref, dtype, context)
    for name, ours, eager, ref in zip(("grad_x", "grad_a", "grad_b"), grads, grads_eager, grads_ref):
        assert_flash_rule(name, ours, eager, ref, dtype, context)
    return y, hidden, mask


@pytest.mark.parametrize("drop_p,training", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2], s[3]))))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_fp64(dtype, shape, drop_p, training):
    seed = fresh_seed()
    lead, k, d, r = shape
    case = make_case(lead, k, d, r, dtype, seed, bias=seed % 2 == 0)
    check_against_fp64(*case, 1.7, drop_p, training, f"(seed={seed}, dtype={dtype}, shape={shape}, p={drop_p}, training={training})")


@pytest.mark.parametrize("drop_p,training", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_base_weight_match_fp64(dtype, drop_p, training):
    """weight=None (the LoRA branch alone, for quantized base layers): no base GEMM on either side."""
    seed = fresh_seed()
    x, _, b, a, bb, rng = make_case((2, 33), 136, 72, 17, dtype, seed, bias=seed % 2 == 0)
    with debug_options(poison=True, splits=1):
        check_against_fp64(x, None, b, a, bb, rng, 1.7, drop_p, training, f"(seed={seed}, dtype={dtype}, weight=None, p={drop_p})")
    torch.library.opcheck(OP_FWD, (x.requires_grad_(True), None, b, a.requires_grad_(True), bb.requires_grad_(True), rng, 0.5, drop_p, training))


@pytest.mark.parametrize("lead", [(3, 100), (2, 33)], ids=["scale_folded", "scale_on_output"])  # K = 136: folded when K <= N
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_matches_fp64(dtype, lead):
    """DoRA's per-output scale through the kernels: y = scale ⊙ (x Wᵀ + lora) + b and the gradients of
    x, A, B and the scale vs fp64 and eager in the same dtype."""
    seed = fresh_seed()
    x, w, b, a, bb, rng = make_case(lead, 136, 72, 17, dtype, seed)
    scale = nan_guarded((torch.rand(72, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)) + 0.5).to(dtype))
    context = f"(seed={seed}, dtype={dtype}, lead={lead})"
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, bb, scale)]
    with debug_options(poison=True, splits=1):
        y, _, mask = OP_FWD(leaves[0], w, b, leaves[1], leaves[2], rng, 1.7, 0.1, True, leaves[3])
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, grad_y)
    keep = unpack_mask(mask, 136)
    outs = []
    for cast in (torch.float64, dtype):
        inputs = [t.detach().to(cast).requires_grad_(True) for t in (x, a, bb, scale)]
        y_ref = lora_eager(inputs[0], w.to(cast), None, inputs[1], inputs[2], 1.7, keep, 0.1) * inputs[3] + b.to(cast)
        outs.append((y_ref, torch.autograd.grad(y_ref, inputs, grad_y.to(cast))))
    (y_ref, grads_ref), (y_eager, grads_eager) = outs
    assert_flash_rule("y", y, y_eager, y_ref, dtype, context)
    for name, ours, eager, ref in zip(("grad_x", "grad_a", "grad_b", "grad_scale"), grads, grads_eager, grads_ref):
        assert_flash_rule(name, ours, eager, ref, dtype, context)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["x_transposed", "x_row_strided", "weight_transposed", "params_transposed"])
def test_non_contiguous_inputs(dtype, layout):
    seed = fresh_seed()
    lead, k, d, r = (6, 40), 200, 96, 12
    x, weight, bias, a, bb, rng = make_case(lead, k, d, r, dtype, seed, weight_transposed=layout == "weight_transposed")
    if layout == "x_transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-viewable as [N, K]
        assert not x.is_contiguous()
    elif layout == "x_row_strided":
        wide = torch.full((*lead, k + 24), float("nan"), device="cuda", dtype=dtype)  # NaN padding: reading it shows
        wide[..., :k] = x
        x = wide[..., :k]  # rows 224 apart: a strided [N, K] view, read in place
    elif layout == "params_transposed":
        a = a.t().contiguous().t()
        bb = bb.t().contiguous().t()
    check_against_fp64(x, weight, bias, a, bb, rng, 0.5, 0.25, True, f"(seed={seed}, layout={layout}, dtype={dtype})")


# (N, K, D) with several 64-column chunks and 64-row tiles per block under one split; K % 8 != 0
# takes the scalar loads.
MANY_TILES = [(640, 520, 72), (449, 517, 40)]


@pytest.mark.parametrize("r", [1, 17, 40, 128], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_kernel_instantiation_walks_many_tiles(dtype, r):
    """Each (dtype, rank bucket) kernel with one split: forward blocks walk 9 chunks, backward
    blocks 8-10 row tiles; poisoned outputs with guard checks; grad_x on and off."""
    seed = fresh_seed()
    for n, k, d in MANY_TILES:
        x, w, b, a, bb, rng = make_case((n,), k, d, r, dtype, seed)
        context = f"(seed={seed}, dtype={dtype}, n={n}, k={k}, r={r}, one split)"
        with debug_options(poison=True, splits=1):
            y, hidden, mask = check_against_fp64(x, w, b, a, bb, rng, 0.7, 0.2, True, context)
            gx, ga, gb = OP_BWD(torch.randn_like(y), x, w, a, bb, hidden, mask, 0.7, 0.2, False)
        assert gx.numel() == 0 and torch.isfinite(ga).all() and torch.isfinite(gb).all(), context


@pytest.mark.parametrize("plan", ["one_split", "device", "h200_x4"])
def test_split_plans_agree_bit_for_bit_on_the_mask_and_with_fp64(plan):
    """One split, the device's own plan and a plan for 4x the SMs (many splits) give the same mask
    and fp64-accurate results (the split only changes the order of the fp32 partial sums)."""
    seed = fresh_seed()
    switches = {"one_split": {"splits": 1}, "device": {}, "h200_x4": {"sm_count": 4 * 132}}[plan]
    x, w, b, a, bb, rng = make_case((2, 700), 1032, 136, 16, torch.bfloat16, seed)
    with debug_options(poison=True, **switches):
        _, _, mask = check_against_fp64(x, w, b, a, bb, rng, 1.3, 0.1, True, f"(seed={seed}, plan={plan})")
    assert torch.equal(mask.cpu(), philox_mask_reference(seed, 3, 1400, 1032, 0.1)), f"(seed={seed}, plan={plan})"


def test_target_shape_against_fp64_on_sampled_rows():
    """N=8192, K=D=4096, r=16, bf16, p=0.1: at H200 occupancy the forward blocks walk 11 chunks and
    the backward blocks 16 row tiles. y and grad_x are checked on 256 sampled rows, grad_a and
    grad_b whole (their fp64 references are cheap), all with flash-attention's rule."""
    seed = fresh_seed()
    n, k, d, r, p, s = 8192, 4096, 4096, 16, 0.1, 2.0
    x, w, b, a, bb, rng = make_case((n,), k, d, r, torch.bfloat16, seed)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
    with debug_options(poison=True):
        y, hidden, mask = OP_FWD(leaves[0], w, b, leaves[1], leaves[2], rng, s, p, True)
        grad_y = torch.randn_like(y)
        gx, ga, gb = torch.autograd.grad(y, leaves, grad_y)
    keep = unpack_mask(mask, k)
    rows = torch.randperm(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))[:256]
    ks = 1.0 / (1.0 - quantized_drop_probability(p))
    context = f"(seed={seed}, target shape)"

    def lora_parts(dtype):
        xd, ad, bd, wd, gd = (t.to(dtype) for t in (x, a, bb, w, grad_y))
        xm = torch.where(keep, xd * ks, torch.zeros((), dtype=dtype, device="cuda"))
        h = xm @ ad.t()  # [N, r]
        d_h = (gd @ bd) * s  # [N, r]
        y_rows = xd[rows] @ wd.t() + b.to(dtype) + (h[rows] @ bd.t()) * s
        gx_rows = gd[rows] @ wd + torch.where(keep[rows], (d_h[rows] @ ad) * ks, torch.zeros((), dtype=dtype, device="cuda"))
        return {"y": y_rows, "lora_hidden": h, "grad_x": gx_rows, "grad_a": d_h.t() @ xm, "grad_b": (gd.t() @ h) * s}

    ref, eager = lora_parts(torch.float64), lora_parts(torch.bfloat16)
    ours = {"y": y[rows], "lora_hidden": hidden, "grad_x": gx[rows], "grad_a": ga, "grad_b": gb}
    for name in ours:
        assert_flash_rule(name, ours[name], eager[name], ref[name], torch.bfloat16, context)


def test_bias_and_rng_on_the_wrong_device_or_dtype_are_clear_errors():
    x, w, b, a, bb, rng = make_case((6,), 32, 16, 4, torch.float32, 0)
    private = torch.ops.lightning_peft_cuda.lora_forward
    with pytest.raises(RuntimeError, match="bias is on cpu but x is on cuda"):
        private(x, w, b.cpu(), a, bb, rng, 1.0, 0.1, True)
    with pytest.raises(RuntimeError, match="dtype mismatch: x is Float but bias is BFloat16"):
        private(x, w, b.bfloat16(), a, bb, rng, 1.0, 0.1, True)
    with pytest.raises(RuntimeError, match="rng is on cpu but x is on cuda"):
        private(x, w, b, a, bb, rng.cpu(), 1.0, 0.1, True)


@pytest.mark.parametrize("k", [37, 64, 1000])
def test_mask_is_philox_of_seed_offset_and_element(k):
    """The packed mask equals an independent Philox4x32-10 (keyed by the rng tensor) bit for bit."""
    seed = fresh_seed()
    x, weight, bias, a, bb, _ = make_case((70,), k, 16, 4, torch.bfloat16, seed)
    for rng_pair in ((seed, 0), (seed, 12345), (-(seed + 1), 2**40 + 7)):
        rng = torch.tensor(rng_pair, dtype=torch.int64, device="cuda")
        _, _, mask = OP_FWD(x, weight, bias, a, bb, rng, 1.0, 0.3, True)
        expected = philox_mask_reference(rng_pair[0], rng_pair[1], 70, k, 0.3)
        assert torch.equal(mask.cpu(), expected), f"(seed={seed}, rng={rng_pair}, k={k})"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_scaling(p):
    """Keep rate is the quantized 1 - p within 5 sigma, and kept values are scaled to stay unbiased."""
    seed = fresh_seed()
    n, k = 4096, 1000
    x = torch.ones(n, k, device="cuda", dtype=torch.float32)
    weight = torch.zeros(8, k, device="cuda")
    a = torch.ones(1, k, device="cuda")  # hidden[n] = keep_scale * (#kept in row n)
    bb = torch.ones(8, 1, device="cuda")
    rng = torch.tensor([seed, 0], dtype=torch.int64, device="cuda")
    _, hidden, mask = OP_FWD(x, weight, None, a, bb, rng, 1.0, p, True)
    keep = unpack_mask(mask, k)
    expected = 1.0 - quantized_drop_probability(p)
    sigma = math.sqrt(expected * (1 - expected) / keep.numel())
    assert abs(keep.float().mean().item() - expected) < 5 * sigma, f"seed={seed}"
    kept_per_row = keep.sum(1, dtype=torch.float64)
    torch.testing.assert_close(hidden[:, 0].double(), kept_per_row / expected, rtol=1e-6, atol=1e-6)
    assert abs(hidden.double().mean().item() - k) < 5 * math.sqrt(k * (1 - expected) / expected / n) + 1e-3, f"seed={seed}"


def test_same_seed_same_result_different_seed_different_mask():
    seed = fresh_seed()
    x, weight, bias, a, bb, _ = make_case((300,), 200, 96, 16, torch.bfloat16, seed)

    def run(seed_, offset):
        rng = torch.tensor([seed_, offset], dtype=torch.int64, device="cuda")
        return OP_FWD(x, weight, bias, a, bb, rng, 1.0, 0.2, True)

    first, again = run(seed, 0), run(seed, 0)
    for u, v in zip(first, again):
        assert torch.equal(u, v), f"not deterministic (seed={seed})"
    assert not torch.equal(first[2], run(seed + 1, 0)[2]), f"seed ignored (seed={seed})"
    assert not torch.equal(first[2], run(seed, 1)[2]), f"offset ignored (seed={seed})"


def test_cuda_graph_replays_with_the_seed_in_the_rng_tensor():
    """The kernels read (seed, offset) on device: a captured graph draws the mask of the current buffer."""
    seed = fresh_seed()
    x, weight, bias, a, bb, _ = make_case((256,), 128, 64, 8, torch.bfloat16, seed)
    rng = torch.tensor([seed, 0], dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            OP_FWD(x, weight, bias, a, bb, rng, 1.0, 0.3, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, hidden, mask = OP_FWD(x, weight, bias, a, bb, rng, 1.0, 0.3, True)
    masks = []
    for pair in ((seed, 0), (seed, 1), (seed + 7, 0)):
        rng.copy_(torch.tensor(pair, dtype=torch.int64))
        graph.replay()
        torch.cuda.synchronize()
        eager_y, eager_hidden, eager_mask = OP_FWD(x, weight, bias, a, bb, rng, 1.0, 0.3, True)
        assert torch.equal(mask, eager_mask), f"graph replay used a stale mask (seed={seed}, rng={pair})"
        assert torch.equal(hidden, eager_hidden)
        assert max_err(y, eager_y) <= torch.finfo(torch.bfloat16).eps * eager_y.abs().max().item()
        masks.append(mask.clone())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((3, 61), 333, 77, 100), ((130,), 1024, 136, 16), ((1,), 5, 3, 1)], ids=str)
def test_every_output_element_is_written(dtype, shape):
    """Outputs and workspaces NaN/0xFF-poisoned before the kernels run: nothing may survive."""
    seed = fresh_seed()
    lead, k, d, r = shape
    case = make_case(lead, k, d, r, dtype, seed)
    with debug_options(poison=True):
        for drop_p in (0.5, 0.0):
            y, hidden, mask = check_against_fp64(*case, 1.0, drop_p, True, f"(poisoned, seed={seed}, p={drop_p})")
            assert torch.isfinite(y).all() and torch.isfinite(hidden).all()
            if drop_p:
                expected = philox_mask_reference(seed, 3, math.prod(lead), k, drop_p)
                assert torch.equal(mask.cpu(), expected), f"mask bytes not all written (seed={seed})"
            x, w, b, a, bb, rng = case
            for need_x in (True, False):
                gx, ga, gb = OP_BWD(torch.randn_like(y), x, w, a, bb, hidden, mask, 1.0, drop_p, need_x)
                assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
                assert torch.isfinite(gx).all() and gx.shape == (x.shape if need_x else (0,))


def test_no_nan_from_recycled_nan_memory():
    """Without the debug flag: fill the caching allocator's free blocks with NaN, then run."""
    seed = fresh_seed()
    case = make_case((8, 129), 520, 264, 24, torch.bfloat16, seed)
    junk = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(8)]
    del junk  # the blocks go back to the cache and are handed to the op's outputs
    x, w, b, a, bb, rng = case
    y, hidden, mask = OP_FWD(x, w, b, a, bb, rng, 1.0, 0.1, True)
    gx, ga, gb = OP_BWD(torch.randn_like(y), x, w, a, bb, hidden, mask, 1.0, 0.1, True)
    for name, t in (("y", y), ("hidden", hidden), ("grad_x", gx), ("grad_a", ga), ("grad_b", gb)):
        assert torch.isfinite(t).all(), f"{name} has values from recycled memory (seed={seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("drop_p,training", [(0.0, True), (0.3, True), (0.3, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_on_cuda(dtype, drop_p, training, bias):
    seed = fresh_seed()
    x, w, b, a, bb, rng = make_case((4, 9), 40, 24, 5, dtype, seed, bias=bias)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    torch.library.opcheck(OP_FWD, (x, w, b, a, bb, rng, 0.5, drop_p, training))
    with torch.no_grad():
        y, hidden, mask = OP_FWD(x, w, b, a, bb, rng, 0.5, drop_p, training)
    p_bwd = drop_p if training else 0.0
    for need_x in (True, False):
        torch.library.opcheck(OP_BWD, (torch.randn_like(y), x.detach(), w, a.detach(), bb.detach(), hidden, mask, 0.5, p_bwd, need_x))


def test_saved_for_backward_is_x_plus_mask_bits_plus_hidden():
    """Beyond x and the parameters, backward keeps N*ceil(K/8) mask bytes and the [N, r] hidden only."""
    n, k, d, r = 512, 1000, 256, 16
    x, w, b, a, bb, rng = make_case((n,), k, d, r, torch.bfloat16, fresh_seed())
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    known = {t.untyped_storage().data_ptr() for t in (x, w, b, a, bb)}
    extra = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            extra[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bb, scaling=1.0, dropout_p=0.1, rng=rng, training=True)
    assert sum(extra.values()) == n * ((k + 7) // 8) + n * r * 2
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None and x.grad is not None


def test_rank_above_128_uses_the_fallback_and_stays_correct():
    seed = fresh_seed()
    case = make_case((50,), 64, 40, 130, torch.float32, seed)
    check_against_fp64(*case, 1.0, 0.2, True, f"(seed={seed}, r=130)")


def test_float64_uses_the_fallback():
    seed = fresh_seed()
    x, w, b, a, bb, rng = make_case((9,), 16, 8, 2, torch.float64, seed)
    y, hidden, mask = OP_FWD(x, w, b, a, bb, rng, 1.0, 0.0, True)
    torch.testing.assert_close(y, x @ w.t() + b + (x @ a.t()) @ bb.t())

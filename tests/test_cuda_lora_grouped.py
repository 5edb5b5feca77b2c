"""The grouped (mixed-adapter) LoRA kernels on a GPU against the PyTorch implementation and fp64.

Every test needs a GPU (skipped with reason "needs CUDA" elsewhere) and the compiled kernels: on
a GPU machine a missing build is a failure, not a skip. The same checks run on the CPU against
the emulated kernels in tests/test_grouped_kernels_emulation.py (``check_grouped_kernels`` is shared).

Tolerance: flash-attention's rule (tests/test_cuda_reference.py::assert_flash_rule): the kernels'
error vs fp64 at most twice the PyTorch implementation's error in the same dtype. Dropout masks:
bit for bit the PyTorch implementation's, which are the single-adapter op's on each sub-batch.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator, Optional, Sequence

import pytest
import torch
from torch import Tensor

from lightning_peft.ops import cpu_backend, cuda_backend, lora_linear, lora_linear_grouped
from lightning_peft.ops import lora_grouped as grouped
from lightning_peft.ops import lora_grouped_cuda as grouped_cuda
from test_cuda_reference import assert_flash_rule, fresh_seed

single_module = importlib.import_module("lightning_peft.ops.lora_linear")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims, K, D, ranks, adapter_index): partial tiles, K % 8 != 0, every rank bucket, base
# rows, an adapter without rows, unsorted rows, a per-token index, segments longer than a tile.
CASES = [
    ((6, 3), 19, 13, (2, 5, 3), [2, -1, 0, 2, 0, -1]),
    ((4, 40), 64, 48, (16, 8), [1, 0, -1, 1]),
    ((3, 70), 136, 72, (17, 33, 64, 128), [3, 0, 2]),
    ((5, 33), 200, 130, (8, 8, 8, 8), [-1, 3, 3, 1, 0]),
    ((24,), 37, 24, (5, 100), [1, 0, -1, 1, 1, 0, 0, -1, 1, 1, 0, 1, 0, 0, 1, -1, -1, 1, 0, 1, 1, 0, 0, 1]),
    ((2, 3, 9), 40, 20, (4, 6), [1, 1, 0, -1, 0, 1]),  # per-token index over 2 x 3 x 9 tokens (see make)
]
MODES = [(0.0, True), (0.1, True), (0.5, True), (0.1, False)]


@contextlib.contextmanager
def packed_masks() -> Iterator[None]:
    """The PyTorch implementation with the kernels' packed Philox masks on CPU tensors too (the CPU
    kernels, which draw their own hashed masks, are switched off)."""
    saved = single_module._uses_drop_positions
    single_module._uses_drop_positions = lambda device: False
    try:
        with cpu_backend.force_fallback(True):
            yield
    finally:
        single_module._uses_drop_positions = saved


def make_grouped_case(lead, k, d, ranks, index, dtype, device, seed, bias=True, weight=True):
    """Random inputs (never zeros) and an int64 index (a per-token one when it has more entries than rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w = (torch.randn(d, k, generator=g) / k**0.5).to(dtype) if weight else None
    b = torch.randn(d, generator=g).to(dtype) if bias else None
    a_s = [(torch.randn(r, k, generator=g) / k**0.5).to(dtype) for r in ranks]
    b_s = [(torch.randn(d, r, generator=g) / r**0.5).to(dtype) for r in ranks]
    rngs = [torch.tensor([seed + 17 * j, 5 + j], dtype=torch.int64) for j in range(len(ranks))]
    index = torch.tensor(index, dtype=torch.int64)
    if index.numel() != lead[0]:  # per token: repeat the pattern over every token
        n_tokens = x[..., 0].numel()
        index = index.repeat((n_tokens + index.numel() - 1) // index.numel())[:n_tokens]
    move = (lambda t: None if t is None else t.to(device))
    return move(x), move(w), move(b), [move(a) for a in a_s], [move(t) for t in b_s], [move(r) for r in rngs], index


def _cpu(t: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.detach().cpu()
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def check_grouped_kernels(
    fwd: Callable, bwd: Callable, x: Tensor, w: Optional[Tensor], b: Optional[Tensor], a_s: Sequence[Tensor], b_s: Sequence[Tensor],
    rngs: Sequence[Tensor], index: Tensor, ps: Sequence[float], training: bool, compute_grad_x: bool = True, context: str = "",
) -> None:
    """The private kernel ops ``fwd`` / ``bwd`` (CUDA or emulated) vs the PyTorch implementation in x's
    dtype (eager) and in fp64 (ref), on the CPU with packed masks; masks and the sort bit for bit."""
    n, dtype = len(a_s), x.dtype
    scalings = [0.5 + 0.25 * j for j in range(n)]
    order, offsets = grouped.segments(index.to(x.device), n)
    _, per_unit = grouped.units_of(index, x.shape[:-1])
    y, hidden, mask = fwd(x, w, b, list(a_s), list(b_s), list(rngs), order, offsets, per_unit, scalings, list(ps), training)

    def run_forward(cast):
        return grouped.forward_pytorch(
            _cpu(x, cast), _cpu(w, cast), _cpu(b, cast), [_cpu(a, cast) for a in a_s], [_cpu(t, cast) for t in b_s],
            [_cpu(r) for r in rngs], index, scalings, list(ps), training,
        )

    with packed_masks():
        eager, ref = run_forward(None), run_forward(torch.float64)
    assert torch.equal(order.cpu(), eager[2]) and torch.equal(offsets.cpu(), eager[3]), context
    assert torch.equal(mask.cpu(), eager[4]), f"mask bits differ {context}"
    assert_flash_rule("y", y.cpu(), eager[0], ref[0], dtype, context)
    assert_flash_rule("hidden", hidden.cpu(), eager[1], ref[1], dtype, context)

    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(x.device)
    effective = [p if training else 0.0 for p in ps]
    grad_x, grad_as, grad_bs = bwd(grad_y, x, w, list(a_s), list(b_s), hidden, order, offsets, per_unit, mask, scalings, effective, compute_grad_x)

    def run_backward(cast, outputs):
        return grouped.backward_pytorch(
            _cpu(grad_y, cast), _cpu(x, cast), _cpu(w, cast), [_cpu(a, cast) for a in a_s], [_cpu(t, cast) for t in b_s],
            outputs[1], outputs[2], outputs[3], outputs[4], outputs[5], scalings, effective, compute_grad_x,
        )

    with packed_masks():
        g_eager, g_ref = run_backward(None, eager), run_backward(torch.float64, ref)
    if compute_grad_x:
        assert_flash_rule("grad_x", grad_x.cpu(), g_eager[0], g_ref[0], dtype, context)
    else:
        assert grad_x.numel() == 0, context
    for j in range(n):
        assert_flash_rule(f"grad_a[{j}]", grad_as[j].cpu(), g_eager[1][j], g_ref[1][j], dtype, context)
        assert_flash_rule(f"grad_b[{j}]", grad_bs[j].cpu(), g_eager[2][j], g_ref[2][j], dtype, context)


# ---- GPU tests ---------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert cuda_backend.load(), f"CUDA kernels did not load: {cuda_backend.status()}"
    assert hasattr(torch.ops.lightning_peft_cuda, "lora_grouped_forward"), "the build has no grouped kernels"
    cuda_backend.set_force_fallback(False)
    return torch.ops.lightning_peft_cuda


@gpu
@pytest.mark.parametrize("drop_p,training", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_kernels_match_fp64(cuda_ops, dtype, case, drop_p, training):
    seed = fresh_seed()
    lead, k, d, ranks, index = case
    x, w, b, a_s, b_s, rngs, index = make_grouped_case(lead, k, d, ranks, index, dtype, "cuda", seed)
    check_grouped_kernels(
        cuda_ops.lora_grouped_forward, cuda_ops.lora_grouped_backward, x, w, b, a_s, b_s, rngs, index, [drop_p] * len(ranks), training,
        context=f"(seed={seed}, {dtype}, {case[:4]}, p={drop_p}, training={training})",
    )


@gpu
@pytest.mark.parametrize("bias,weight,compute_grad_x", [(False, True, True), (True, False, True), (False, False, False)])
def test_grouped_kernels_optional_terms(cuda_ops, bias, weight, compute_grad_x):
    seed = fresh_seed()
    x, w, b, a_s, b_s, rngs, index = make_grouped_case((6, 5), 40, 24, (4, 9), [1, -1, 0, 1, 1, 0], torch.bfloat16, "cuda", seed, bias, weight)
    check_grouped_kernels(
        cuda_ops.lora_grouped_forward, cuda_ops.lora_grouped_backward, x, w, b, a_s, b_s, rngs, index, [0.2, 0.0], True, compute_grad_x,
        context=f"(seed={seed})",
    )


@gpu
@pytest.mark.parametrize("drop_p", [0.0, 0.1])
def test_public_op_on_cuda_matches_per_adapter_single_op_runs(cuda_ops, drop_p):
    """lora_linear_grouped on CUDA (kernels) vs the single-adapter CUDA op on each sub-batch: masks
    (hence outputs up to rounding) and gradients agree."""
    seed = fresh_seed()
    dtype = torch.bfloat16
    x, w, b, a_s, b_s, rngs, index = make_grouped_case((8, 64), 256, 192, (8, 16, 8, 32), [3, 0, -1, 1, 0, 2, 3, 1], dtype, "cuda", seed)
    scalings = [2.0, 1.0, 0.5, 0.25]
    leaves = [t.clone().requires_grad_(True) for t in (x, *a_s, *b_s)]
    y = lora_linear_grouped(
        leaves[0], w, b, leaves[1:5], leaves[5:], scalings=scalings, dropout_ps=[drop_p] * 4, rngs=rngs, adapter_index=index, training=True
    )
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, *a_s, *b_s)]
    total = sum(0 * t.sum() for t in ref_leaves[1:])
    for j in range(-1, 4):
        rows = (index == j).nonzero().flatten().cuda()
        if rows.numel() == 0:
            continue
        if j < 0:
            out = torch.nn.functional.linear(ref_leaves[0][rows], w, b)
        else:
            out = lora_linear(ref_leaves[0][rows], w, b, ref_leaves[1 + j], ref_leaves[5 + j], scaling=scalings[j], dropout_p=drop_p, rng=rngs[j], training=True)
        torch.testing.assert_close(y[rows], out, rtol=2e-2, atol=2e-2)
        total = total + (out.float() * grad_y[rows].float()).sum()
    ref_grads = torch.autograd.grad(total, ref_leaves)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.float(), ref.float(), rtol=3e-2, atol=3e-2)


@gpu
def test_kernels_and_fallback_agree_through_the_public_op(cuda_ops):
    """Same call with the kernels and with the forced PyTorch fallback on CUDA: identical masks, close outputs."""
    seed = fresh_seed()
    x, w, b, a_s, b_s, rngs, index = make_grouped_case((4, 96), 320, 256, (16, 8), [1, 0, -1, 1], torch.float32, "cuda", seed)
    kwargs = dict(scalings=[1.0, 2.0], dropout_ps=[0.1, 0.3], rngs=rngs, adapter_index=index, training=True)
    op = torch.ops.lightning_peft.lora_grouped_forward
    ours = op(x, w, b, a_s, b_s, rngs, index, [1.0, 2.0], [0.1, 0.3], True)
    with cuda_backend.force_fallback():
        theirs = op(x, w, b, a_s, b_s, rngs, index, [1.0, 2.0], [0.1, 0.3], True)
    assert torch.equal(ours[4], theirs[4]) and torch.equal(ours[2], theirs[2]) and torch.equal(ours[3], theirs[3])
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-4)
    assert lora_linear_grouped(x, w, b, a_s, b_s, **kwargs).shape == (4, 96, 256)


@gpu
@pytest.mark.parametrize("drop_p,training", [(0.1, True), (0.0, True), (0.1, False)])
def test_opcheck_on_cuda(cuda_ops, drop_p, training):
    x, w, b, a_s, b_s, rngs, index = make_grouped_case((6, 9), 40, 24, (4, 9), [1, -1, 0, 1, 1, 0], torch.float32, "cuda", 3)
    for t in (x, *a_s, *b_s):
        t.requires_grad_(True)
    args = (x, w, b, a_s, b_s, rngs, index, [1.0, 2.0], [drop_p] * 2, training)
    torch.library.opcheck(torch.ops.lightning_peft.lora_grouped_forward.default, args)
    y, hidden, order, offsets, mask, mask_sizes = torch.ops.lightning_peft.lora_grouped_forward(*args)
    effective = [drop_p if training else 0.0] * 2
    for compute_grad_x in (True, False):
        torch.library.opcheck(
            torch.ops.lightning_peft.lora_grouped_backward.default,
            (torch.randn_like(y), x.detach(), w, [a.detach() for a in a_s], [t.detach() for t in b_s], hidden, order, offsets, mask,
             mask_sizes, [1.0, 2.0], effective, compute_grad_x),
        )


@gpu
def test_torch_compile_fullgraph_on_cuda(cuda_ops):
    x, w, b, a_s, b_s, rngs, index = make_grouped_case((4, 32), 64, 48, (8, 16), [1, 0, -1, 1], torch.bfloat16, "cuda", 5)

    def f(x, a0, a1, b0, b1):
        y = lora_linear_grouped(x, w, b, [a0, a1], [b0, b1], scalings=[1.0, 0.5], dropout_ps=[0.1, 0.2], rngs=rngs, adapter_index=index, training=True)
        return torch.nn.functional.gelu(y.float()).sum()

    eager_in = [t.clone().requires_grad_(True) for t in (x, *a_s, *b_s)]
    compiled_in = [t.clone().requires_grad_(True) for t in (x, *a_s, *b_s)]
    torch._dynamo.reset()
    out_c = torch.compile(f, fullgraph=True)(*compiled_in)
    out_e = f(*eager_in)
    torch.testing.assert_close(out_c, out_e, rtol=1e-3, atol=1e-2)
    out_c.backward()
    out_e.backward()
    for c, e in zip(compiled_in, eager_in):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-2, atol=1e-2)


@gpu
def test_calls_outside_the_kernels_take_the_pytorch_path(cuda_ops):
    """Rank 130 (> 128) and float64 inputs run the PyTorch implementation on CUDA, with the same results as on CPU."""
    for ranks, dtype in (((130, 4), torch.float32), ((4, 6), torch.float64)):
        x, w, b, a_s, b_s, rngs, index = make_grouped_case((4, 8), 40, 24, ranks, [1, 0, -1, 1], dtype, "cuda", 9)
        assert not grouped_cuda.kernels_cover(x, a_s, b_s)
        y = lora_linear_grouped(x, w, b, a_s, b_s, scalings=[1.0, 2.0], dropout_ps=[0.2, 0.1], rngs=rngs, adapter_index=index, training=True)
        with packed_masks():
            y_cpu = lora_linear_grouped(_cpu(x), _cpu(w), _cpu(b), [_cpu(a) for a in a_s], [_cpu(t) for t in b_s], scalings=[1.0, 2.0],
                                        dropout_ps=[0.2, 0.1], rngs=[_cpu(r) for r in rngs], adapter_index=index, training=True)
        torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-4, atol=1e-4)

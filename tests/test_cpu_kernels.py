"""The compiled CPU kernels of the LoRA op (csrc/cpu/lora_rows.cpp) against independent references.

The op-level tests in test_ops_lora_linear.py run every case on the kernels too (the ``kernels``
mask form); here: the hashed mask against its numpy reference and its statistics, shapes the
row loops split unevenly, agreement with the PyTorch path, thread-count independence, and
mixing a forward of one implementation with a backward of the other.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.ops import cpu_backend, lora_grouped_cpu
from lightning_peft.ops import lora_linear_grouped
from lightning_peft.ops.dropout_mask import encode_hash_key, hashed_keep_mask, quantized_drop_probability
from lightning_peft.ops.lora_linear import dropout_keep_mask, lora_linear

OP_FWD = torch.ops.lightning_peft.lora_linear_forward.default


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """Every test here needs the kernels: a missing compiler must fail, not skip. The grouped op's
    kernels run on units of any size here (grouped_case has 5 tokens per row)."""
    assert cpu_backend.load(), cpu_backend.status()["reason"]
    monkeypatch.setattr(lora_grouped_cpu, "MIN_UNIT_TOKENS", 1)
    with cpu_backend.force_fallback(False):
        yield


def kernel_keep_mask(seed, offset, rows, cols, p):
    return torch.ops.lightning_peft_cpu.lora_rows_keep_mask(seed, offset, rows, cols, p)


@pytest.mark.parametrize(
    "seed, offset, rows, cols, p",
    [
        (0, 0, 1, 1, 0.1),
        (3, 7, 5, 13, 0.5),  # rows that start mid-word (13 % 4 != 0)
        (-1, -(2**63), 17, 31, 0.25),  # negative keys are read as uint64
        (2**62, 5, 64, 130, 0.9),
        (8, 8, 2, 1000, 0.3333),  # p * 65536 = 21843.1: rounded as drop_threshold rounds
        (11, 2, 3, 8, 0.0),  # nothing dropped
        (11, 2, 3, 8, 1 - 2**-18),  # threshold capped at 65535: one keep level left
    ],
)
def test_kernel_mask_is_the_numpy_reference_bit_for_bit(seed, offset, rows, cols, p):
    assert torch.equal(kernel_keep_mask(seed, offset, rows, cols, p), hashed_keep_mask(seed, offset, rows, cols, p))


def test_forward_mask_is_the_keys_mask():
    """What the op keeps decodes to the mask its forward used (checked through the output)."""
    x = torch.randn(9, 23, dtype=torch.float64)
    w, a, b = torch.randn(6, 23, dtype=torch.float64), torch.randn(4, 23, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    y, hidden, mask = OP_FWD(x, w, None, a, b, torch.tensor([21, 4]), 1.0, 0.3, True)
    keep = dropout_keep_mask(mask, 9, 23, 0.3)
    assert torch.equal(keep, hashed_keep_mask(21, 4, 9, 23, 0.3))
    expected_hidden = (x * keep) @ a.t() / (1 - quantized_drop_probability(0.3))
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x @ w.t() + expected_hidden @ b.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_statistics(p):
    """Drop rate within 5 sigma of the quantized p overall, per row block and per column; two keys
    agree as often as independent draws would; consecutive elements are uncorrelated."""
    rows, cols = 512, 512
    q = quantized_drop_probability(p)
    keep = kernel_keep_mask(5, 1, rows, cols, p).double()
    drop = 1 - keep
    n = rows * cols
    assert abs(drop.mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    col_rates = drop.mean(0)  # [cols]: each over `rows` draws
    assert (col_rates - q).abs().max().item() < 5.5 * math.sqrt(q * (1 - q) / rows)
    other = 1 - kernel_keep_mask(5, 2, rows, cols, p).double()
    agree = (drop == other).double().mean().item()
    expected = q * q + (1 - q) * (1 - q)
    assert abs(agree - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    flat = drop.view(-1)
    for lag in (1, 2, 3, 4, 5, cols):  # within a hash word, across words, across rows
        corr = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)


def fp64_reference(x, w, bias, a, b, scaling, keep, p):
    q = quantized_drop_probability(p)
    xd = x * keep.to(x.dtype) / (1 - q)
    y = x @ w.t() + scaling * (xd @ a.t()) @ b.t()
    return y + bias if bias is not None else y


# ranks: exact kernel ranks (8, 16, 64) and ones the kernels zero-pad (1 -> 4, 3 -> 4, 40 -> 64)
@pytest.mark.parametrize("n, k, d, r", [(1, 1, 1, 1), (300, 130, 70, 8), (257, 33, 5, 3), (129, 64, 64, 16), (66, 40, 24, 40), (7, 20, 9, 64)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_float32_kernels_match_float64_math(n, k, d, r, p):
    """fp32 kernels vs the same math in fp64 with the kernels' mask: y and all three gradients."""
    g = torch.Generator().manual_seed(n + k)
    x, w, bias = torch.randn(n, k, generator=g), torch.randn(d, k, generator=g) / k**0.5, torch.randn(d, generator=g)
    a, b = torch.randn(r, k, generator=g) / k**0.5, torch.randn(d, r, generator=g)
    grad_y = torch.randn(n, d, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = lora_linear(leaves[0], w, bias, leaves[1], leaves[2], scaling=0.5, dropout_p=p, rng=torch.tensor([2, 9]), training=True)
    grads = torch.autograd.grad(y, leaves, grad_y)
    keep = hashed_keep_mask(2, 9, n, k, p) if p > 0 else torch.ones(n, k, dtype=torch.bool)
    leaves64 = [t.double().requires_grad_() for t in (x, a, b)]
    ref = fp64_reference(leaves64[0], w.double(), bias.double(), leaves64[1], leaves64[2], 0.5, keep, p)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_y.double())
    for ours, theirs in zip((y, *grads), (ref, *ref_grads)):
        scale = theirs.abs().max().item() + 1e-30
        assert (ours.double() - theirs).abs().max().item() <= 2e-6 * scale * max(1.0, math.sqrt(max(n, k, d)))


def test_same_bits_whatever_the_thread_count():
    """Partial sums follow fixed row chunks, so 1 and 2 threads give identical results."""
    x = torch.randn(1000, 96, requires_grad=True)
    w, a, b = torch.randn(40, 96), torch.randn(8, 96, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    grad_y = torch.randn(1000, 40)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y = lora_linear(x, w, None, a, b, scaling=2.0, dropout_p=0.1, rng=torch.tensor([1, 1]), training=True)
            results.append((y, *torch.autograd.grad(y, (x, a, b), grad_y)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("forward_kernels", [True, False])
def test_forward_of_one_implementation_backward_of_the_other(forward_kernels):
    """A backward gets whatever mask its forward kept: the kernels' key or the PyTorch path's drop
    positions. Either backward must use it (the fallback can be switched between the two)."""
    x = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 24, dtype=torch.float64)
    a = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    rng = torch.tensor([6, 6])
    with cpu_backend.force_fallback(not forward_kernels):
        y, _, mask = OP_FWD(x, w, None, a, b, rng, 1.0, 0.3, True)
    with cpu_backend.force_fallback(forward_kernels):
        grads = torch.autograd.grad(y, (x, a, b), torch.ones_like(y))
    keep = dropout_keep_mask(mask, 40, 24, 0.3)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    ref = fp64_reference(leaves[0], w, None, leaves[1], leaves[2], 1.0, keep, 0.3)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, leaves, torch.ones_like(ref))):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_dropped_inf_and_nan_become_zero():
    """Dropped elements contribute exactly 0 to the LoRA branch, even when they are inf / NaN."""
    rows, cols, p = 16, 32, 0.5
    keep = hashed_keep_mask(4, 4, rows, cols, p)
    x = torch.randn(rows, cols, dtype=torch.float64)
    dropped = (~keep).nonzero()
    x[dropped[0, 0], dropped[0, 1]] = float("inf")
    x[dropped[1, 0], dropped[1, 1]] = float("nan")
    a = torch.randn(3, cols, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = lora_linear(x, None, None, a, b, scaling=1.0, dropout_p=p, rng=torch.tensor([4, 4]), training=True)
    grads = torch.autograd.grad(y.sum(), (a, b))
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    clean = torch.where(keep, x, torch.zeros_like(x))
    torch.testing.assert_close(y, fp64_reference(clean, torch.zeros(5, cols, dtype=torch.float64), None, a, b, 1.0, keep, p))


def test_kernels_agree_with_the_pytorch_path_on_the_same_mask_without_dropout():
    """p = 0 (and eval): no mask, so the two implementations compute the same function."""
    f64 = {"dtype": torch.float64}
    x = torch.randn(2, 50, 40, **f64, requires_grad=True)
    w, bias = torch.randn(30, 40, **f64), torch.randn(30, **f64)
    a, b = torch.randn(8, 40, **f64, requires_grad=True), torch.randn(30, 8, **f64, requires_grad=True)
    outs = []
    for fallback in (False, True):
        with cpu_backend.force_fallback(fallback):
            y = lora_linear(x, w, bias, a, b, scaling=2.0, dropout_p=0.1, rng=torch.tensor([0, 0]), training=False)
            outs.append((y, *torch.autograd.grad(y.square().sum(), (x, a, b))))
    for ours, theirs in zip(*outs):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_rank_above_the_kernels_maximum_takes_the_pytorch_path():
    r = cpu_backend.MAX_RANK + 1
    x, w = torch.randn(5, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    a, b = torch.randn(r, 16, dtype=torch.float64), torch.randn(8, r, dtype=torch.float64)
    rng = torch.tensor([1, 2])
    y, _, mask = OP_FWD(x, w, None, a, b, rng, 1.0, 0.2, True)
    assert int(mask[0]) != 2  # not the kernels' hash key
    keep = dropout_keep_mask(mask, 5, 16, 0.2)
    torch.testing.assert_close(y, fp64_reference(x, w, None, a, b, 1.0, keep, 0.2), rtol=1e-12, atol=1e-12)


def test_half_precision_and_mixed_dtypes_take_the_pytorch_path():
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    w, a, b = (torch.randn(s, dtype=torch.bfloat16) for s in ((8, 16), (4, 16), (8, 4)))
    rng = torch.tensor([1, 2])
    y, _, mask = OP_FWD(x, w, None, a, b, rng, 1.0, 0.2, True)
    assert mask.dim() == 1 and int(mask[0]) != 2  # drop positions (or their key), not the kernels' hash key
    with cpu_backend.force_fallback(True):
        y_ref, _, _ = OP_FWD(x, w, None, a, b, rng, 1.0, 0.2, True)
    assert torch.equal(y, y_ref)



def grouped_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    x = torch.randn(6, 5, 24, generator=g, **f64)
    w, bias = torch.randn(10, 24, generator=g, **f64), torch.randn(10, generator=g, **f64)
    a_s = [torch.randn(r, 24, generator=g, **f64) for r in (2, 8, 3)]
    b_s = [torch.randn(10, r, generator=g, **f64) for r in (2, 8, 3)]
    rngs = [torch.tensor([5, j]) for j in range(3)]
    index = torch.tensor([2, -1, 0, 2, 1, 0])  # per row, unsorted, with a base row
    return x, w, bias, a_s, b_s, rngs, index


def grouped_run(forward_fallback, backward_fallback):
    """Output and gradients (x, As, Bs) of the grouped op with each direction's implementation chosen."""
    x, w, bias, a_s, b_s, rngs, index = grouped_case()
    leaves = [t.clone().requires_grad_() for t in (x, *a_s, *b_s)]
    with cpu_backend.force_fallback(forward_fallback):
        y = lora_linear_grouped(leaves[0], w, bias, leaves[1:4], leaves[4:], scalings=[0.5, 1.0, 2.0], dropout_ps=[0.3, 0.0, 0.5],
                                rngs=rngs, adapter_index=index, training=True)
    with cpu_backend.force_fallback(backward_fallback):
        grads = torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
    return (y, *grads)


@pytest.mark.parametrize("forward_fallback", [False, True])
def test_grouped_op_forward_of_one_implementation_backward_of_the_other(forward_fallback):
    """The grouped op's CPU kernels keep the adapters' keys, its PyTorch path drop positions; either
    backward accepts either forward's outputs (the same as running both directions alike)."""
    mixed = grouped_run(forward_fallback, not forward_fallback)
    alike = grouped_run(forward_fallback, forward_fallback)
    for ours, theirs in zip(mixed, alike):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_grouped_op_takes_the_kernels_on_cpu():
    """With the kernels loaded and dropout on, the grouped op's mask is the adapters' keys (one 17-byte
    key per adapter with dropout); without dropout it takes the PyTorch forms (no mask either way)."""
    x, w, bias, a_s, b_s, rngs, index = grouped_case()
    assert lora_grouped_cpu.kernels_cover(x, w, bias, a_s, b_s)
    out = torch.ops.lightning_peft.lora_grouped_forward.default(x, w, bias, a_s, b_s, rngs, index, [0.5, 1.0, 2.0], [0.3, 0.0, 0.5], True)
    mask, mask_sizes = out[4], out[5]
    assert mask_sizes.tolist() == [17, 0, 17] and torch.equal(mask[:17], encode_hash_key(rngs[0]))

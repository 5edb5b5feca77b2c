"""The non-CPU fallback's Philox mask draw (lightning_peft/ops/philox.py) against the independent
NumPy reference of the CUDA kernels' mask (tests/test_cuda_reference.py), plus "no host sync" checks.

Everything runs on CPU tensors (the function is device-agnostic); the CUDA tests skip without a GPU.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from lightning_peft.ops import cpu_backend, lora_linear
from lightning_peft.ops.dropout_mask import drop_threshold
from lightning_peft.ops.philox import philox4x32_10, philox_keep_mask
from test_cuda_reference import fresh_seed, philox4x32_10 as philox_numpy, philox_mask_reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
OP_FWD = torch.ops.lightning_peft.lora_linear_forward.default
OP_BWD = torch.ops.lightning_peft.lora_linear_backward.default


def test_philox_rounds_match_the_numpy_reference_on_random_words():
    g = np.random.default_rng(fresh_seed())
    counter = [g.integers(0, 2**32, size=1000, dtype=np.uint64) for _ in range(4)]
    key = [int(v) for v in g.integers(0, 2**32, size=2, dtype=np.uint64)]
    ours = philox4x32_10(tuple(torch.from_numpy(c.astype(np.int64)) for c in counter), tuple(torch.tensor(k) for k in key))
    for word, ref in zip(ours, philox_numpy(*counter, *key)):
        assert word.tolist() == ref.astype(np.int64).tolist()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.37, 1 / 65536, 1e-7, 0.9999])
@pytest.mark.parametrize("rows, cols", [(3, 64), (70, 13), (1, 1), (0, 8)])
def test_keep_mask_is_bit_identical_to_the_kernels_reference(p, rows, cols):
    seed = fresh_seed()
    # negative int64 seeds / offsets: the kernels read them as unsigned 64-bit words
    for key in [(seed, 7), (-seed - 1, 2**40 + 3), (2**63 - 1, -1)]:
        ours = philox_keep_mask(torch.tensor(key), rows, cols, drop_threshold(p))
        assert ours.dtype == torch.uint8 and ours.shape == (rows, (cols + 7) // 8)
        assert torch.equal(ours, philox_mask_reference(*key, rows, cols, p)), f"key={key}"


def test_keep_mask_reads_no_host_value_of_the_rng():
    """On the meta device any .item() / .tolist() / data-dependent branch would raise: the draw only
    builds tensor ops on the rng tensor, so it needs no host sync and is capturable."""
    mask = philox_keep_mask(torch.empty(2, dtype=torch.int64, device="meta"), 5, 13, drop_threshold(0.1))
    assert mask.device.type == "meta" and mask.shape == (5, 2) and mask.dtype == torch.uint8


def test_keep_mask_compiles_into_one_graph():
    rng = torch.tensor([fresh_seed(), 3])
    compiled = torch.compile(philox_keep_mask, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(rng, 9, 21, 6554), philox_keep_mask(rng, 9, 21, 6554))


@pytest.fixture
def packed_on_cpu(monkeypatch):
    """The op's non-CPU path (Philox packed keep-bits) on CPU tensors (the CPU kernels switched off)."""
    monkeypatch.setattr(importlib.import_module("lightning_peft.ops.lora_linear"), "_uses_drop_positions", lambda device: False)
    monkeypatch.setattr(cpu_backend._state, "force_fallback", True)


def test_op_forward_mask_is_the_kernels_mask(packed_on_cpu):
    x, w, a, b = torch.randn(4, 6, 21), torch.randn(5, 21), torch.randn(3, 21), torch.randn(5, 3)
    seed = fresh_seed()
    mask = OP_FWD(x, w, None, a, b, torch.tensor([seed, 11]), 1.0, 0.2, True)[2]
    assert torch.equal(mask, philox_mask_reference(seed, 11, 24, 21, 0.2))


def test_op_compiles_fullgraph_on_the_packed_path(packed_on_cpu):
    x, w, a, b = torch.randn(4, 6, 21), torch.randn(5, 21), torch.randn(3, 21), torch.randn(5, 3)
    rng = torch.tensor([fresh_seed(), 2])

    def f(x, a, b):
        return lora_linear(x, w, None, a, b, scaling=0.5, dropout_p=0.2, rng=rng, training=True)

    leaves_c = [t.clone().requires_grad_(True) for t in (x, a, b)]
    leaves_e = [t.clone().requires_grad_(True) for t in (x, a, b)]
    y_c, y_e = torch.compile(f, fullgraph=True)(*leaves_c), f(*leaves_e)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for g_c, g_e in zip(torch.autograd.grad(y_c.sum(), leaves_c), torch.autograd.grad(y_e.sum(), leaves_e)):
        torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)


@needs_cuda
def test_fallback_on_cuda_draws_the_kernels_mask_without_a_host_sync():
    from lightning_peft.ops import cuda_backend

    seed = fresh_seed()
    x, w, a, b = (torch.randn(*s, device="cuda") for s in ((4, 50, 67), (9, 67), (4, 67), (9, 4)))
    rng = torch.tensor([seed, 5], device="cuda")
    grad_y = torch.randn(4, 50, 9, device="cuda")
    with cuda_backend.force_fallback():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            mask = philox_keep_mask(rng, 200, 67, drop_threshold(0.3))
            y, hidden, op_mask = OP_FWD(x, w, None, a, b, rng, 1.0, 0.3, True)
            OP_BWD(grad_y, x, w, a, b, hidden, op_mask, 1.0, 0.3, True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        expected = philox_mask_reference(seed, 5, 200, 67, 0.3)
        assert torch.equal(mask.cpu(), expected) and torch.equal(op_mask.cpu(), expected)
        torch.library.opcheck(OP_FWD, (x, w, None, a, b, rng, 1.0, 0.3, True))
        torch.library.opcheck(OP_BWD, (grad_y, x, w, a, b, hidden, op_mask, 1.0, 0.3, True))

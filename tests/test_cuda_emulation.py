"""The CUDA extension's own code, run on the CPU: csrc/ compiled by the host compiler against
csrc/emulation/cuda_emulation.h (threads + barriers for blocks, whole-tile WMMA semantics).

This checks, without a GPU, everything about the kernels except the hardware: tile and index
math, bounds at partial tiles, 128-bit and scalar load paths, the Philox keep bits (bit-exact
against an independent implementation), the WMMA operand layouts (fp16/bf16) and the FMA path
(fp32), the split-K / split-N partials and their reduction, and the host orchestration in
lora_ops.cpp (cuBLAS calls become CPU matmuls). All outputs and workspaces are poisoned first.
The build takes ~30 s (cached in torch's extensions directory); it needs the CUDA toolkit's
headers, so machines without them skip with reason "needs CUDA".
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import shutil

import pytest
import torch

from lightning_peft.ops.dropout_mask import unpack_mask
from test_cuda_reference import assert_flash_rule, fresh_seed, hidden_eager, lora_eager, philox_mask_reference

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
POISON = 2  # csrc/lora_ops.cpp kFlagPoison
POST_ADD = 1  # csrc/lora_ops.cpp kFlagPostAdd


def _cuda_include_dir():
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    if nvcc:
        candidates.insert(1, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


@pytest.fixture(scope="module")
def emu():
    """Build (or reuse) the emulation library and return torch.ops.lightning_peft_cuda_emu."""
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("needs CUDA (the toolkit headers, for the emulation build)")
    if not hasattr(torch.ops, "lightning_peft_cuda_emu") or not hasattr(torch.ops.lightning_peft_cuda_emu, "lora_forward"):
        from torch.utils import cpp_extension

        digest = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)):
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    digest.update(fh.read())
        cpp_extension.load(
            name="lightning_peft_cuda_emu",
            sources=[os.path.join(CSRC, "emulation", "emulated_ops.cpp")],
            extra_include_paths=[CSRC, include],
            # the hash makes torch rebuild whenever any csrc/ file changes
            extra_cflags=["-O2", "-DLIGHTNING_PEFT_EMULATE", "-Wno-attributes", f"-DLIGHTNING_PEFT_SOURCES_{digest.hexdigest()[:16]}"],
            is_python_module=False,
        )
    return torch.ops.lightning_peft_cuda_emu


def make_case(n, k, d, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(d, k, generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(d, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(dtype)
    bb = (torch.randn(d, r, generator=g) / math.sqrt(r)).to(dtype)
    return x, w, b, a, bb


def check_op_pair(op, x, w, b, a, bb, seed, p, flags, need_x=True, context=""):
    """Forward and backward of the emulated ops vs fp64 and plain eager with the same mask."""
    dtype, (n, k) = x.dtype, x.shape
    rng = torch.tensor([seed, 9], dtype=torch.int64)
    y, hidden, mask = op.lora_forward(x, w, b, a, bb, rng, 1.5, p, True, flags)
    if p > 0:
        assert torch.equal(mask, philox_mask_reference(seed, 9, n, k, p)), f"mask bits {context}"
        keep = unpack_mask(mask, k)
    else:
        assert mask.numel() == 0, context
        keep = None
    ref_in = [t.double().requires_grad_(True) for t in (x, a, bb)]
    y_ref = lora_eager(ref_in[0], w.double(), None if b is None else b.double(), ref_in[1], ref_in[2], 1.5, keep, p)
    eager_in = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    y_eager = lora_eager(eager_in[0], w, b, eager_in[1], eager_in[2], 1.5, keep, p)
    assert_flash_rule("y", y, y_eager, y_ref, dtype, context)
    assert_flash_rule("lora_hidden", hidden, hidden_eager(x, a, keep, p), hidden_eager(x.double(), a.double(), keep, p), dtype, context)

    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grad_x, grad_a, grad_b = op.lora_backward(grad_y, x, w, a, bb, hidden, mask, 1.5, p, need_x, flags)
    g_ref = torch.autograd.grad(y_ref, ref_in, grad_y.double())
    g_eager = torch.autograd.grad(y_eager, eager_in, grad_y)
    if need_x:
        assert_flash_rule("grad_x", grad_x, g_eager[0], g_ref[0], dtype, context)
    else:
        assert grad_x.numel() == 0, context
    assert_flash_rule("grad_a", grad_a, g_eager[1], g_ref[1], dtype, context)
    assert_flash_rule("grad_b", grad_b, g_eager[2], g_ref[2], dtype, context)


# (N, K, D, r): partial tiles in both directions, K % 8 != 0 (scalar loads), every rank bucket.
SHAPES = [(70, 37, 24, 5), (130, 136, 40, 17), (3, 8, 8, 1), (65, 200, 72, 100), (129, 64, 33, 64), (64, 128, 16, 32)]


@pytest.mark.parametrize("post_add", [False, True], ids=["lora_first", "lora_after"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_kernels_match_fp64(emu, dtype, shape, post_add):
    seed = fresh_seed()
    case = make_case(*shape, dtype, seed)
    flags = POISON | (POST_ADD if post_add else 0)
    check_op_pair(emu, *case, seed, 0.3, flags, context=f"(seed={seed}, {dtype}, {shape}, post_add={post_add})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_no_dropout_path_and_no_grad_x(emu, dtype):
    seed = fresh_seed()
    case = make_case(70, 37, 24, 5, dtype, seed)
    check_op_pair(emu, *case, seed, 0.0, POISON, context=f"(seed={seed}, p=0)")
    check_op_pair(emu, *case, seed, 0.3, POISON, need_x=False, context=f"(seed={seed}, no grad_x)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_strided_rows_read_in_place(emu, dtype):
    """x as a row-strided view (ld = K + 24, 128-bit loads) and with an odd row stride (scalar loads)."""
    seed = fresh_seed()
    for k, pad in ((64, 24), (40, 3)):
        x, w, b, a, bb = make_case(67, k, 20, 9, dtype, seed)
        wide = torch.randn(67, k + pad).to(dtype)
        wide[:, :k] = x
        view = wide[:, :k]
        assert view.stride(0) == k + pad
        check_op_pair(emu, view, w, b, a, bb, seed, 0.25, POISON, context=f"(seed={seed}, k={k}, row stride={k + pad})")


def test_emulated_empty_batch(emu):
    x, w, b, a, bb = make_case(1, 24, 8, 4, torch.bfloat16, 0)
    x = x[:0]
    rng = torch.tensor([1, 2], dtype=torch.int64)
    y, hidden, mask = emu.lora_forward(x, w, b, a, bb, rng, 1.0, 0.5, True, POISON)
    assert y.shape == (0, 8) and hidden.shape == (0, 4) and mask.shape == (0, 3)
    grad_x, grad_a, grad_b = emu.lora_backward(y, x, w, a, bb, hidden, mask, 1.0, 0.5, True, POISON)
    assert grad_x.shape == (0, 24)
    assert torch.equal(grad_a, torch.zeros_like(grad_a)) and torch.equal(grad_b, torch.zeros_like(grad_b))

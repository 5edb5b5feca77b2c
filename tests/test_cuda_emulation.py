"""The CUDA extension's own code, run on the CPU: csrc/ compiled by the host compiler against
csrc/emulation/cuda_emulation.h (fibers + a deterministic, adversarial scheduler for blocks,
whole-tile WMMA semantics, alignment checks on every WMMA and vector access).

This checks, without a GPU, everything about the kernels except the hardware: tile and index
math, bounds at partial tiles, 128-bit and scalar load paths, the Philox keep bits (bit-exact
against an independent implementation), the WMMA operand layouts (fp16/bf16) and the FMA path
(fp32), the split-K / split-N partials and their reduction, the barriers (threads run one at a
time between barriers, in ascending, descending or shuffled order; blocks in any order), and the
host orchestration in lora_ops.cpp (cuBLAS calls become CPU matmuls). Inputs sit in NaN-guarded
memory (NaN after their end and in the row padding of strided views); outputs and workspaces are
poisoned, with guard tails checked after each call. Each case runs under one of three split plans:
one split (every block walks all its chunks / row tiles), the default pretend 4-SM device, and an
H200-like 132-SM device. The build takes ~1 min (cached in torch's extensions directory); it
needs the CUDA toolkit's headers, so machines without them skip with reason "needs CUDA".
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
from test_cuda_reference import (
    assert_flash_rule,
    fresh_seed,
    hidden_eager,
    kernel_debug_options,
    lora_eager,
    nan_guarded,
    philox_mask_reference,
)

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
PLANS = {"1x1": {"splits": 1}, "default": {}, "h200": {"sm_count": 132}}  # kernel_debug_options arguments
ASC, DESC, SHUFFLED = 0, 1, 2  # emulated schedule orders (csrc/emulation/cuda_emulation.h)


def _cuda_include_dir():
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    if nvcc:
        candidates.insert(1, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


def build_emulation(name: str, csrc: str = CSRC):
    """Build (or reuse) csrc/ against the emulation as library ``name``; returns ``torch.ops.<name>``."""
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("needs CUDA (the toolkit headers, for the emulation build)")
    if not hasattr(torch.ops, name) or not hasattr(getattr(torch.ops, name), "lora_forward"):
        from torch.utils import cpp_extension

        digest = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    digest.update(fh.read())
        cpp_extension.load(
            name=name,
            sources=[os.path.join(csrc, "emulation", "emulated_ops.cpp")],
            extra_include_paths=[csrc, include],
            # the hash makes torch rebuild whenever any csrc/ file changes
            extra_cflags=["-O2", "-DLIGHTNING_PEFT_EMULATE", f"-DLIGHTNING_PEFT_EMU_NAMESPACE={name}", "-Wno-attributes",
                          f"-DLIGHTNING_PEFT_SOURCES_{digest.hexdigest()[:16]}"],
            is_python_module=False,
        )
    return getattr(torch.ops, name)


@pytest.fixture(scope="module")
def emu():
    """torch.ops.lightning_peft_cuda_emu, with poisoned outputs for every test of this module."""
    ops = build_emulation("lightning_peft_cuda_emu")
    with kernel_debug_options(ops, poison=True):
        yield ops


def make_case(n, k, d, r, dtype, seed):
    """Random inputs (never zeros), each followed in memory by NaN guards."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(d, k, generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(d, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(dtype)
    bb = (torch.randn(d, r, generator=g) / math.sqrt(r)).to(dtype)
    return tuple(nan_guarded(t) for t in (x, w, b, a, bb))


def check_op_pair(op, x, w, b, a, bb, seed, p, need_x=True, context="", scale=None):
    """Forward and backward of the emulated ops vs fp64 and plain eager with the same mask
    (with ``scale``: ``scale ⊙ (x Wᵀ + lora) + b``)."""
    dtype, (n, k) = x.dtype, x.shape
    rng = torch.tensor([seed, 9], dtype=torch.int64)
    y, hidden, mask = op.lora_forward(x, w, b, a, bb, rng, 1.5, p, True, scale)
    if p > 0:
        assert torch.equal(mask, philox_mask_reference(seed, 9, n, k, p)), f"mask bits {context}"
        keep = unpack_mask(mask, k)
    else:
        assert mask.numel() == 0, context
        keep = None
    ref_in = [t.double().requires_grad_(True) for t in (x, a, bb)]
    eager_in = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    if scale is None:
        y_ref = lora_eager(ref_in[0], None if w is None else w.double(), None if b is None else b.double(), ref_in[1], ref_in[2], 1.5, keep, p)
        y_eager = lora_eager(eager_in[0], w, b, eager_in[1], eager_in[2], 1.5, keep, p)
    else:
        y_ref = lora_eager(ref_in[0], None if w is None else w.double(), None, ref_in[1], ref_in[2], 1.5, keep, p) * scale.double()
        y_ref = y_ref if b is None else y_ref + b.double()
        y_eager = lora_eager(eager_in[0], w, None, eager_in[1], eager_in[2], 1.5, keep, p) * scale
        y_eager = y_eager if b is None else y_eager + b
    assert_flash_rule("y", y, y_eager, y_ref, dtype, context)
    assert_flash_rule("lora_hidden", hidden, hidden_eager(x, a, keep, p), hidden_eager(x.double(), a.double(), keep, p), dtype, context)

    grad_y = nan_guarded(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype))
    grad_x, grad_a, grad_b = op.lora_backward(grad_y, x, w, a, bb, nan_guarded(hidden), nan_guarded(mask), 1.5, p, need_x, scale)
    g_ref = torch.autograd.grad(y_ref, ref_in, grad_y.double())
    g_eager = torch.autograd.grad(y_eager, eager_in, grad_y)
    if need_x:
        assert_flash_rule("grad_x", grad_x, g_eager[0], g_ref[0], dtype, context)
    else:
        assert grad_x.numel() == 0, context
    assert_flash_rule("grad_a", grad_a, g_eager[1], g_ref[1], dtype, context)
    assert_flash_rule("grad_b", grad_b, g_eager[2], g_ref[2], dtype, context)


# (N, K, D, r): partial tiles in both directions, K % 8 != 0 (scalar loads), every rank bucket.
SHAPES = [(70, 37, 24, 5), (130, 136, 40, 17), (3, 8, 8, 1), (65, 200, 72, 100), (129, 64, 33, 64), (200, 264, 16, 32)]


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_kernels_match_fp64(emu, dtype, shape, plan):
    seed = fresh_seed()
    case = make_case(*shape, dtype, seed)
    # every thread order and block order comes up across the grid of cases (cheaper than all of them for each)
    schedule = [seed % 3, (seed // 3) % 3, seed % 1000]
    with kernel_debug_options(emu, schedule=schedule, **PLANS[plan]):
        check_op_pair(emu, *case, seed, 0.3, context=f"(seed={seed}, {dtype}, {shape}, plan={plan}, schedule={schedule})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_no_dropout_path_and_no_grad_x(emu, dtype):
    seed = fresh_seed()
    case = make_case(70, 37, 24, 5, dtype, seed)
    check_op_pair(emu, *case, seed, 0.0, context=f"(seed={seed}, p=0)")
    check_op_pair(emu, *case, seed, 0.3, need_x=False, context=f"(seed={seed}, no grad_x)")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_without_base_weight(emu, dtype, p):
    """weight=None: the host code skips both base GEMMs; y and grad_x are the LoRA branch's alone."""
    seed = fresh_seed()
    x, _, b, a, bb = make_case(70, 37, 24, 5, dtype, seed)
    check_op_pair(emu, x, None, b, a, bb, seed, p, context=f"(seed={seed}, weight=None, p={p})")
    check_op_pair(emu, x, None, None, a, bb, seed, p, need_x=False, context=f"(seed={seed}, weight=None, no bias)")


@pytest.mark.parametrize("n", [70, 20], ids=["scale_folded", "scale_on_output"])  # K = 37: folded when K <= N
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_with_scale(emu, dtype, n):
    """DoRA's per-output scale: folded into W's and B's rows, or applied to the output / its gradient."""
    seed = fresh_seed()
    x, w, b, a, bb = make_case(n, 37, 24, 5, dtype, seed)
    scale = nan_guarded((torch.rand(24, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype))
    for weight, bias in ((w, b), (None, None)):
        for p in (0.0, 0.3):
            check_op_pair(emu, x, weight, bias, a, bb, seed, p, context=f"(seed={seed}, scale, p={p}, weight={weight is not None})", scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_strided_rows_read_in_place(emu, dtype):
    """x as a row-strided view (ld = K + 24, 128-bit loads) and with an odd row stride (scalar loads);
    the padding between rows is NaN, so reading it shows."""
    seed = fresh_seed()
    for k, pad in ((64, 24), (40, 3)):
        x, w, b, a, bb = make_case(67, k, 20, 9, dtype, seed)
        wide = nan_guarded(torch.full((67, k + pad), float("nan")).to(dtype))
        wide[:, :k] = x
        view = wide[:, :k]
        assert view.stride(0) == k + pad
        with kernel_debug_options(emu, splits=1):
            check_op_pair(emu, view, w, b, a, bb, seed, 0.25, context=f"(seed={seed}, k={k}, row stride={k + pad})")


def test_emulated_empty_batch(emu):
    x, w, b, a, bb = make_case(1, 24, 8, 4, torch.bfloat16, 0)
    x = x[:0]
    rng = torch.tensor([1, 2], dtype=torch.int64)
    y, hidden, mask = emu.lora_forward(x, w, b, a, bb, rng, 1.0, 0.5, True)
    assert y.shape == (0, 8) and hidden.shape == (0, 4) and mask.shape == (0, 3)
    grad_x, grad_a, grad_b = emu.lora_backward(y, x, w, a, bb, hidden, mask, 1.0, 0.5, True)
    assert grad_x.shape == (0, 24)
    assert torch.equal(grad_a, torch.zeros_like(grad_a)) and torch.equal(grad_b, torch.zeros_like(grad_b))


def test_emulated_bias_device_and_dtype_errors_are_ours(emu):
    x, w, b, a, bb = make_case(5, 16, 8, 4, torch.float32, 0)
    rng = torch.tensor([1, 2], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="dtype mismatch: x is Float but bias is Double"):
        emu.lora_forward(x, w, b.double(), a, bb, rng, 1.0, 0.5, True)
    with pytest.raises(RuntimeError, match=r"bias must be \[D\]"):
        emu.lora_forward(x, w, b[:3], a, bb, rng, 1.0, 0.5, True)


# A shape where every plan gives each forward block several 64-column chunks (H200-like: 100 row
# tiles x 2 splits of 4 chunks) and the one-split plan every backward block several row tiles.
MUTANT_SHAPE = (6400, 512, 24, 16)
MUTATIONS = {  # name: (file in csrc/, text, replacement)
    "no_forward_barrier": ("dropout_hidden.cu", "    acc.tile(xs, as, LDX);\n    __syncthreads();\n", "    acc.tile(xs, as, LDX);\n"),
    "unaligned_smem_rows": ("tile_common.cuh", "return cols + 16 / static_cast<int>(sizeof(raw_t));", "return cols + 1;"),
}


def build_mutant(tmp_path_factory, name: str):
    """csrc/ with one mutation, built against the emulation as its own library."""
    file, text, replacement = MUTATIONS[name]
    copy = os.path.join(str(tmp_path_factory.mktemp(name)), "csrc")
    shutil.copytree(CSRC, copy)
    path = os.path.join(copy, file)
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    assert source.count(text) == 1, f"{file} changed: update the {name} mutation"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(source.replace(text, replacement))
    return build_emulation(f"lightning_peft_cuda_emu_{name}", copy)


@pytest.mark.slow
@pytest.mark.parametrize("plan", list(PLANS))
def test_missing_forward_barrier_fails_under_every_plan(emu, tmp_path_factory, plan):
    """The emulation must catch a real race: the same case passes with csrc/ and fails with a build
    whose forward loop lacks its closing barrier (the next chunk overwrites the tile being read)."""
    mutant = build_mutant(tmp_path_factory, "no_forward_barrier")
    seed = fresh_seed()
    case = make_case(*MUTANT_SHAPE, torch.bfloat16, seed)
    context = f"(seed={seed}, plan={plan})"
    with kernel_debug_options(emu, **PLANS[plan]):
        check_op_pair(emu, *case, seed, 0.1, need_x=False, context=context)
    with kernel_debug_options(mutant, poison=True, **PLANS[plan]):
        with pytest.raises(AssertionError, match="error vs fp64"):
            check_op_pair(mutant, *case, seed, 0.1, need_x=False, context=context)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_shared_memory_rows_are_reported(tmp_path_factory, dtype):
    """Shared-memory rows padded by one element break the 16-byte alignment of vector stores and
    WMMA's leading dimension: the emulation reports it instead of computing a plausible result."""
    mutant = build_mutant(tmp_path_factory, "unaligned_smem_rows")
    x, w, b, a, bb = make_case(70, 64, 24, 5, dtype, 0)
    with pytest.raises(RuntimeError, match="CUDA emulation: (vector store: pointer not 16-byte aligned|wmma::load_matrix_sync)"):
        mutant.lora_forward(x, w, b, a, bb, torch.tensor([1, 2], dtype=torch.int64), 1.0, 0.1, True)

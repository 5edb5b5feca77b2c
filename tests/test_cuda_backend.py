"""The CUDA dispatch and loader (lightning_peft/ops/cuda_backend.py).

The registration and switch tests run everywhere (they need no GPU); those that run kernels
skip with reason "needs CUDA" on machines without one.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from lightning_peft.ops import cuda_backend, kernel_loader, lora_linear
from lightning_peft.ops.lora_linear import backward_pytorch, forward_pytorch
from test_cuda_reference import assert_flash_rule, fresh_seed, lora_eager

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
OP_FWD = torch.ops.lightning_peft.lora_linear_forward.default
OP_BWD = torch.ops.lightning_peft.lora_linear_backward.default
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("op", ["lora_linear_forward", "lora_linear_backward"])
def test_both_ops_have_a_cuda_kernel_and_keep_the_default_for_other_devices(op):
    qualname = f"lightning_peft::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")


def test_sources_are_found_for_the_jit_build():
    names = {os.path.basename(p) for p in cuda_backend.source_files()}
    assert {"lora_ops.cpp", "dropout_hidden.cu", "dropout_grad.cu", "reduce_splits.cu"} <= names


def test_force_fallback_context_restores_the_previous_setting():
    before = cuda_backend.status()["force_fallback"]
    with cuda_backend.force_fallback():
        assert cuda_backend.status()["force_fallback"] is True
        with cuda_backend.force_fallback(False):
            assert cuda_backend.status()["force_fallback"] is False
        assert cuda_backend.status()["force_fallback"] is True
    assert cuda_backend.status()["force_fallback"] is before


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def test_env_var_forces_the_fallback():
    code = "from lightning_peft.ops import cuda_backend as c; print(c.status()['force_fallback'], c.is_available())"
    out = _python(code, LIGHTNING_PEFT_FORCE_FALLBACK="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_failed_load_warns_once_and_reports_why():
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "from lightning_peft.ops import cuda_backend as c\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    first, second = c.load(), c.load()\n"
        "print(first, second, sum('CUDA kernels unavailable' in str(w.message) for w in seen))\n"
        "print(c.status()['reason'])\n"
    )
    # With LIGHTNING_PEFT_NO_JIT the loader may only use a prebuilt library; without one it must say why, once.
    out = _python(code, LIGHTNING_PEFT_NO_JIT="1")
    assert out.returncode == 0, out.stderr
    first_line, reason = out.stdout.strip().splitlines()[:2]
    if first_line.startswith("True"):  # a prebuilt lightning_peft._C exists and loaded: nothing to warn
        assert first_line == "True True 0"
    else:
        assert first_line == "False False 1", out.stdout
        assert reason, "the reason must be kept for status()"


def test_stale_jit_lock_is_detected_and_reported(tmp_path, monkeypatch):
    """With a torch that waits while the lock file exists, a lock left by a killed build is
    reported with its path instead of being waited on forever; a fresh one (a build in progress)
    is not. With a torch holding an OS-level lock, a leftover file is never stale."""
    from torch.utils import cpp_extension

    lock = tmp_path / "lock"
    lock.write_text("")
    old = os.path.getmtime(lock) - 3600
    monkeypatch.setattr(kernel_loader, "_lock_file_blocks", lambda: False)
    os.utime(lock, (old, old))
    assert cuda_backend.stale_jit_lock(str(tmp_path), stale_after_s=600) is None
    monkeypatch.setattr(kernel_loader, "_lock_file_blocks", lambda: True)
    assert cuda_backend.stale_jit_lock(str(tmp_path), stale_after_s=600) == str(lock)
    lock.write_text("")  # touched now: a build in progress
    assert cuda_backend.stale_jit_lock(str(tmp_path), stale_after_s=600) is None
    os.utime(lock, (old, old))
    if torch.version.cuda is None:
        pytest.skip("jit_build refuses a CPU-only torch before it looks at the lock")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME or "/usr/local/cuda")
    with pytest.raises(RuntimeError, match=r"stale JIT build lock .*lock.*delete it"):
        cuda_backend.jit_build(str(tmp_path))


# ------------------------------------------------------------------------------ with a GPU


def _case(dtype=torch.bfloat16, n=96, k=72, d=40, r=8, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(d, k, device="cuda", generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(d, device="cuda", generator=g).to(dtype)
    a = (torch.randn(r, k, device="cuda", generator=g) / math.sqrt(k)).to(dtype)
    bb = torch.randn(d, r, device="cuda", generator=g).to(dtype)
    rng = torch.tensor([seed, 1], dtype=torch.int64, device="cuda")
    return x, w, b, a, bb, rng


@needs_cuda
def test_forced_fallback_runs_the_pytorch_implementation_on_cuda():
    assert cuda_backend.load(), cuda_backend.status()
    x, w, b, a, bb, rng = _case(seed=fresh_seed())
    with cuda_backend.force_fallback():
        y, hidden, mask = OP_FWD(x, w, b, a, bb, rng, 0.5, 0.2, True)
    y_ref, hidden_ref, mask_ref = forward_pytorch(x, w, b, a, bb, rng, 0.5, 0.2, True)
    assert torch.equal(mask, mask_ref) and torch.equal(hidden, hidden_ref) and torch.equal(y, y_ref)


@needs_cuda
@pytest.mark.parametrize("forward_fallback", [True, False])
def test_masks_are_interchangeable_between_backends(forward_fallback):
    """Shared bit layout: a forward on one backend and the backward on the other agree with fp64."""
    assert cuda_backend.load(), cuda_backend.status()
    x, w, b, a, bb, rng = _case(dtype=torch.float32, seed=fresh_seed())
    with cuda_backend.force_fallback(forward_fallback):
        y, hidden, mask = OP_FWD(x, w, b, a, bb, rng, 0.5, 0.3, True)
    grad_y = torch.randn_like(y)
    with cuda_backend.force_fallback(not forward_fallback):
        grads = OP_BWD(grad_y, x, w, a, bb, hidden, mask, 0.5, 0.3, True)
    expected = backward_pytorch(grad_y.double(), x.double(), w.double(), a.double(), bb.double(), hidden.double(), mask, 0.5, 0.3, True)
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_bf16_autocast_through_the_lora_layer():
    """bf16-mixed: fp32 parameters, bf16 compute, fp32 grads for the adapter; same math as peft-style eager."""
    from lightning_peft.tuners.lora import LoraLinear

    assert cuda_backend.load(), cuda_backend.status()
    seed = fresh_seed()
    torch.manual_seed(seed)
    base = torch.nn.Linear(160, 96, bias=False, device="cuda")
    layer = LoraLinear(base, r=16, scaling=2.0, dropout_p=0.1, init=False, seed=seed).cuda().train()
    x = torch.randn(4, 50, 160, device="cuda", requires_grad=True)
    saved_masks = []

    def keep_masks(t):  # the op saves its packed uint8 mask for backward: take it from there
        if t.dtype == torch.uint8 and t.dim() == 2:
            saved_masks.append(t)
        return t

    with torch.autocast("cuda", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep_masks, lambda t: t):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert len(saved_masks) == 1 and saved_masks[0].shape == (200, 20)
    mask = saved_masks[0]
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    a, bb = layer.lora_A.default.weight, layer.lora_B.default.weight
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    from lightning_peft.ops.dropout_mask import unpack_mask

    keep = unpack_mask(mask, 160)
    ref_in = [t.detach().bfloat16().double().requires_grad_(True) for t in (x, a, bb)]
    y_ref = lora_eager(ref_in[0], base.weight.bfloat16().double(), None, ref_in[1], ref_in[2], 2.0, keep, 0.1)
    g_ref = torch.autograd.grad(y_ref, ref_in, grad_y.double())
    eager_in = [t.detach().bfloat16().requires_grad_(True) for t in (x, a, bb)]
    y_eager = lora_eager(eager_in[0], base.weight.bfloat16(), None, eager_in[1], eager_in[2], 2.0, keep, 0.1)
    g_eager = torch.autograd.grad(y_eager, eager_in, grad_y)
    assert_flash_rule("y", y, y_eager, y_ref, torch.bfloat16, f"(seed={seed})")
    for name, ours, eager, ref in zip(("grad_x", "grad_a", "grad_b"), (x.grad, a.grad, bb.grad), g_eager, g_ref):
        # ours is fp32 (autocast casts the grads back); compare at bf16 precision
        assert_flash_rule(name, ours.bfloat16(), eager, ref, torch.bfloat16, f"(seed={seed})")


@needs_cuda
def test_torch_compile_fullgraph_matches_eager():
    assert cuda_backend.load(), cuda_backend.status()
    x, w, b, a, bb, rng = _case(seed=fresh_seed())

    def f(x, a, bb):
        return lora_linear(x, w, b, a, bb, scaling=0.5, dropout_p=0.2, rng=rng, training=True)

    compiled = torch.compile(f, fullgraph=True)
    leaves_c = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
    leaves_e = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
    y_c, y_e = compiled(*leaves_c), f(*leaves_e)
    assert torch.equal(y_c, y_e)
    grad_y = torch.randn_like(y_e)
    for g_c, g_e in zip(torch.autograd.grad(y_c, leaves_c, grad_y), torch.autograd.grad(y_e, leaves_e, grad_y)):
        assert torch.equal(g_c, g_e)

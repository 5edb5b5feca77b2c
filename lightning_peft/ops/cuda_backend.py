"""CUDA backend of the LoRA ops: finds (or builds) the compiled kernels and routes CUDA tensors to them.

This is the only module of the package that knows about the CUDA extension. It registers a
``"cuda"`` kernel for ``lightning_peft::lora_linear_forward`` / ``lora_linear_backward`` (the
schemas, fake impls and autograd stay in :mod:`lightning_peft.ops.lora_linear`). For each call:

1. if the fallback is forced (``LIGHTNING_PEFT_FORCE_FALLBACK=1`` or :func:`set_force_fallback`),
   or the inputs are outside what the kernels cover (dtype not fp32/fp16/bf16, rank > 128),
   the pure-PyTorch implementation runs;
2. otherwise the kernels are loaded once: the ahead-of-time build ``lightning_peft._C`` (made by
   ``pip install`` where a CUDA toolkit was found), else a just-in-time build of ``csrc/`` with
   ninja (cached under the torch extensions directory; a message says it is compiling), else one
   warning and the fallback from then on.

Why a Python kernel calling private ops (``torch.ops.lightning_peft_cuda.*``) rather than C++
registering ``TORCH_LIBRARY_IMPL(lightning_peft, CUDA)`` directly: a C++ CUDA kernel would also
take precedence over the Python default (custom_op registers that as CompositeExplicitAutograd),
but then nothing would run at first use to JIT-compile, and the fallback could not be forced at
run time. The cost is one Python call per op, which the custom op pays anyway.

Environment:
    ``LIGHTNING_PEFT_FORCE_FALLBACK=1``: never use the kernels.
    ``LIGHTNING_PEFT_NO_JIT=1``: do not compile at first use (use the fallback if no build exists).
    ``LIGHTNING_PEFT_JIT_STALE_S`` (default 600): a JIT lock file with nothing in its build
    directory modified for this long is reported as stale (a build killed mid-way leaves it
    behind, and torch would wait on it forever) instead of being waited on.

Test-only switches of the kernels (poisoned outputs, a forced split plan) are a private op,
``torch.ops.lightning_peft_cuda.set_debug_options``; tests/test_cuda_reference.py wraps it.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from typing import Optional

import torch
from torch import Tensor

from lightning_peft.ops.kernel_loader import (
    ENV_FORCE_FALLBACK,
    ENV_JIT_STALE_S,
    ENV_NO_JIT,
    KernelLoader,
    env_true,
    jit_load,
    ops_registered,
    stale_jit_lock,
)
from lightning_peft.ops.lora_linear import (
    backward_pytorch,
    forward_pytorch,
    lora_linear_backward,
    lora_linear_forward,
)

__all__ = [
    "ENV_FORCE_FALLBACK",
    "ENV_JIT_STALE_S",
    "ENV_NO_JIT",
    "MAX_RANK",
    "force_fallback",
    "is_available",
    "jit_build",
    "load",
    "set_force_fallback",
    "source_files",
    "stale_jit_lock",
    "status",
]

MAX_RANK = 128  # the kernels keep up to 128 rank columns per tile (csrc/tile_common.cuh)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_JIT_NAME = "lightning_peft_cuda_jit"


def _try_load(verbose: bool) -> tuple[bool, Optional[str], str]:
    return _try_load_cuda(verbose)  # defined below, with the build code it calls


_state = KernelLoader("CUDA kernels", "on CUDA", "lightning_peft.ops.cuda_backend.status()", _try_load)
set_force_fallback = _state.set_force_fallback  # route CUDA tensors to the PyTorch implementation, or back
force_fallback = _state.forcing_fallback  # context manager form; restores the previous setting on exit
status = _state.status  # loader state without triggering a load
load = _state.load  # load the kernels once (prebuilt, else JIT-compiled); True if usable; never raises


def source_files() -> list[str]:
    """The CUDA/C++ sources of the extension (``csrc/`` beside the package; empty if not shipped)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith((".cpp", ".cu")))


def jit_build(build_directory: Optional[str] = None, verbose: bool = False) -> str:
    """Compile ``csrc/`` with ninja and load it (registers ``torch.ops.lightning_peft_cuda``).

    Args:
        build_directory: where to build; default: torch's extensions cache (reused across runs).
        verbose: show the compiler command lines.

    Returns:
        The build directory (torch's cache directory when ``build_directory`` is None).

    Raises:
        RuntimeError: no sources, torch without CUDA, or the compiler failed.
    """
    from torch.utils import cpp_extension

    from lightning_peft_build import extension_kwargs

    sources = source_files()
    if not sources:
        raise RuntimeError("the CUDA sources (csrc/) are not shipped with this installation")
    if torch.version.cuda is None:
        raise RuntimeError("this torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME)")
    kwargs = extension_kwargs()
    return jit_load(
        _JIT_NAME, sources, build_directory, verbose, extra_cflags=kwargs["extra_compile_args"]["cxx"],
        extra_cuda_cflags=kwargs["extra_compile_args"]["nvcc"], extra_include_paths=kwargs["include_dirs"],
    )


def _ops_registered() -> bool:
    return ops_registered("lightning_peft_cuda", "lora_forward")


def _try_load_cuda(verbose: bool) -> tuple[bool, Optional[str], str]:
    if torch.version.cuda is None:
        return False, None, "torch is a CPU-only build"
    if _ops_registered():  # loaded by someone else in this process (e.g. a test's jit_build)
        return True, "preloaded", "ok"
    try:
        importlib.import_module("lightning_peft._C")
        if _ops_registered():
            return True, "prebuilt", "ok"
        prebuilt_error = "lightning_peft._C has no lightning_peft_cuda ops"
    except ImportError as exc:  # not built, or built against another torch
        prebuilt_error = f"lightning_peft._C: {exc}"
    if env_true(ENV_NO_JIT):
        return False, None, f"{prebuilt_error}; {ENV_NO_JIT} is set"
    if not source_files():
        return False, None, f"{prebuilt_error}; no csrc/ sources to compile"
    print(
        "lightning_peft: compiling the CUDA kernels for this GPU (first use only; takes a few minutes, "
        "then cached in the torch extensions directory) ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    jit_build(verbose=verbose)
    print(f"lightning_peft: CUDA kernels compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if not _ops_registered():
        return False, None, "the JIT build loaded but registered no ops"
    return True, "jit", "ok"


def is_available() -> bool:
    """True if CUDA tensors will use the kernels (loads or compiles them on first call)."""
    return not _state.force_fallback and torch.cuda.is_available() and load()


def _kernels_cover(x: Tensor, lora_a: Tensor) -> bool:
    """Whether this call can take the kernels (else the PyTorch implementation runs)."""
    if _state.force_fallback or x.dtype not in _KERNEL_DTYPES:
        return False
    if not 1 <= lora_a.shape[0] <= MAX_RANK:
        return False
    return load()


def _disable_after(exc: RuntimeError) -> bool:
    """A build without code for this GPU: warn once, then use the fallback for the rest of the run."""
    if "no kernel image is available" not in str(exc):
        return False
    _state.disable(f"built for other GPU architectures: {exc}")
    warnings.warn(
        "lightning_peft: the CUDA kernels were not built for this GPU (set TORCH_CUDA_ARCH_LIST and reinstall); "
        "using the PyTorch implementation",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


@lora_linear_forward.register_kernel("cuda")
def _forward_cuda(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    rng: Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if _kernels_cover(x, lora_a):
        try:
            return torch.ops.lightning_peft_cuda.lora_forward(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale)
        except RuntimeError as exc:
            if not _disable_after(exc):
                raise
    return forward_pytorch(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale)


@lora_linear_backward.register_kernel("cuda")
def _backward_cuda(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    lora_hidden: Tensor,
    mask: Tensor,
    scaling: float,
    dropout_p: float,
    compute_grad_x: bool,
    scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    # The mask layout is shared with the PyTorch path, so either backward accepts either forward's mask.
    if _kernels_cover(x, lora_a):
        try:
            return torch.ops.lightning_peft_cuda.lora_backward(
                grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x, scale
            )
        except RuntimeError as exc:
            if not _disable_after(exc):
                raise
    return backward_pytorch(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x, scale)

"""CPU backend of the LoRA op: the fused row kernels of csrc/cpu/lora_rows.cpp, compiled on first use.

Registers a ``"cpu"`` kernel for ``lightning_peft::lora_linear_forward`` / ``lora_linear_backward``
(schemas, fake impls and autograd stay in :mod:`lightning_peft.ops.lora_linear`). The base GEMMs
stay with ATen; what LoRA adds (dropout, ``x Aᵀ``, the ``h Bᵀ`` update of y, and in backward
``g B``, ``hᵀ g``, ``d_hᵀ x`` and the masked ``d_h A`` update of grad_x) is one pass over the rows
each way, with the dropout mask drawn from its key inside the pass instead of stored
(``dropout_mask.hashed_keep_mask``). The pure-PyTorch implementation runs when:

* the fallback is forced (``LIGHTNING_PEFT_FORCE_FALLBACK=1`` or :func:`set_force_fallback`),
* the dtype is not float32 / float64 (bf16 / fp16 on CPU), or the tensors' dtypes differ,
* backward gets a mask the kernels did not draw (a forward that ran in the fallback),
* the kernels cannot be compiled (no C++ compiler; one warning says why).

Compiling takes ~30 s on 2 cores, once per machine and torch version (cached in the torch
extensions directory, like the CUDA JIT build); ``LIGHTNING_PEFT_NO_JIT=1`` skips it. The build
targets the CPU it runs on (``-march=native`` on x86-64), which is why it is not prebuilt.

Measured (`python benchmarks/bench_cpu_lora.py --rounds 4`, 2 threads, AMD EPYC; benchmarks/README.md):
the all-linear r=8 p=0.1 training step of the benchmark's 4-layer Llama takes 1.05x the frozen
floor with the kernels against 1.10-1.13x on the PyTorch path (0.78x against 0.81-0.82x peft's step).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from typing import Optional

import torch
from torch import Tensor

from lightning_peft.ops.dropout_mask import decode_hash_key, encode_hash_key, is_hash_key
from lightning_peft.ops.kernel_loader import ENV_NO_JIT, KernelLoader, env_true, jit_load, ops_registered
from lightning_peft.ops.lora_linear import (
    _check_inputs,
    _check_scale,
    _dropout_active,
    _fold_scale_backward,
    _fold_scale_forward,
    _out_features,
    backward_pytorch,
    forward_pytorch,
    lora_linear_backward,
    lora_linear_forward,
)

__all__ = [
    "base_grad_x",
    "base_output",
    "draws_hashed_masks",
    "force_fallback",
    "hashed_keep_mask",
    "is_available",
    "jit_build",
    "kernels_cover",
    "load",
    "rng_key",
    "set_force_fallback",
    "source_file",
    "status",
]

_KERNEL_DTYPES = (torch.float32, torch.float64)
MAX_RANK = 64  # csrc/cpu/lora_rows.cpp instantiates ranks 4, 8, 16, 32, 64 (smaller ones are zero-padded)
_JIT_NAME = "lightning_peft_cpu_jit"


def source_file() -> Optional[str]:
    """``csrc/cpu/lora_rows.cpp`` beside the package, or None if it is not shipped."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "csrc", "cpu", "lora_rows.cpp")
    return path if os.path.isfile(path) else None


def _compile_flags() -> list[str]:
    # -fopenmp: at::parallel_for runs on OpenMP threads (torch's own libgomp); without it, one thread.
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")  # built where it runs: AVX-512 / AVX2 for the hash and the row loops
    return flags


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning: these
    kernels need no CUDA."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def jit_build(build_directory: Optional[str] = None, verbose: bool = False) -> str:
    """Compile ``csrc/cpu/lora_rows.cpp`` with ninja and load it (registers ``torch.ops.lightning_peft_cpu``).

    Returns:
        The build directory (torch's extensions cache when ``build_directory`` is None).

    Raises:
        RuntimeError: the source is not shipped, or the compiler failed.
    """
    source = source_file()
    if source is None:
        raise RuntimeError("the CPU kernel source (csrc/cpu/lora_rows.cpp) is not shipped with this installation")
    _cpp_extension()  # imported once without its CUDA warning
    return jit_load(_JIT_NAME, [source], build_directory, verbose, extra_cflags=_compile_flags(), extra_ldflags=["-fopenmp"])


def _ops_registered() -> bool:
    return ops_registered("lightning_peft_cpu", "lora_rows_forward")


def _try_load(verbose: bool) -> tuple[bool, Optional[str], str]:
    if _ops_registered():  # built by someone else in this process (e.g. .ci's prebuild step)
        return True, "preloaded", "ok"
    if source_file() is None:
        return False, None, "csrc/cpu/lora_rows.cpp is not shipped with this installation"
    directory = _cpp_extension()._get_build_directory(_JIT_NAME, verbose=False)
    cached = os.path.exists(os.path.join(directory, f"{_JIT_NAME}.so"))
    if env_true(ENV_NO_JIT) and not cached:
        return False, None, f"{ENV_NO_JIT} is set and no build is cached in {directory}"
    if not cached:
        print("lightning_peft: compiling the CPU kernels (first use only, ~30 s; cached afterwards) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    jit_build(verbose=verbose)
    if not cached:
        print(f"lightning_peft: CPU kernels compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if not _ops_registered():
        return False, None, "the JIT build loaded but registered no ops"
    return True, "jit", "ok"


_state = KernelLoader("CPU kernels", "on the CPU", "lightning_peft.ops.cpu_backend.status()", _try_load)
set_force_fallback = _state.set_force_fallback  # route CPU tensors to the PyTorch implementation, or back
force_fallback = _state.forcing_fallback  # context manager form; restores the previous setting on exit
status = _state.status  # loader state without triggering a load
load = _state.load  # load (compiling on first use) once; True if usable; never raises


def is_available() -> bool:
    """True if CPU tensors will use the kernels (loads or compiles them on first call)."""
    return not _state.force_fallback and load()


def kernels_cover(x: Tensor, lora_a: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether this call can take the kernels: fp32 / fp64, one dtype throughout, rank <= MAX_RANK, not forced off."""
    if _state.force_fallback or x.dtype not in _KERNEL_DTYPES or not 1 <= lora_a.shape[0] <= MAX_RANK:
        return False
    if any(t is not None and t.dtype != x.dtype for t in others):
        return False
    return load()


def draws_hashed_masks(x: Tensor, lora_a: Tensor) -> bool:
    """Whether the LoRA op's forward on ``x`` with ``lora_a`` runs these kernels and so draws the hashed
    dropout mask (the grouped op draws the same for each adapter's sub-batch)."""
    return x.device.type == "cpu" and kernels_cover(x, lora_a)


def hashed_keep_mask(rng: Tensor, rows: int, cols: int, dropout_p: float) -> Tensor:
    """The kernels' keep mask ``bool [rows, cols]`` for key ``rng`` (``dropout_mask.hashed_keep_mask``, compiled)."""
    seed, offset = rng_key(rng)
    return torch.ops.lightning_peft_cpu.lora_rows_keep_mask(seed, offset, rows, cols, dropout_p)


def base_output(x2: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], d: int) -> Tensor:
    """``x2 Wᵀ + b`` ``[N, D]`` (terms that are None left out), a fresh tensor the kernels add LoRA terms to in place."""
    n = x2.shape[0]
    if weight is not None:
        return torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    return bias.expand(n, d).clone() if bias is not None else x2.new_zeros((n, d))


def base_grad_x(g2: Tensor, weight: Optional[Tensor], k: int, compute_grad_x: bool) -> Tensor:
    """``g2 W`` ``[N, K]`` (zeros without a base weight), a fresh tensor the kernels add LoRA parts to
    in place; ``[0]`` when no input gradient is wanted (the kernels then skip it)."""
    if not compute_grad_x:
        return g2.new_empty((0,))
    return torch.mm(g2, weight) if weight is not None else g2.new_zeros((g2.shape[0], k))


def rng_key(rng: Tensor) -> tuple[int, int]:
    """``(seed, offset)`` of an ``int64 [2]`` rng tensor, as Python ints (the kernels' arguments)."""
    seed, offset = rng.tolist()
    return int(seed), int(offset)


@lora_linear_forward.register_kernel("cpu")
def _forward_cpu(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, rng: Tensor, scaling: float,
    dropout_p: float, training: bool, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if not kernels_cover(x, lora_a, weight, bias, lora_b, scale):
        return forward_pytorch(x, weight, bias, lora_a, lora_b, rng, scaling, dropout_p, training, scale)
    _check_inputs(x, weight, lora_a, lora_b, rng, dropout_p)
    k, d = x.shape[-1], _out_features(weight, lora_b)
    _check_scale(scale, d)
    x2 = x.reshape(-1, k).contiguous()  # [N, K]
    weight, lora_b, output_scale = _fold_scale_forward(x2.shape[0], k, weight, lora_b, scale)
    y = base_output(x2, weight, bias if output_scale is None else None, d)  # the kernel adds the LoRA term in place
    dropout = _dropout_active(dropout_p, training)
    seed, offset = rng_key(rng) if dropout else (0, 0)
    hidden = torch.ops.lightning_peft_cpu.lora_rows_forward(x2, lora_a, lora_b, y, seed, offset, dropout_p if dropout else 0.0, scaling)
    if output_scale is not None:
        y = y.mul_(output_scale) if bias is None else torch.addcmul(bias, y, output_scale)
    mask = encode_hash_key(rng) if dropout else x.new_empty((0,), dtype=torch.uint8)
    return y.view(*x.shape[:-1], d), hidden, mask


@lora_linear_backward.register_kernel("cpu")
def _backward_cpu(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, lora_hidden: Tensor, mask: Tensor,
    scaling: float, dropout_p: float, compute_grad_x: bool, scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    hashed = dropout_p > 0.0 and is_hash_key(mask)
    if (dropout_p > 0.0 and not hashed) or not kernels_cover(x, lora_a, grad_y, weight, lora_b, lora_hidden, scale):
        return backward_pytorch(grad_y, x, weight, lora_a, lora_b, lora_hidden, mask, scaling, dropout_p, compute_grad_x, scale)
    n, k, d = lora_hidden.shape[0], x.shape[-1], lora_b.shape[0]
    _check_scale(scale, d)
    x2 = x.reshape(-1, k).contiguous()  # [N, K]
    g2, weight, lora_b, b_scale = _fold_scale_backward(n, k, grad_y.reshape(-1, d).contiguous(), weight, lora_b, scale)
    grad_x = base_grad_x(g2, weight, k, compute_grad_x)  # the kernel adds the LoRA part in place
    seed, offset = decode_hash_key(mask) if hashed else (0, 0)
    grad_a, grad_b = torch.ops.lightning_peft_cpu.lora_rows_backward(
        g2, x2, lora_a, lora_b, lora_hidden.contiguous(), grad_x, seed, offset, dropout_p if hashed else 0.0, scaling
    )
    if b_scale is not None:
        grad_b = grad_b.mul_(b_scale.unsqueeze(1))
    return (grad_x.view(x.shape) if compute_grad_x else grad_x), grad_a, grad_b

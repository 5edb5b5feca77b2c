"""Compiler flags for the CUDA extension, shared by setup.py (ahead of time) and the JIT loader."""

from __future__ import annotations

import os


def extension_kwargs() -> dict:
    """Extra keyword arguments for ``CUDAExtension`` / ``torch.utils.cpp_extension.load``.

    ``LIGHTNING_PEFT_PTXAS_VERBOSE=1`` adds ``-Xptxas -v`` (registers, shared memory and spills of
    every kernel in the build log).
    """
    include_dirs = []
    try:  # cuBLAS/cuSPARSE headers of the torch CUDA wheel (needed by ATen/cuda/CUDAContext.h)
        import nvidia  # type: ignore

        for root in list(getattr(nvidia, "__path__", [])):
            for sub in ("cu13", "cu12"):
                inc = os.path.join(root, sub, "include")
                if os.path.isdir(inc):
                    include_dirs.append(inc)
    except ImportError:
        pass
    # No -std flag: torch adds the standard its headers need (C++20 since 2.10, C++17 before).
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--threads=0"]  # --threads: archs in parallel
    if os.environ.get("LIGHTNING_PEFT_PTXAS_VERBOSE", "") == "1":
        nvcc.append("-Xptxas=-v")
    return {
        "include_dirs": include_dirs,
        "extra_compile_args": {"cxx": ["-O3"], "nvcc": nvcc},
    }

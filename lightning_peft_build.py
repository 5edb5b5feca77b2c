"""Compiler flags for the CUDA extension, shared by setup.py (ahead of time) and the JIT loader."""

from __future__ import annotations

import os


def extension_kwargs() -> dict:
    """Extra keyword arguments for ``CUDAExtension`` / ``torch.utils.cpp_extension.load``."""
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
    return {
        "include_dirs": include_dirs,
        "extra_compile_args": {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    }

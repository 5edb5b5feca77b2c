"""Install lightning_peft; build the CUDA extension ``lightning_peft._C`` only where it can be built.

The extension is built when (a) torch is importable in the build environment (use
``pip install --no-build-isolation``), (b) that torch is a CUDA build, (c) a CUDA toolkit is
found (``CUDA_HOME`` or nvcc on PATH) and (d) ``csrc/`` has sources. Otherwise the package
installs without it and the pure-PyTorch path is used (CUDA users can still JIT-build it).

Switches: ``LIGHTNING_PEFT_BUILD_CUDA=1`` forces the build (fails loudly if impossible),
``LIGHTNING_PEFT_BUILD_CUDA=0`` skips it. ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0".

torch is deliberately not in install_requires: pip must never choose a torch build by itself
(multi-GB CUDA downloads). Install the torch you want first.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension_modules() -> tuple[list, dict]:
    switch = os.environ.get("LIGHTNING_PEFT_BUILD_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return [], {}
    forced = switch in ("1", "true", "yes", "on")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if forced:
            raise RuntimeError("LIGHTNING_PEFT_BUILD_CUDA=1 but torch is not importable: pip install --no-build-isolation")
        return [], {}
    reasons = []
    if not sources:
        reasons.append("csrc/ has no sources")
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    if CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if forced:
            raise RuntimeError("LIGHTNING_PEFT_BUILD_CUDA=1 but the extension cannot be built: " + "; ".join(reasons))
        print("lightning_peft: skipping the CUDA extension (" + "; ".join(reasons) + ")")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from lightning_peft_build import extension_kwargs  # noqa: E402  (csrc build flags live in one place)

    ext = CUDAExtension(name="lightning_peft._C", sources=sources, **extension_kwargs())
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
        return fh.read()


ext_modules, cmdclass = _cuda_extension_modules()

setup(
    name="lightning_peft",
    version="0.1.0",
    description="Parameter-efficient fine-tuning (LoRA, adapters, prefix/prompt tuning, BitFit) for PyTorch Lightning",
    long_description=_read_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lightning_peft", "lightning_peft.*"]),
    py_modules=["lightning_peft_build"],
    python_requires=">=3.10",
    install_requires=[
        # torch: install it yourself first (see the module docstring)
        "lightning>=2.4",
        "transformers>=4.45",
        "torchmetrics>=1.0",
        "safetensors>=0.4",
        "ninja",
        "jsonargparse[signatures]>=4.27",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "peft>=0.13"]},
    entry_points={"console_scripts": ["lightning-peft=lightning_peft.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

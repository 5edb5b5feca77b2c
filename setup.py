"""Install lightning_peft; build the CUDA extension ``lightning_peft._C`` only where it can be built.

``LIGHTNING_PEFT_BUILD_CUDA`` (default ``auto``):

* ``auto``: build the extension when torch is importable in the build environment (use
  ``pip install --no-build-isolation``), is a CUDA build, a CUDA toolkit with headers is found
  (``CUDA_HOME``, else torch's guess from ``nvcc`` on PATH) and ``csrc/`` has sources. When any
  of that is missing, or the compile fails, the package installs without the extension (the
  pure-PyTorch ops run; CUDA users can still JIT-build it) and one message says why and how to
  fix it (``pip install -v`` shows it).
* ``1``: build it or fail loudly. ``0``: never build it.

``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0". torch is deliberately not in install_requires:
pip must never choose a torch build by itself (multi-GB CUDA downloads). Install the torch you
want first.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SWITCH = os.environ.get("LIGHTNING_PEFT_BUILD_CUDA", "auto").strip().lower()
FORCED = SWITCH in ("1", "true", "yes", "on")


def _fix_hint(cuda_home: str | None) -> str:
    """How to fix a failed or impossible build, naming an installed toolkit when one is found."""
    found = sorted(glob.glob("/usr/local/cuda*/include/cuda_runtime.h"))
    example = os.path.realpath(os.path.dirname(os.path.dirname(found[-1]))) if found else "/usr/local/cuda"
    guessed = f"torch used CUDA_HOME={cuda_home}" + ("" if os.environ.get("CUDA_HOME") else ", guessed from nvcc on PATH")
    return (f"{guessed}. Fix: set CUDA_HOME to the CUDA toolkit directory (e.g. CUDA_HOME={example}) and reinstall, "
            "or set LIGHTNING_PEFT_BUILD_CUDA=0 to skip the extension; LIGHTNING_PEFT_BUILD_CUDA=1 makes this an error.")


def _skip(reason: str) -> tuple[list, dict]:
    """Auto mode: say once why the extension is skipped; forced mode: fail with the same words."""
    message = f"lightning_peft: the CUDA extension lightning_peft._C is not built: {reason}"
    if FORCED:
        raise RuntimeError(f"LIGHTNING_PEFT_BUILD_CUDA=1 but {message}")
    print(f"{message}\nlightning_peft: installing without it (the pure-PyTorch ops run everywhere).", file=sys.stderr)
    return [], {}


def _cuda_extension_modules() -> tuple[list, dict]:
    if SWITCH in ("0", "false", "no", "off"):
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable in the build environment (use pip install --no-build-isolation)")
    if not sources:
        return _skip("csrc/ has no sources")
    if torch.version.cuda is None:
        return _skip("torch is a CPU-only build")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found. " + _fix_hint(None))
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        # e.g. nvcc on PATH is a wrapper script outside the toolkit: torch guesses CUDA_HOME from
        # its location, and the compile would fail on a missing crt/host_defines.h.
        return _skip(f"{CUDA_HOME}/include/cuda_runtime.h does not exist; " + _fix_hint(CUDA_HOME))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from lightning_peft_build import extension_kwargs  # noqa: E402  (csrc build flags live in one place)

    class OptionalBuildExtension(BuildExtension):
        """Auto mode: a failed compile drops the extension with one message instead of failing the install."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as exc:  # compile / link errors surface as several exception types
                if FORCED:
                    raise
                last_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                self.extensions = []  # nothing to copy in place or to install
                _skip(f"the compile failed ({type(exc).__name__}: {last_line}). " + _fix_hint(CUDA_HOME))

    ext = CUDAExtension(name="lightning_peft._C", sources=sources, **extension_kwargs())
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


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
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft>=0.13"],
        "qlora": ["bitsandbytes>=0.45"],  # LoRA / DoRA on 4-bit and 8-bit quantized base models
    },
    entry_points={"console_scripts": ["lightning-peft=lightning_peft.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""setup.py's auto mode: an extension that cannot be built, or fails to compile, leaves an install
without it and one message saying why and how to fix it; LIGHTNING_PEFT_BUILD_CUDA=1 fails instead.

Each test builds a temporary copy of the repository (never the shared environment's install) with
a fake toolchain on PATH, so nothing here compiles real kernels and each build takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="the toolkit checks follow only with a CUDA build of torch")

VERSION = "Cuda compilation tools, release {cuda}, V{cuda}.0"


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _fake_nvcc(path: Path) -> Path:
    """An nvcc that reports torch's CUDA version and fails every compile, like a toolkit without headers."""
    version = VERSION.format(cuda=torch.version.cuda)
    return _executable(path, f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
                             'echo "fatal error: crt/host_defines.h: No such file or directory" >&2\nexit 1\n')


def _repo_copy(tmp_path: Path, broken_sources: bool) -> Path:
    """The files setup.py needs; ``broken_sources``: csrc/ holds one tiny .cu instead of the kernels."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("setup.py", "lightning_peft_build.py", "README.md"):
        shutil.copy(REPO / name, copy / name)
    shutil.copytree(REPO / "lightning_peft", copy / "lightning_peft", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    if broken_sources:
        (copy / "csrc").mkdir()
        (copy / "csrc" / "tiny.cu").write_text("__global__ void k() {}\n")
    else:
        shutil.copytree(REPO / "csrc", copy / "csrc")
    return copy


def _env(tmp_path: Path, cuda_home: Path | None, switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "LIGHTNING_PEFT_BUILD_CUDA", "PYTHONPATH")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # the wrapper nvcc comes first
    env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_ext")
    if cuda_home is not None:
        env["CUDA_HOME"] = str(cuda_home)
    if switch is not None:
        env["LIGHTNING_PEFT_BUILD_CUDA"] = switch
    return env


def _build_ext(copy: Path, env: dict, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(out), "--build-temp", str(out / "tmp")]
    return subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def wrapper_nvcc(tmp_path: Path) -> Path:
    """``nvcc`` on PATH is a script in a bin/ with no toolkit around it (torch guesses CUDA_HOME = its parent)."""
    return _fake_nvcc(tmp_path / "bin" / "nvcc")


def test_wrapper_nvcc_without_cuda_home_skips_the_extension_and_says_how_to_fix_it(tmp_path, wrapper_nvcc):
    result = _build_ext(_repo_copy(tmp_path, broken_sources=False), _env(tmp_path, None, None), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "out").rglob("_C*.so"))
    messages = [line for line in result.stderr.splitlines() if "lightning_peft._C is not built" in line]
    assert len(messages) == 1, result.stderr  # said once
    assert f"{tmp_path}/include/cuda_runtime.h does not exist" in messages[0]
    assert "guessed from nvcc on PATH" in messages[0] and "set CUDA_HOME" in messages[0] and "LIGHTNING_PEFT_BUILD_CUDA=0" in messages[0]


def test_wrapper_nvcc_without_cuda_home_fails_when_the_build_is_forced(tmp_path, wrapper_nvcc):
    result = _build_ext(_repo_copy(tmp_path, broken_sources=False), _env(tmp_path, None, "1"), tmp_path / "out")
    assert result.returncode != 0
    assert "LIGHTNING_PEFT_BUILD_CUDA=1 but lightning_peft: the CUDA extension" in result.stderr
    assert "cuda_runtime.h does not exist" in result.stderr


@pytest.fixture
def failing_toolkit(tmp_path: Path) -> Path:
    """A CUDA_HOME whose headers exist but whose nvcc fails every compile."""
    home = tmp_path / "toolkit"
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime.h").write_text("")
    _fake_nvcc(home / "bin" / "nvcc")
    return home


def test_failed_compile_installs_without_the_extension_and_says_why(tmp_path, failing_toolkit):
    """The whole install path: ``pip wheel`` of the copy builds a wheel without ``_C`` and prints the reason once."""
    copy = _repo_copy(tmp_path, broken_sources=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "wheels"), str(copy)]
    result = subprocess.run(cmd, env=_env(tmp_path, failing_toolkit, None), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("lightning_peft._C is not built: the compile failed") == 1, output[-3000:]
    assert "set CUDA_HOME" in output
    (wheel,) = (tmp_path / "wheels").glob("lightning_peft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_peft/ops/lora_linear.py" in names
    assert not [n for n in names if n.startswith("lightning_peft/_C")]


def test_failed_compile_fails_when_the_build_is_forced(tmp_path, failing_toolkit):
    copy = _repo_copy(tmp_path, broken_sources=True)
    result = _build_ext(copy, _env(tmp_path, failing_toolkit, "1"), tmp_path / "out")
    assert result.returncode != 0
    assert "lightning_peft._C is not built" not in result.stderr  # the compiler's own error, not the auto-mode note
    assert "host_defines.h" in result.stdout + result.stderr

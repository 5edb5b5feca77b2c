"""The grouped LoRA kernels' own code (csrc/lora_grouped.cu + lora_grouped_ops.cpp), run on the CPU.

csrc/emulation/emulated_grouped.cpp compiles them with the host compiler against
csrc/emulation/cuda_emulation.h (threads as fibers, an adversarial barrier schedule, shared
memory starting as garbage: see tests/test_cuda_emulation.py) and registers
``torch.ops.lightning_peft_grouped_emu.*`` for CPU tensors. The checks are the GPU tests' own
(tests/test_cuda_lora_grouped.py::check_grouped_kernels): masks bit for bit and the sort, outputs
and gradients within flash-attention's rule of the PyTorch implementation vs fp64. What the
emulation cannot see (timing, coalescing, races within one barrier phase) is for the GPU check.
Named outside ``tests/test_cuda_*.py``: the GPU check runs that glob within a time budget, and
this build is for machines without a GPU.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from test_cuda_emulation import CSRC, _cuda_include_dir
from test_cuda_lora_grouped import CASES, MODES, check_grouped_kernels, make_grouped_case
from test_cuda_reference import fresh_seed

NAME = "lightning_peft_grouped_emu"
SOURCES = ("lora_grouped.cu", "lora_grouped_ops.cpp", "lora_grouped.h", "philox.cuh", "tile_common.cuh", "lora_kernels.h",
           os.path.join("emulation", "cuda_emulation.h"), os.path.join("emulation", "emulated_grouped.cpp"))


@pytest.fixture(scope="module")
def emu():
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("needs CUDA (the toolkit headers, for the emulation build)")
    if not hasattr(torch.ops, NAME) or not hasattr(getattr(torch.ops, NAME), "lora_grouped_forward"):
        from torch.utils import cpp_extension

        digest = hashlib.sha256()
        for name in SOURCES:
            with open(os.path.join(CSRC, name), "rb") as fh:
                digest.update(fh.read())
        cpp_extension.load(
            name=NAME,
            sources=[os.path.join(CSRC, "emulation", "emulated_grouped.cpp")],
            extra_include_paths=[CSRC, include],
            # the hash makes torch rebuild whenever one of the sources changes
            extra_cflags=["-O2", "-DLIGHTNING_PEFT_EMULATE", f"-DLIGHTNING_PEFT_GROUPED_EMU_NAMESPACE={NAME}", "-Wno-attributes",
                          f"-DLIGHTNING_PEFT_SOURCES_{digest.hexdigest()[:16]}"],
            is_python_module=False,
        )
    return getattr(torch.ops, NAME)


# The smaller cases (the emulation runs every thread as a fiber), every mode, all three dtypes.
EMU_CASES = [CASES[0], CASES[1], CASES[4], CASES[5], ((3, 70), 72, 40, (17, 33, 64, 128), [3, 0, 2])]


@pytest.mark.parametrize("drop_p,training", MODES)
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_grouped_kernels_match_fp64(emu, dtype, case, drop_p, training):
    seed = fresh_seed()
    lead, k, d, ranks, index = case
    x, w, b, a_s, b_s, rngs, index = make_grouped_case(lead, k, d, ranks, index, dtype, "cpu", seed)
    check_grouped_kernels(
        emu.lora_grouped_forward, emu.lora_grouped_backward, x, w, b, a_s, b_s, rngs, index, [drop_p] * len(ranks), training,
        context=f"(seed={seed}, {dtype}, {case[:4]}, p={drop_p}, training={training})",
    )


@pytest.mark.parametrize("bias,weight,compute_grad_x", [(False, True, True), (True, False, True), (False, False, False)])
def test_emulated_optional_terms_and_mixed_dropout(emu, bias, weight, compute_grad_x):
    seed = fresh_seed()
    x, w, b, a_s, b_s, rngs, index = make_grouped_case((6, 5), 40, 24, (4, 9), [1, -1, 0, 1, 1, 0], torch.float32, "cpu", seed, bias, weight)
    check_grouped_kernels(
        emu.lora_grouped_forward, emu.lora_grouped_backward, x, w, b, a_s, b_s, rngs, index, [0.2, 0.0], True, compute_grad_x,
        context=f"(seed={seed})",
    )


def test_emulated_all_base_rows_and_row_strided_input(emu):
    seed = fresh_seed()
    x, w, b, a_s, b_s, rngs, _ = make_grouped_case((4, 6), 24, 16, (3, 5), [0, 1, 0, 1], torch.float32, "cpu", seed)
    check_grouped_kernels(emu.lora_grouped_forward, emu.lora_grouped_backward, x, w, b, a_s, b_s, rngs, torch.full((4,), -1),
                          [0.3, 0.3], True, context=f"(seed={seed}, all base)")
    wide = torch.full((4, 6, 24 + 5), float("nan"))
    wide[..., :24] = x
    check_grouped_kernels(emu.lora_grouped_forward, emu.lora_grouped_backward, wide[..., :24], w, b, a_s, b_s, rngs,
                          torch.tensor([1, -1, 0, 1]), [0.3, 0.1], True, context=f"(seed={seed}, row stride 29)")


@pytest.mark.parametrize("schedule", [[0, 0, 1], [1, 1, 2], [2, 2, 3]])
def test_emulated_under_every_thread_and_block_order(emu, schedule):
    """Ascending, descending and shuffled orders of threads between barriers and of blocks."""
    seed = fresh_seed()
    x, w, b, a_s, b_s, rngs, index = make_grouped_case((5, 33), 48, 40, (8, 20), [1, 0, -1, 1, 0], torch.bfloat16, "cpu", seed)
    previous = emu.set_schedule(*schedule)
    try:
        check_grouped_kernels(emu.lora_grouped_forward, emu.lora_grouped_backward, x, w, b, a_s, b_s, rngs, index, [0.3, 0.2], True,
                              context=f"(seed={seed}, schedule={schedule})")
    finally:
        emu.set_schedule(*previous)

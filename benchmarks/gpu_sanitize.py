"""Exercise every CUDA kernel instantiation once at small sizes, for compute-sanitizer.

Run under the sanitizer with the caching allocator off, so that each tensor is its own
allocation and an out-of-bounds access lands outside it::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/gpu_sanitize.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 1 \\
        python benchmarks/gpu_sanitize.py --quick

Covers: fp32/fp16/bf16, every rank bucket (r = 1, 17, 40, 128), K with and without 128-bit
loads (K % 8), partial row/column tiles, both LoRA-term placements, grad_x on and off.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from lightning_peft.ops import cuda_backend

OP_FWD = torch.ops.lightning_peft.lora_linear_forward.default
OP_BWD = torch.ops.lightning_peft.lora_linear_backward.default


def run_case(dtype, n, k, d, r, p, post_add, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    w = torch.randn(d, k, device="cuda", generator=g).to(dtype)
    a = torch.randn(r, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(d, r, device="cuda", generator=g).to(dtype)
    rng = torch.tensor([seed, 1], dtype=torch.int64, device="cuda")
    cuda_backend.set_variant(post_add=post_add)
    y, hidden, mask = OP_FWD(x, w, None, a, b, rng, 0.5, p, True)
    for need_x in (True, False):
        OP_BWD(torch.randn_like(y), x, w, a, b, hidden, mask, 0.5, p, need_x)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two cases only (for the slower racecheck)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sanitize: needs CUDA")
        return 0
    if not cuda_backend.load():
        print(f"gpu_sanitize: kernels did not load: {cuda_backend.status()}")
        return 1
    if args.quick:
        cases = [(torch.bfloat16, 70, 136, 40, 17, 0.3, False), (torch.float32, 70, 37, 24, 5, 0.3, True)]
    else:
        # Every kernel instantiation (dtype x rank bucket) with and without 128-bit loads; the
        # other variants (LoRA term after the GEMM, p = 0: cuBLAS only) once per dtype.
        cases = [
            (dtype, n, k, d, r, 0.3, False)
            for dtype, (n, k, d), r in itertools.product(
                (torch.float32, torch.float16, torch.bfloat16), ((70, 136, 40), (3, 37, 9)), (1, 17, 40, 128)
            )
        ]
        cases += [(dtype, 70, 136, 40, 17, p, True) for dtype in (torch.float32, torch.float16, torch.bfloat16) for p in (0.3, 0.0)]
    for i, case in enumerate(cases):
        run_case(*case, seed=i)
    print(f"gpu_sanitize: {len(cases)} cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())

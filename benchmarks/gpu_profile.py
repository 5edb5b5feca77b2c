"""Where the time goes: per-kernel device time of one LoRA linear (fwd+bwd) at the target config.

Usage::

    python benchmarks/gpu_profile.py [--json profile.json] [--n 8192 --k 4096 --d 4096 --r 16 --p 0.1]

Profiles ``iters`` forward+backward steps of the frozen base linear (floor), peft-style eager
LoRA and ours with torch.profiler, and prints each implementation's kernels with their device
time per step. For our two fused kernels it also prints the achieved memory bandwidth from the
bytes they must move (dropout_hidden: read x, write the mask; dropout_grad: read x and the mask,
write the LoRA part of dx), to compare with the card's copy bandwidth (~4.3 TB/s on an H200).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def device_time_us(event) -> float:
    for name in ("device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_impl(impl: str, args, iters: int) -> dict:
    from bench_kernels import Case, build

    case = Case("cuda", args.dtype, args.n, args.k, args.d, args.r, args.p, "fwdbwd", impl)
    fn, x, params = build(case)
    grad_y = torch.randn(args.n, args.d, device="cuda", dtype=x.dtype)
    wrt = [x, *params]

    def step():
        torch.autograd.grad(fn(x), wrt, grad_y)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        t = device_time_us(evt)
        if t > 0 and evt.count:
            kernels[evt.key][0] += t / iters
            kernels[evt.key][1] += evt.count // iters
    rows = sorted(({"kernel": k, "us_per_step": v[0], "calls_per_step": v[1]} for k, v in kernels.items()), key=lambda r: -r["us_per_step"])
    return {"impl": impl, "total_us_per_step": sum(r["us_per_step"] for r in rows), "kernels": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: needs CUDA")
        return 0
    from lightning_peft.ops import cuda_backend

    if not cuda_backend.load():
        print(f"gpu_profile: kernels did not load: {cuda_backend.status()}")
        return 1
    elt = 2 if args.dtype == "bf16" else 4
    nk = args.n * args.k
    must_move = {  # bytes our fused kernels have to move at least
        "dropout_hidden_kernel": nk * elt + nk // 8,
        "dropout_grad_kernel": 2 * nk * elt + nk // 8,
    }
    results = []
    for impl in ("floor", "eager", "ours"):
        res = profile_impl(impl, args, args.iters)
        results.append(res)
        print(f"--- {impl}: {res['total_us_per_step']:.1f} us of kernels per fwd+bwd step "
              f"(N={args.n} K={args.k} D={args.d} r={args.r} p={args.p} {args.dtype})")
        for row in res["kernels"][:14]:
            note = ""
            for name, nbytes in must_move.items():
                if name in row["kernel"] and row["us_per_step"] > 0:
                    row["achieved_GBps"] = nbytes / (row["us_per_step"] * 1e-6) / 1e9
                    note = f"  [{row['achieved_GBps']:.0f} GB/s of the bytes it must move]"
            print(f"  {row['us_per_step']:9.1f} us  x{row['calls_per_step']:<2d} {row['kernel'][:90]}{note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"config": vars(args), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""In-process A/B of the CPU LoRA op's three dropout-mask forms on the reference workload.

The forms (all the same distribution of drops; they differ in what backward keeps and does):

* ``packed``: a 16-bit number per element, compared bit-serially, kept as packed keep-bits
  (the layout of the CUDA kernels; what non-CPU devices use);
* ``redraw``: drop positions drawn as geometric gaps; backward keeps only the (seed, offset) key
  and draws the positions again;
* ``distances``: the same positions; backward keeps the distances between drops (1 or 2 bytes
  each, at most 1 bit per element), the CPU default.

One process builds the floor model (frozen, input grads) and the LoRA model once, then times
steps (forward + backward) of the floor and of each form in rotating order, so machine drift hits
all alike; it prints, per form, the median step and the mean ± standard error of the step's ratio
to the floor step timed next to it. Ratios here run higher than in ``bench_cpu_lora.py`` (one
process holds two models); compare forms with each other, not with that benchmark.

    .venv/bin/python benchmarks/ab_cpu_dropout_forms.py                      # all-linear p=0.1, 30 reps
    .venv/bin/python benchmarks/ab_cpu_dropout_forms.py --config ours-qv-p0.1 --reps 30
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_cpu_lora  # noqa: E402  (the workload: model config, batch, threads)

FORMS = ("packed", "redraw", "distances")


def select_form(form: str) -> None:
    """Point the op's private switches at ``form`` (the op module is looked up at each call)."""
    lora_linear = importlib.import_module("lightning_peft.ops.lora_linear")
    dropout_mask = importlib.import_module("lightning_peft.ops.dropout_mask")
    lora_linear._uses_drop_positions = lambda device: form != "packed"
    if form == "redraw":  # numel 0: no distance encoding fits the 1-bit budget, so the key is kept
        lora_linear.encode_drop_positions = lambda positions, numel, rng, increments=None: dropout_mask.encode_drop_positions(positions, 0, rng)
    else:
        lora_linear.encode_drop_positions = dropout_mask.encode_drop_positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="ours-all-p0.1", help="an 'ours-*' configuration of bench_cpu_lora.py")
    ap.add_argument("--reps", type=int, default=30, help="timed rotations (each times the floor and every form once)")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated subset of {','.join(FORMS)}")
    args = ap.parse_args()
    forms = args.forms.split(",")
    torch.set_num_threads(bench_cpu_lora.THREADS)
    models = {name: bench_cpu_lora.build(name) for name in ("floor", args.config)}

    def timed_step(variant: str) -> float:
        if variant != "floor":
            select_form(variant)
        _, step, zero, _ = models["floor" if variant == "floor" else args.config]
        zero()
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    variants = ["floor", *forms]
    for _ in range(2):  # warm-up
        for v in variants:
            timed_step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:
            times[v].append(timed_step(v))
    print(f"{args.config}, {args.reps} rotations, torch {torch.__version__}, {bench_cpu_lora.THREADS} threads")
    print("| variant | median step (s) | step / floor step (mean ± s.e.) |")
    print("|---|---:|---:|")
    for v in variants:
        ratios = [a / b for a, b in zip(times[v], times["floor"])]
        mean, se = bench_cpu_lora.mean_and_standard_error(ratios)
        print(f"| {v} | {statistics.median(times[v]):.3f} | {mean:.3f} ± {se:.3f} |")


if __name__ == "__main__":
    main()

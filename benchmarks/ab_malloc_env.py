"""How much glibc's heap trimming costs CPU training: each configuration with and without two malloc settings.

Between steps glibc hands freed heap back to the OS and the next step maps it in again (tens of
thousands of 4 KiB page faults per step on the reference workload, the floor included). Two
environment variables, read once at process start, stop that for the whole process:

    MALLOC_MMAP_THRESHOLD_=67108864   # blocks under 64 MiB come from the heap, not fresh mmaps
    MALLOC_TRIM_THRESHOLD_=1073741824 # keep up to 1 GiB of free heap instead of returning it

This is a user-level, process-wide setting (the library never changes the allocator); the script
measures what it buys. For each configuration a default process and a tuned process run the
reference workload of ``bench_cpu_lora.py`` in lock-step (rotating order, one computing at a time),
so drift hits both alike; per round, tuned / default of the median step; the floor is measured too,
so the effect on "× floor" ratios shows as well.

    .venv/bin/python benchmarks/ab_malloc_env.py                                   # floor, ours q,v and all-linear p=0.1
    .venv/bin/python benchmarks/ab_malloc_env.py --configs floor,ours-qv-p0.1 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu_lora  # noqa: E402  (the workload and its step-serving child processes)

TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def run_round(configs: list[str], steps: int, warmup: int) -> dict[tuple[str, bool], dict]:
    """One process per (config, tuned); all take turns step by step. Returns median step and faults per process."""
    keys = [(c, tuned) for c in configs for tuned in (False, True)]
    children = {k: bench_cpu_lora.Child(k[0], TUNED_ENV if k[1] else None) for k in keys}
    try:
        for child in children.values():
            child.ready()
        records: dict[tuple[str, bool], list[dict]] = {k: [] for k in keys}
        for i in range(warmup + steps):
            for k in keys[i % len(keys):] + keys[: i % len(keys)]:
                rec = children[k].step()
                if i >= warmup:
                    records[k].append(rec)
        for child in children.values():
            child.done()
    finally:
        for child in children.values():
            child.kill()
    return {k: {"step_s": statistics.median(r["wall_s"] for r in recs),
                "faults": statistics.median(r["minor_faults"] for r in recs)} for k, recs in records.items()}


def mean_se(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    mean, se = bench_cpu_lora.mean_and_standard_error(values)
    return f"{mean:.3f} ± {se:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="floor,ours-qv-p0.1,ours-all-p0.1", help="configurations of bench_cpu_lora.py")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        bench_cpu_lora.parse_config(c)

    rounds = []
    for rnd in range(args.rounds):
        rounds.append(run_round(configs, args.steps, args.warmup))
        print(f"round {rnd}: " + ", ".join(f"{c}{' tuned' if t else ''} {v['step_s']:.3f} s"
                                           for (c, t), v in rounds[-1].items()), flush=True)

    env = bench_cpu_lora.environment()
    print(f"\n{env['date']}; {env['cpu']}, {bench_cpu_lora.THREADS} threads; torch {env['torch']}, "
          f"lightning_peft commit {env['lightning_peft_commit']}; command: python benchmarks/ab_malloc_env.py {' '.join(sys.argv[1:])}")
    print(f"malloc settings {TUNED_ENV}; {args.rounds} rounds; mean ± s.e. over rounds")
    print("| config | default step (s) | tuned step (s) | tuned / default | page faults/step default → tuned |"
          + (" × floor default | × floor tuned |" if "floor" in configs else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if "floor" in configs else ""))
    for c in configs:
        default = [r[(c, False)]["step_s"] for r in rounds]
        tuned = [r[(c, True)]["step_s"] for r in rounds]
        faults = (statistics.median(r[(c, False)]["faults"] for r in rounds), statistics.median(r[(c, True)]["faults"] for r in rounds))
        row = (f"| {c} | {statistics.median(default):.3f} | {statistics.median(tuned):.3f} | "
               f"{mean_se([t / d for t, d in zip(tuned, default)])} | {faults[0]:,.0f} → {faults[1]:,.0f} |")
        if "floor" in configs:
            if c == "floor":
                row += " 1 | 1 |"
            else:
                vs_default = [r[(c, False)]["step_s"] / r[("floor", False)]["step_s"] for r in rounds]
                vs_tuned = [r[(c, True)]["step_s"] / r[("floor", True)]["step_s"] for r in rounds]
                row += f" {mean_se(vs_default)} | {mean_se(vs_tuned)} |"
        print(row)


if __name__ == "__main__":
    main()

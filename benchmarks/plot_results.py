"""Plot a GPU-check summary (benchmarks/gpu_report.py's summary.json) as a PNG for the README.

Usage::

    python benchmarks/plot_results.py benchmarks/results/gpu_check/summary.json out.png

Left: time per call relative to the frozen base linear (1.0 = the floor) for each microbenchmark
config and implementation. Right: end-to-end tokens/s and peak memory of ours relative to peft.
"""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPLS = ["eager", "compiled", "ours", "ours_post"]
COLORS = {"eager": "#d62728", "compiled": "#ff7f0e", "ours": "#2ca02c", "ours_post": "#98df8a"}


def _short(config: str) -> str:
    """'cuda-bf16-N8192-K4096-D4096-r16-p0.1-fwdbwd' -> 'bf16 N8192 4096x4096 r16 p0.1 fwdbwd'."""
    parts = config.split("-")
    return " ".join([parts[1], parts[2], f"{parts[3][1:]}x{parts[4][1:]}", *parts[5:]])


def plot(summary: dict, out_png: str) -> None:
    rows = summary.get("kernels", [])
    e2e = summary.get("e2e", {})
    has_e2e = "throughput_ratio" in e2e
    fig, axes = plt.subplots(1, 2 if has_e2e else 1, figsize=(14 if has_e2e else 10, 6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if has_e2e else None)
    ax = axes[0][0]
    configs = sorted({r["config"] for r in rows})
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        values = []
        for config in configs:
            row = next((r for r in rows if r["config"] == config and r["impl"] == impl), None)
            values.append(row["ratio_to_floor"] if row and row.get("ratio_to_floor") else 0.0)
        if any(values):
            ax.barh([c + (i - 1.5) * width for c in range(len(configs))], values, height=width, label=impl, color=COLORS[impl])
    ax.axvline(1.0, color="black", lw=1)
    ax.axvline(1.10, color="gray", ls="--", lw=1, label="target 1.10x")
    ax.set_yticks(range(len(configs)))
    ax.set_yticklabels([_short(c) for c in configs], fontsize=8)
    ax.set_xlabel("time / frozen base linear (lower is better)")
    ax.set_title("One LoRA linear, per call")
    ax.legend(fontsize=8)
    if has_e2e:
        ax2 = axes[0][1]
        ratios = [e2e["throughput_ratio"], e2e["memory_ratio"]]
        ax2.bar(["tokens/s", "peak memory"], ratios, color=["#2ca02c", "#1f77b4"])
        ax2.axhline(1.0, color="black", lw=1)
        for x, (ratio, target) in enumerate(zip(ratios, (1.2, 0.8))):
            ax2.plot([x - 0.4, x + 0.4], [target, target], color="gray", ls="--", lw=1)
            ax2.text(x, ratio, f"{ratio:.2f}x", ha="center", va="bottom")
        ax2.set_title("End to end: ours / peft")
    env = summary.get("environment") or {}
    fig.suptitle(f"lightning_peft fused LoRA — {env.get('gpu', 'unknown device')}, torch {env.get('torch', '?')}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary_json")
    parser.add_argument("out_png")
    args = parser.parse_args(argv)
    with open(args.summary_json, encoding="utf-8") as fh:
        plot(json.load(fh), args.out_png)
    print(f"wrote {args.out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures from the committed results, for the README and benchmarks/README.md.

Usage::

    python benchmarks/plot_results.py          # benchmarks/results/methods_sst2.png and cpu_lora.png
                                               # (+ gpu.png when benchmarks/results/gpu_check/summary.json exists)
    python benchmarks/plot_results.py SUMMARY_JSON OUT_PNG   # one GPU-check summary (benchmarks/gpu_check.sh)

* ``methods_sst2.png`` (from ``methods_sst2.json``, benchmarks/compare_methods.py): SST-2 dev accuracy
  against trainable parameters (log scale), ours and peft's points, full fine-tuning.
* ``cpu_lora.png`` (from ``cpu_lora.json``, benchmarks/bench_cpu_lora.py): step time of peft and ours
  per configuration against the frozen floor, with the in-group ratios.
* the GPU summary (benchmarks/gpu_report.py's ``summary.json``): left, time per call relative to the
  frozen base linear for each microbenchmark config and implementation; right, end-to-end tokens/s
  and peak memory of ours relative to peft. Missing parts are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ["eager", "compiled", "ours", "ours_post"]
COLORS = {"eager": "#d62728", "compiled": "#ff7f0e", "ours": "#2ca02c", "ours_post": "#98df8a"}


LABEL_NUDGE = {"LoRA": 4, "DoRA": -12}  # vertical label offsets (points) where markers crowd


def _short(config: str) -> str:
    """'cuda-bf16-N8192-K4096-D4096-r16-p0.1-fwdbwd' -> 'bf16 N8192 4096x4096 r16 p0.1 fwdbwd' (other names unchanged)."""
    parts = config.split("-")
    if len(parts) < 5:
        return config
    return " ".join([parts[1], parts[2], f"{parts[3][1:]}x{parts[4][1:]}", *parts[5:]])


def plot(summary: dict, out_png: str) -> None:
    rows = [r for r in summary.get("kernels") or [] if r.get("impl") in IMPLS and "config" in r]
    e2e = summary.get("e2e") or {}
    has_e2e = "throughput_ratio" in e2e and "memory_ratio" in e2e
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


def plot_methods(runs: list[dict], out_png: str) -> None:
    """SST-2 dev accuracy (mean ± sd over seeds at each method's best learning rate) against trainable parameters."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare_methods import summarize  # the same numbers as the README's methods table

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = []  # one color per method, shared by ours and peft's point
    for s in summarize(runs):
        name = s["label"].replace(" (ours)", "").replace(" (peft)", "")
        names += [name] if name not in names else []
        color = "black" if s["kind"] == "full" else colors[names.index(name) % len(colors)]
        x, y = s["best"]["trainable"], s["mean"]
        style = {"full": dict(marker="*", ms=16, color=color), "ours": dict(marker="o", ms=8, color=color),
                 "peft": dict(marker="D", ms=14, mfc="none", mew=1.5, color=color)}[s["kind"]]
        ax.errorbar([x], [y], yerr=[s["sd"]], capsize=3, ls="none", **style)
        if s["kind"] != "peft":
            # labels of methods whose points nearly coincide (LoRA / DoRA) go above and below
            ax.annotate(name, (x, y), xytext=(8, LABEL_NUDGE.get(name, -4)), textcoords="offset points", fontsize=9)
        if s["kind"] == "full":
            ax.axhline(y, color="gray", ls=":", lw=1)
    ax.plot([], [], "o", color="gray", label="lightning_peft")
    ax.plot([], [], "D", color="gray", mfc="none", ms=10, label="HF peft (same settings)")
    ax.plot([], [], "*", color="black", ms=12, label="full fine-tuning")
    ax.set_xscale("log")
    ax.set_xlim(1e5, 1e8)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("SST-2 dev accuracy (%), mean ± sd over seeds")
    r0 = runs[0]
    ax.set_title(f"all-MiniLM-L6-v2 on SST-2: {r0['epochs']} epoch over {r0['train_subset']:,} sentences, learning rate tuned per method",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_cpu(saved: dict, out_png: str) -> None:
    """Median step time of peft and ours (and ours' PyTorch path where measured) per (targets, dropout)
    against the floor, annotated with the in-group ratios."""
    rows = {r["config"]: r for r in saved["table"]}
    settings = [(t, p) for t in ("qv", "all") for p in ("p0", "p0.1") if f"ours-{t}-{p}" in rows]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    impls = [("peft", "#d62728", "HF peft"), ("ours", "#2ca02c", "lightning_peft (CPU kernels)")]
    if any(name.startswith("ourspy-") for name in rows):  # the PyTorch path, where it was measured
        impls.append(("ourspy", "#98df8a", "lightning_peft, PyTorch path"))
    width = 0.8 / len(impls)
    for i, (impl, color, name) in enumerate(impls):
        xs, heights = [], []
        for k, (t, p) in enumerate(settings):
            row = rows.get(f"{impl}-{t}-{p}")
            if row:
                xs.append(k + (i - (len(impls) - 1) / 2) * width)
                heights.append(row["median_step_s"])
                label = f"{row['x_floor']:.2f}× floor" if "x_floor" in row else ""
                if "x_peft" in row:
                    label += f"\n{row['x_peft']:.2f}× peft"
                # inside the bar, upright: three bars per setting leave no room for labels side by side
                ax.text(xs[-1], heights[-1] / 2, label.replace("\n", "   "), ha="center", va="center", fontsize=8,
                        rotation=90, color="white" if impl != "ourspy" else "black")
        ax.bar(xs, heights, width, color=color, label=name)
    if "floor" in rows:
        floor = rows["floor"]["median_step_s"]
        ax.axhline(floor, color="black", ls="--", lw=1, label=f"floor: frozen model, no LoRA ({floor:.3f} s)")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([f"{'q,v' if t == 'qv' else 'all-linear'}, dropout {p[1:]}" for t, p in settings])
    ax.set_ylabel("forward + backward step (s, median)")
    ax.set_ylim(0, 1.25 * max(r["median_step_s"] for r in rows.values()))
    ax.legend(loc="upper left", fontsize=9)
    env = saved.get("environment", {})
    if "cpu" in env:
        source = f"{env['date']}, {env['cpu']}, lightning_peft {env.get('commit', '?')}"
    else:  # pooled runs: "file: date, cpu, commit c, `command`"
        source = "; ".join(s.split(": ", 1)[-1].split(", `")[0] for s in env.get("pooled", []))
    ax.set_title("LoRA r=8 training step on the CPU: tiny Llama, batch 8 × 256, 2 threads", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.01, 0.01, f"{source}; ratios formed within lock-step groups (benchmarks/bench_cpu_lora.py)", fontsize=7, color="gray")
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _load(path: str) -> object:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary_json", nargs="?", help="a GPU-check summary.json (then OUT_PNG is required)")
    parser.add_argument("out_png", nargs="?")
    args = parser.parse_args(argv)
    if args.summary_json:
        if not args.out_png:
            parser.error("OUT_PNG is required with SUMMARY_JSON")
        plot(_load(args.summary_json), args.out_png)
        print(f"wrote {args.out_png}")
        return 0
    jobs = [("methods_sst2.json", "methods_sst2.png", plot_methods), ("cpu_lora.json", "cpu_lora.png", plot_cpu),
            (os.path.join("gpu_check", "summary.json"), "gpu.png", plot)]
    for source, png, fn in jobs:
        source, png = os.path.join(RESULTS, source), os.path.join(RESULTS, png)
        if os.path.isfile(source):
            fn(_load(source), png)
            print(f"wrote {png} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

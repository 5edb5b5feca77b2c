"""Turn a pytest-benchmark JSON of benchmarks/bench_kernels.py into the ratio table.

Usage::

    python benchmarks/bench_kernels_report.py bench.json [--out-dir DIR] [--name kernels]

Writes ``DIR/<name>.md`` (markdown table) and ``DIR/<name>.json`` (one row per case plus the
target checks) and prints a compact table. Ratios are within one run only: time / floor time of
the same config, and eager time / time ("x faster than peft-style eager").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

# The acceptance targets of the project's issue (H200).
TARGET_CONFIG = "cuda-bf16-N8192-K4096-D4096-r16-p0.1-fwdbwd"
TARGET_MAX_RATIO_TO_FLOOR = 1.10
TARGET_MIN_SPEEDUP_VS_EAGER = 1.4

IMPL_ORDER = {"floor": 0, "eager": 1, "compiled": 2, "ours": 3, "ours_post": 4}


def load_rows(path: str) -> list[dict]:
    """One dict per case: the Case fields, ms_per_call, ratio_to_floor, speedup_vs_eager, saved bytes."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows = [dict(b["extra_info"]) for b in data.get("benchmarks", []) if "ms_per_call" in b.get("extra_info", {})]
    by_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_config[row["config"]][row["impl"]] = row
    for row in rows:
        group = by_config[row["config"]]
        floor, eager = group.get("floor"), group.get("eager")
        row["ratio_to_floor"] = row["ms_per_call"] / floor["ms_per_call"] if floor else None
        row["speedup_vs_eager"] = eager["ms_per_call"] / row["ms_per_call"] if eager else None
        row["saved_over_target"] = row["saved_bytes_beyond_x"] / row["saved_target_bytes"] if row["mode"] == "fwdbwd" else None
    rows.sort(key=lambda r: (r["config"], IMPL_ORDER.get(r["impl"], 9)))
    return rows


def target_checks(rows: list[dict]) -> list[dict]:
    """PASS/FAIL lines for the issue's microbenchmark targets (empty if the target config is absent)."""
    ours = next((r for r in rows if r["config"] == TARGET_CONFIG and r["impl"] == "ours"), None)
    if ours is None:
        return []
    checks = [
        ("time / frozen base linear", ours["ratio_to_floor"], f"<= {TARGET_MAX_RATIO_TO_FLOOR}",
         ours["ratio_to_floor"] is not None and ours["ratio_to_floor"] <= TARGET_MAX_RATIO_TO_FLOOR),
        ("speedup vs peft-style eager", ours["speedup_vs_eager"], f">= {TARGET_MIN_SPEEDUP_VS_EAGER}",
         ours["speedup_vs_eager"] is not None and ours["speedup_vs_eager"] >= TARGET_MIN_SPEEDUP_VS_EAGER),
        ("saved bytes beyond x / (N*K/8)", ours["saved_over_target"], "<= 1.0",
         ours["saved_over_target"] is not None and ours["saved_over_target"] <= 1.0),
    ]
    return [{"check": c, "value": v, "target": t, "pass": bool(ok)} for c, v, t, ok in checks]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], checks: list[dict]) -> str:
    lines = [
        "| config | impl | ms/call | x floor | x faster than eager | saved beyond x (MiB) | saved / (N*K/8) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        saved = r["saved_bytes_beyond_x"] / 2**20 if r["mode"] == "fwdbwd" else None
        lines.append(
            f"| {r['config']} | {r['impl']} | {r['ms_per_call']:.4f} | {_fmt(r['ratio_to_floor'], '.3f')} | "
            f"{_fmt(r['speedup_vs_eager'], '.2f')} | {_fmt(saved, '.2f')} | {_fmt(r['saved_over_target'], '.3f')} |"
        )
    if checks:
        lines += ["", f"Targets ({TARGET_CONFIG}, ours):", ""]
        lines += [f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']} = {_fmt(c['value'], '.3f')} (target {c['target']})" for c in checks]
    return "\n".join(lines) + "\n"


def compact(rows: list[dict]) -> str:
    """A narrow table for terminals and the device tool's output tail."""
    out = [f"{'config':<46} {'impl':<9} {'ms':>9} {'xfloor':>7} {'xeager':>7} {'saved/NK8':>9}"]
    for r in rows:
        out.append(
            f"{r['config']:<46} {r['impl']:<9} {r['ms_per_call']:>9.4f} {_fmt(r['ratio_to_floor'], '7.3f'):>7} "
            f"{_fmt(r['speedup_vs_eager'], '7.2f'):>7} {_fmt(r['saved_over_target'], '9.3f'):>9}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_json")
    parser.add_argument("--out-dir", default=None, help="where to write <name>.md / <name>.json (default: beside the input)")
    parser.add_argument("--name", default="kernels")
    args = parser.parse_args(argv)
    rows = load_rows(args.bench_json)
    if not rows:
        print(f"no bench_kernels results in {args.bench_json}", file=sys.stderr)
        return 1
    checks = target_checks(rows)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.bench_json))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{args.name}.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(rows, checks))
    with open(os.path.join(out_dir, f"{args.name}.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "targets": checks}, fh, indent=1)
    print(compact(rows))
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}: {c['check']} = {_fmt(c['value'], '.3f')} (target {c['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

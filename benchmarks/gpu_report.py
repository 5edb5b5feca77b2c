"""Summarise a benchmarks/gpu_check.sh run: stages, tests, microbenchmarks, end-to-end, sanitizer.

Usage::

    python benchmarks/gpu_report.py RESULTS_DIR

Reads from RESULTS_DIR what the stages left there (``stages.tsv``, ``tests.xml``, ``kernels.json``
from bench_kernels_report.py, ``e2e_ours.json`` / ``e2e_peft.json``), writes ``summary.md`` and
``summary.json`` beside them, and prints a compact summary (last, so it ends the log).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET

# The end-to-end targets: ours vs peft under the same Trainer.
E2E_MIN_THROUGHPUT_RATIO = 1.2
E2E_MAX_MEMORY_RATIO = 0.8


def read_stages(path: str) -> list[dict]:
    """``stages.tsv``: name, exit code, seconds, note (written by gpu_check.sh)."""
    if not os.path.exists(path):
        return []
    stages = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                stages.append({"stage": parts[0], "rc": parts[1], "seconds": float(parts[2]), "note": parts[3] if len(parts) > 3 else ""})
    return stages


def read_junit(path: str) -> dict:
    """Counts and the failing test ids of a pytest --junitxml file."""
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skip_reasons = [], {}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    failed.append({"test": name, "message": (node.get("message") or "")[:300]})
            skip = case.find("skipped")
            if skip is not None:
                reason = skip.get("message") or ""
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": skip_reasons}


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def e2e_summary(results_dir: str) -> dict:
    ours, peft = read_json(os.path.join(results_dir, "e2e_ours.json")), read_json(os.path.join(results_dir, "e2e_peft.json"))
    out = {"ours": ours, "peft": peft}
    if ours and peft and (ours.get("tiny") or peft.get("tiny")):
        out["note"] = "tiny dry run: not a measurement, targets not evaluated"
    elif ours and peft:
        throughput = ours["tokens_per_s"] / peft["tokens_per_s"]
        memory = ours["peak_mem_bytes"] / peft["peak_mem_bytes"]
        out["throughput_ratio"] = throughput
        out["memory_ratio"] = memory
        out["targets"] = [
            {"check": "e2e tokens/s vs peft", "value": throughput, "target": f">= {E2E_MIN_THROUGHPUT_RATIO}", "pass": throughput >= E2E_MIN_THROUGHPUT_RATIO},
            {"check": "e2e peak memory vs peft", "value": memory, "target": f"<= {E2E_MAX_MEMORY_RATIO}", "pass": memory <= E2E_MAX_MEMORY_RATIO},
        ]
    return out


def build_summary(results_dir: str) -> dict:
    kernels = read_json(os.path.join(results_dir, "kernels.json")) or {}
    return {
        "environment": read_json(os.path.join(results_dir, "environment.json")),
        "stages": read_stages(os.path.join(results_dir, "stages.tsv")),
        "tests": read_junit(os.path.join(results_dir, "tests.xml")),
        "kernels": kernels.get("rows", []),
        "kernel_targets": kernels.get("targets", []),
        "e2e": e2e_summary(results_dir),
        "profile": read_json(os.path.join(results_dir, "profile.json")),
    }


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def markdown(summary: dict) -> str:
    lines = ["# GPU check", ""]
    env = summary.get("environment") or {}
    if env:
        lines += [f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, kernels: {env.get('kernels', '?')}", ""]
    lines += ["| stage | exit | seconds | note |", "|---|---:|---:|---|"]
    lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']:.0f} | {s['note']} |" for s in summary["stages"]]
    tests = summary["tests"]
    if tests:
        lines += ["", f"Tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped."]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failed"][:30]]
    if summary["kernels"]:
        from bench_kernels_report import markdown as kernels_markdown

        lines += ["", "## Microbenchmarks (one LoRA linear)", "", kernels_markdown(summary["kernels"], summary["kernel_targets"])]
    profile = summary.get("profile")
    if profile:
        lines += ["## Kernels per fwd+bwd step at the target config (torch.profiler)", ""]
        for res in profile["results"]:
            lines.append(f"- **{res['impl']}**: {res['total_us_per_step']:.1f} us")
            for row in res["kernels"][:12]:
                bw = f" ({row['achieved_GBps']:.0f} GB/s)" if "achieved_GBps" in row else ""
                lines.append(f"    - {row['us_per_step']:.1f} us x{row['calls_per_step']} `{row['kernel'][:80]}`{bw}")
        lines.append("")
    e2e = summary["e2e"]
    if e2e.get("ours") or e2e.get("peft"):
        lines += ["## End to end (Lightning Trainer, bf16-mixed)", "", "| impl | tokens/s | step ms | peak GiB |", "|---|---:|---:|---:|"]
        for impl in ("peft", "ours"):
            r = e2e.get(impl)
            if r:
                lines.append(f"| {impl} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.1f} | {_gib(r['peak_mem_bytes'])} |")
        if e2e.get("note"):
            lines.append(f"\n{e2e['note']}")
        for t in e2e.get("targets", []):
            lines.append(f"\n- {'PASS' if t['pass'] else 'FAIL'}: {t['check']} = {t['value']:.3f} (target {t['target']})")
    return "\n".join(lines) + "\n"


def compact(summary: dict) -> str:
    out = ["=" * 78, "GPU CHECK SUMMARY"]
    env = summary.get("environment") or {}
    if env:
        out.append(f"{env.get('gpu', '?')} | torch {env.get('torch', '?')} | kernels: {env.get('kernels', '?')}")
    out.append("stages: " + ", ".join(f"{s['stage']}={s['rc']}({s['seconds']:.0f}s)" for s in summary["stages"]))
    tests = summary["tests"]
    if tests:
        out.append(f"tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped")
        out += [f"  FAILED {f['test']}: {f['message'][:160]}" for f in tests["failed"][:12]]
    if summary["kernels"]:
        from bench_kernels_report import compact as kernels_compact

        out.append(kernels_compact(summary["kernels"]))
    if summary.get("profile"):
        out.append("profile (us of kernels per fwd+bwd step): " + ", ".join(
            f"{r['impl']}={r['total_us_per_step']:.0f}" for r in summary["profile"]["results"]))
    for t in summary["kernel_targets"] + summary["e2e"].get("targets", []):
        out.append(f"{'PASS' if t['pass'] else 'FAIL'}: {t['check']} = {t['value']:.3f} (target {t['target']})")
    if summary["e2e"].get("note"):
        out.append(f"e2e: {summary['e2e']['note']}")
    for impl in ("peft", "ours"):
        r = summary["e2e"].get(impl)
        if r:
            out.append(f"e2e {impl:>5}: {r['tokens_per_s']:>10,.0f} tokens/s  step {r['step_ms_median']:.1f} ms  peak {_gib(r['peak_mem_bytes'])} GiB")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    summary = build_summary(args.results_dir)
    with open(os.path.join(args.results_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(args.results_dir, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(summary))
    print(compact(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

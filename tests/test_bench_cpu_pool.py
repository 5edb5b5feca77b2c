"""The CPU benchmark's pooling of saved runs: in-group ratios over every group of every file."""

import json
import math
import statistics
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _saved_run(path: Path, date: str, groups: list[tuple[float, float]]) -> None:
    """A results file with one q,v p=0.1 group (floor step, ours step) per round."""
    runs = []
    for rnd, (floor_s, ours_s) in enumerate(groups):
        group = ["floor", "ours-qv-p0.1"]
        for config, step_s in zip(group, (floor_s, ours_s)):
            runs.append({
                "config": config, "round": rnd, "group": group, "median_step_s": step_s, "median_cpu_step_s": 2 * step_s,
                "median_minor_faults": 0, "peak_rss_mib": 1000.0, "first_loss": 8.0, "trainable_params": 0,
                "emb_output_requires_grad": config == "floor", "other_cores": 0.0, "redone_steps": 0,
            })
    env = {"date": date, "lightning_peft_commit": "abc1234"}
    path.write_text(json.dumps({"environment": env, "command": "python benchmarks/bench_cpu_lora.py", "runs": runs}))


def test_pooling_forms_each_ratio_inside_its_group_and_reports_median_mean_and_standard_error(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_cpu_lora
    finally:
        sys.path.remove(str(BENCHMARKS))
    # Round 0 of both files shares a round number: pooling must keep them as separate groups.
    first, second = [(1.0, 1.02), (0.5, 0.52)], [(2.0, 2.2), (1.0, 1.03)]
    _saved_run(tmp_path / "a.json", "day 1", first)
    _saved_run(tmp_path / "b.json", "day 2", second)

    report = bench_cpu_lora.pool_runs([str(tmp_path / "a.json"), str(tmp_path / "b.json")])

    ratios = [ours / floor for floor, ours in first + second]  # 1.02, 1.04, 1.10, 1.03
    line = next(t for t in report.splitlines() if "q,v p=0.1: ours <= 1.05x floor" in t)
    assert line.startswith("- **PASS**")  # median 1.035 (the mean, 1.0475, would pass too)
    assert f"{statistics.median(ratios):.3f}x" in line
    se = statistics.stdev(ratios) / math.sqrt(len(ratios))
    assert f"mean {statistics.mean(ratios):.3f} ± {se:.3f} (s.e., 4 groups)" in line
    assert "day 1" in report and "day 2" in report

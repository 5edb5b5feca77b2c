"""The benchmarks' bookkeeping: the CPU benchmark's in-group ratios and pooling, and the README's generated
tables matching the committed result files they come from."""

import importlib
import json
import math
import statistics
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench():
    return _import("bench_cpu_lora")


def _import(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _readme_block(start: str, end: str) -> str:
    readme = (BENCHMARKS.parent / "README.md").read_text(encoding="utf-8")
    return readme.split(start + "\n", 1)[1].split("\n" + end, 1)[0]


def _saved_run(path: Path, date: str, groups: list[tuple[float, float, float, float]]) -> None:
    """A results file with one q,v p=0.1 group per round: (floor step, ours step, floor RSS, ours RSS)."""
    runs = []
    for rnd, (floor_s, ours_s, floor_mib, ours_mib) in enumerate(groups):
        group = ["floor", "ours-qv-p0.1"]
        for config, step_s, rss in zip(group, (floor_s, ours_s), (floor_mib, ours_mib)):
            runs.append({"config": config, "round": rnd, "group": group, "median_step_s": step_s, "median_minor_faults": 0,
                         "peak_rss_mib": rss, "trainable_params": 0, "first_loss": 8.0})
    path.write_text(json.dumps({"environment": {"date": date, "commit": "abc1234"}, "command": "python x", "runs": runs}))


def test_pooling_forms_each_ratio_inside_its_group_and_reports_median_mean_and_standard_error(tmp_path):
    bench = _bench()
    # Round 0 of both files shares a round number: pooling must keep them as separate groups.
    first = [(1.0, 1.02, 1000.0, 1010.0), (0.5, 0.52, 900.0, 930.0)]
    second = [(2.0, 2.2, 1000.0, 1040.0), (1.0, 1.03, 1000.0, 1000.0)]
    _saved_run(tmp_path / "a.json", "day 1", first)
    _saved_run(tmp_path / "b.json", "day 2", second)

    runs, configs, sources = bench.pool([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    rows = {r["config"]: r for r in bench.table_rows(runs, configs)}

    ratios = [ours / floor for floor, ours, _, _ in first + second]  # 1.02, 1.04, 1.10, 1.03: not the ratio of medians
    ours = rows["ours-qv-p0.1"]
    assert sorted(ours["x_floor_each"]) == sorted(ratios) and math.isclose(ours["x_floor"], statistics.median(ratios))
    assert ours["rss_above_floor_mib"] == statistics.median([10.0, 30.0, 40.0, 0.0])
    (goal,) = bench.targets(list(rows.values()))
    assert goal["target"].startswith("q,v p=0.1: ours <= 1.05x floor") and goal["pass"]  # median 1.035 <= 1.05
    se = statistics.stdev(ratios) / math.sqrt(len(ratios))
    assert f"mean {statistics.mean(ratios):.3f} ± {se:.3f} (s.e., 4 groups)" in goal["detail"]
    assert any("day 1" in s for s in sources) and any("day 2" in s for s in sources)


def test_a_saved_run_pools_again_to_the_same_table(tmp_path):
    """What ``--out`` writes is itself poolable: a pooled file re-pooled gives the same rows."""
    bench = _bench()
    _saved_run(tmp_path / "a.json", "day 1", [(1.0, 1.1, 1000.0, 1010.0), (1.0, 1.2, 1000.0, 1020.0)])
    runs, configs, sources = bench.pool([str(tmp_path / "a.json")])
    bench.write(tmp_path / "pooled", "python x", runs, configs, {}, sources)
    again = bench.table_rows(*bench.pool([str(tmp_path / "pooled.json")])[:2])
    assert again == bench.table_rows(runs, configs)
    assert "**PASS** q,v p=0.1" not in (tmp_path / "pooled.md").read_text()  # median 1.15 > 1.05
    assert "**FAIL** q,v p=0.1" in (tmp_path / "pooled.md").read_text()


def test_groups_put_floor_peft_and_ours_of_one_setting_together():
    bench = _bench()
    assert bench.make_groups(["floor", "peft-qv-p0.1", "ours-qv-p0.1", "ours-all-p0"]) == [
        ["floor", "peft-qv-p0.1", "ours-qv-p0.1"], ["floor", "ours-all-p0"]]
    assert bench.make_groups(["floor", "ours-qv-p0.1"], malloc_ab=True) == [
        ["floor", "floor+malloc", "ours-qv-p0.1", "ours-qv-p0.1+malloc"]]


def test_the_readme_cpu_table_is_the_committed_run():
    """README.md's CPU block is what ``bench_cpu_lora.py --readme`` makes of benchmarks/results/cpu_lora.json."""
    bench = _bench()
    saved = json.loads((BENCHMARKS / "results" / "cpu_lora.json").read_text(encoding="utf-8"))
    assert _readme_block(bench.README_START, bench.README_END) == bench.readme_block(saved), \
        "rerun: python benchmarks/bench_cpu_lora.py --readme-only"


def test_the_readme_methods_table_is_the_committed_runs():
    """README.md's methods block is what ``compare_methods.py --readme`` makes of benchmarks/results/methods_sst2.json."""
    compare = _import("compare_methods")
    runs = json.loads((BENCHMARKS / "results" / "methods_sst2.json").read_text(encoding="utf-8"))
    assert _readme_block(compare.README_START, compare.README_END) == compare.readme_table(runs), \
        "rerun: python benchmarks/compare_methods.py --report-only --readme"


def test_the_figures_are_made_from_the_committed_results(tmp_path):
    """plot_results.py draws both README figures from the committed files (a format change would break it here)."""
    plot = _import("plot_results")
    results = BENCHMARKS / "results"
    plot.plot_methods(json.loads((results / "methods_sst2.json").read_text(encoding="utf-8")), str(tmp_path / "m.png"))
    plot.plot_cpu(json.loads((results / "cpu_lora.json").read_text(encoding="utf-8")), str(tmp_path / "c.png"))
    for name in ("m.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

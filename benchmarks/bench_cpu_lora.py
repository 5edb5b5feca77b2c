"""CPU LoRA training step: frozen floor vs HF peft LoRA vs lightning_peft LoRA, in lock-step.

Workload: a tiny Llama from a config (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab
4096; no hub access), seed 0, fp32, 2 torch threads, batch 8 x 256 random tokens, labels =
inputs, ``model.train()``. A step is forward + backward (no optimizer: the floor has none);
gradients are cleared outside the timed region. LoRA r=8, alpha=16.

Configurations: ``floor`` (the model frozen, ``enable_input_require_grads()``: backward runs down
to the embeddings with no parameter gradients), ``peft-{qv,all}-p{0,0.1}`` and
``ours-{qv,all}-p{0,0.1}`` (``get_peft_model`` of each library; q,v or ``"all-linear"``; dropout
0 or 0.1; ours with its compiled CPU kernels, checked), ``ourspy-all-p0.1`` (ours on its
pure-PyTorch path, ``LIGHTNING_PEFT_FORCE_FALLBACK=1``: what runs without a C++ compiler; the other
``ourspy-...`` settings only when named), and, only when named in ``--configs``, DoRA: ``peft-dora-...`` / ``ours-dora-...``
(``use_dora=True``; grouped with the LoRA configs of the same setting, so ``ours-dora`` also gets
a ratio to ``ours``' LoRA step). Each configuration is its own process (so its peak RSS, ``ru_maxrss``, is its own;
every process imports torch, transformers, peft and lightning_peft alike).

Method, for a shared and drifting machine: per (targets, dropout) setting the floor, peft and
ours processes live together and take turns step by step (rotating order, one computing at a
time), so drift hits all three alike; each ratio is formed inside its group from the processes'
median steps, and the report gives the median (and mean ± standard error) over groups. The set
of groups runs ``--rounds`` times in alternating order. (torch.utils.benchmark and
pytest-benchmark time loops inside one process, so they cannot interleave processes like this;
the kernel microbenchmarks use them.)

Usage::

    python benchmarks/bench_cpu_lora.py                 # ~9 min: writes benchmarks/results/cpu_lora.{md,json}
    python benchmarks/bench_cpu_lora.py --readme        # and rewrites README.md's CPU table from it
    python benchmarks/bench_cpu_lora.py --readme-only   # only that, from the saved results
    python benchmarks/bench_cpu_lora.py --rounds 4      # twice the groups: a steadier median
    python benchmarks/bench_cpu_lora.py --configs floor,ours-qv-p0.1 --rounds 6 --out /tmp/qv
    python benchmarks/bench_cpu_lora.py --malloc-ab     # each config also with glibc heap trimming off
    python benchmarks/bench_cpu_lora.py --pool a.json,b.json --out benchmarks/results/cpu_lora_pooled
    python benchmarks/bench_cpu_lora.py --profile ours-all-p0.1   # torch.profiler's top ops
    python benchmarks/bench_cpu_lora.py --configs floor,ours-all-p0.1,peft-dora-all-p0.1,ours-dora-all-p0.1 --out /tmp/dora

A subset run writes results only with ``--out PREFIX``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cpu_lora"

LORA_R, LORA_ALPHA = 8, 16
BATCH, SEQ, THREADS = 8, 256, 2
MODEL_CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}
TARGET_LABEL = {"qv": "q,v", "all": "all-linear"}
DROPOUTS = {"p0": 0.0, "p0.1": 0.1}
#: "ours" runs the compiled CPU kernels (asserted); "ourspy" the same library on its pure-PyTorch path
#: (LIGHTNING_PEFT_FORCE_FALLBACK=1), what runs where the kernels cannot be compiled
IMPLS = ("peft", "ours", "ourspy")
CONFIGS = ["floor"] + [f"{impl}-{t}-{p}" for t in TARGETS for p in DROPOUTS for impl in ("peft", "ours")] + ["ourspy-all-p0.1"]
#: DoRA variants: known, but run only when named (not part of the default run or the README table)
DORA_CONFIGS = [f"{impl}-dora-{t}-{p}" for t in TARGETS for p in DROPOUTS for impl in IMPLS]
PY_CONFIGS = [f"ourspy-{t}-{p}" for t in TARGETS for p in DROPOUTS]
#: glibc keeps freed heap instead of handing it back to the OS and faulting it in again next step
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
TUNED = "+malloc"  # suffix of a process run with MALLOC_ENV (--malloc-ab)
#: what a saved run keeps per process (``--pool`` reads these)
RECORD_KEYS = ("config", "round", "group", "median_step_s", "median_minor_faults", "peak_rss_mib", "trainable_params", "first_loss")


def is_dora(name: str) -> bool:
    """Whether configuration ``name`` (e.g. ``"ours-dora-all-p0.1"``) trains DoRA instead of LoRA."""
    return "-dora-" in name


def parse_config(name: str) -> tuple[str, Optional[str], Optional[float]]:
    """``"ours-all-p0.1"`` (or ``"ours-dora-all-p0.1"``) -> ``("ours", "all", 0.1)``; ``"floor"`` -> ``("floor", None, None)``."""
    if name == "floor":
        return "floor", None, None
    impl, _, rest = name.replace("-dora-", "-", 1).partition("-")
    target, _, p = rest.partition("-")
    if impl not in IMPLS or target not in TARGETS or p not in DROPOUTS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(dict.fromkeys(CONFIGS + PY_CONFIGS + DORA_CONFIGS))}")
    return impl, target, DROPOUTS[p]


def describe(name: str) -> str:
    impl, target, p = parse_config(name)
    method = " DoRA" if is_dora(name) else ""
    if impl == "floor":
        return "floor (frozen, input grads)"
    who = "ours, PyTorch path" if impl == "ourspy" else impl
    return f"{who}{method} {TARGET_LABEL[target]} p={p:g}"


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean of independent measurements and its standard error (needs at least two values)."""
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


# ---- child process: one configuration ---------------------------------------------------------

def build(name: str) -> tuple[Any, Callable[[], float], Callable[[], None], dict[str, Any]]:
    """``(model, step, zero_grad, info)`` for configuration ``name``; ``step()`` runs forward + backward, returns the loss."""
    import peft
    import torch
    import transformers

    import lightning_peft

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL_CONFIG)
    model = transformers.LlamaForCausalLM(config).float()
    impl, target, p = parse_config(name)
    if impl == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        lib = peft if impl == "peft" else lightning_peft  # ours and ourspy differ by the environment (Child)
        model = lib.get_peft_model(model, lib.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=p,
                                                         target_modules=TARGETS[target], use_dora=is_dora(name)))
    model.train()
    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return float(loss.detach())

    info = {"trainable_params": sum(t.numel() for t in model.parameters() if t.requires_grad)}
    return model, step, lambda: model.zero_grad(set_to_none=True), info


def serve(name: str) -> None:
    """Child: build ``name``, print ``READY``; per ``step`` line on stdin run one step and print ``STEP {...}``;
    on ``done`` print ``DONE {...}`` with the peak RSS. Only these lines go to stdout."""
    _, step, zero, info = build(name)
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            zero()
            faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            loss = step()
            wall = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            print("STEP " + json.dumps({"wall_s": wall, "minor_faults": faults, "loss": loss}), flush=True)
        elif line.strip() == "done":
            from lightning_peft.ops import cpu_backend

            print("DONE " + json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                        "cpu_kernels": cpu_backend.status()["available"] and not cpu_backend.status()["force_fallback"]}),
                  flush=True)
            return


class Child:
    """One configuration's process, driven step by step over stdin/stdout (``name + TUNED``: with MALLOC_ENV)."""

    def __init__(self, name: str) -> None:
        self.name = name
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # this checkout's package
        if name.endswith(TUNED):
            env.update(MALLOC_ENV)
        env["LIGHTNING_PEFT_FORCE_FALLBACK"] = "1" if name.startswith("ourspy-") else "0"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", name.removesuffix(TUNED)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))

    def request(self, command: Optional[str], tag: str) -> dict[str, Any]:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        raise RuntimeError(f"{self.name}: the process exited with code {self.proc.wait()} (its stderr is above)")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ---- parent: groups in lock-step, in-group ratios --------------------------------------------

def make_groups(configs: list[str], malloc_ab: bool = False) -> list[list[str]]:
    """One group per (targets, dropout) setting: ``[floor, peft, ours]`` as far as given (the floor alone if nothing else).
    With ``malloc_ab`` every process also gets a twin with MALLOC_ENV."""
    settings: list[tuple] = []
    for c in configs:
        if c != "floor" and parse_config(c)[1:] not in settings:
            settings.append(parse_config(c)[1:])
    floor = ["floor"] if "floor" in configs else []
    groups = [floor + [c for c in configs if c != "floor" and parse_config(c)[1:] == s] for s in settings] or [floor]
    return [[n for c in g for n in (c, c + TUNED)] for g in groups] if malloc_ab else groups


def run_group(group: list[str], rnd: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    """The group's processes take turns step by step (rotating order); one record per process."""
    children = [Child(name) for name in group]
    try:
        info = [c.request(None, "READY") for c in children]
        records: list[list[dict]] = [[] for _ in children]
        for i in range(warmup + steps):
            for k in [(i + j) % len(children) for j in range(len(children))]:
                rec = children[k].request("step", "STEP")
                if i >= warmup:
                    records[k].append(rec)
        done = [c.request("done", "DONE") for c in children]
    finally:
        for c in children:
            c.close()
    for name, d in zip(group, done):  # never report the PyTorch path as the kernels, or the reverse
        if parse_config(name.removesuffix(TUNED))[0] in ("ours", "ourspy") and d["cpu_kernels"] != name.startswith("ours-"):
            raise RuntimeError(f"{name}: the CPU kernels were {'' if d['cpu_kernels'] else 'not '}used "
                               f"({'see lightning_peft.ops.cpu_backend.status()' if not d['cpu_kernels'] else 'fallback not forced'})")
    return [{"config": name, "round": rnd, "group": group, **info[k], **done[k],
             "median_step_s": statistics.median(r["wall_s"] for r in records[k]),
             "median_minor_faults": statistics.median(r["minor_faults"] for r in records[k]),
             "first_loss": records[k][0]["loss"]} for k, name in enumerate(group)]


def in_group(runs: list[dict], name: str, ref: str, key: str = "median_step_s", op=lambda a, b: a / b) -> list[float]:
    """``op(name's value, ref's value)`` for every group (round, file) in which both ran."""
    by = {(r["round"], tuple(r["group"]), r["config"]): r for r in runs}
    return [op(r[key], by[(r["round"], tuple(r["group"]), ref)][key]) for r in runs
            if r["config"] == name and (r["round"], tuple(r["group"]), ref) in by]


def table_rows(runs: list[dict], configs: list[str]) -> list[dict[str, Any]]:
    """Per config: median step over its processes; median over groups of x floor, x peft, RSS above floor
    (and, for a ``+malloc`` twin, x the same config with glibc's defaults)."""
    rows = []
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        if not mine:
            continue
        base, suffix = name.removesuffix(TUNED), TUNED if name.endswith(TUNED) else ""
        row: dict[str, Any] = {
            "config": name, "label": describe(base) + (" (malloc tuned)" if suffix else ""),
            "median_step_s": statistics.median(r["median_step_s"] for r in mine),
            "median_minor_faults": statistics.median(r["median_minor_faults"] for r in mine),
            "trainable_params": mine[0]["trainable_params"], "first_loss": mine[0]["first_loss"]}
        refs = {"floor": "floor" + suffix if base != "floor" else None,
                "peft": "peft" + base[base.index("-"):] + suffix if base.startswith("ours") else None,
                "default": base if suffix else None,
                "lora": base.replace("-dora-", "-") + suffix if is_dora(base) and base.startswith("ours") else None}
        for key, ref in refs.items():
            values = in_group(runs, name, ref) if ref else []
            if values:
                row[f"x_{key}"], row[f"x_{key}_each"] = statistics.median(values), values
        rss = in_group(runs, name, refs["floor"], "peak_rss_mib", lambda a, b: a - b) if refs["floor"] else []
        if rss:
            row["rss_above_floor_mib"] = statistics.median(rss)
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The CPU targets: all-linear p=0.1 <= 0.80x peft and <= 1.25x floor; q,v p=0.1 <= 1.05x floor; RSS above floor <= 0.5x peft's."""
    by = {r["config"]: r for r in rows}
    out = []
    for desc, name, key, limit in (("all-linear p=0.1: ours <= 0.80x peft step time", "ours-all-p0.1", "x_peft", 0.80),
                                   ("all-linear p=0.1: ours <= 1.25x floor step time", "ours-all-p0.1", "x_floor", 1.25),
                                   ("q,v p=0.1: ours <= 1.05x floor step time", "ours-qv-p0.1", "x_floor", 1.05),
                                   ("all-linear p=0.1: ours DoRA <= 1.15x ours LoRA step time", "ours-dora-all-p0.1", "x_lora", 1.15)):
        if key not in by.get(name, {}):
            continue
        values = by[name][key + "_each"]
        detail = f"{by[name][key]:.3f}x (median of {len(values)} groups: {', '.join(f'{v:.3f}' for v in values)}"
        if len(values) >= 3:
            mean, se = mean_and_standard_error(values)
            detail += f"; mean {mean:.3f} ± {se:.3f} (s.e., {len(values)} groups)"
        out.append({"target": desc, "value": by[name][key], "limit": limit, "pass": by[name][key] <= limit, "detail": detail + ")"})
    for method, t, p in ((m, t, p) for m in ("", "dora-") for t in TARGETS for p in DROPOUTS):
        ours, theirs = by.get(f"ours-{method}{t}-{p}", {}), by.get(f"peft-{method}{t}-{p}", {})
        if "rss_above_floor_mib" in ours and "rss_above_floor_mib" in theirs:
            o, q = ours["rss_above_floor_mib"], theirs["rss_above_floor_mib"]
            label = "DoRA " if method else ""
            out.append({"target": f"{label}{TARGET_LABEL[t]} p={DROPOUTS[p]:g}: ours' peak RSS above floor <= 0.5x peft's",
                        "value": o / q, "limit": 0.5, "pass": o <= 0.5 * q,
                        "detail": f"ours {o:+.0f} MiB / peft {q:+.0f} MiB = {o / q:.2f}x"})
    return out


def markdown(rows: list[dict], goals: list[dict]) -> str:
    lines = ["| config | median step (s) | × floor | × peft | peak RSS above floor (MiB) | page faults / step | trainable params |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cell = lambda key, spec=".3f": format(r[key], spec) if key in r else ""  # noqa: E731
        lines.append(f"| {r['label']} | {r['median_step_s']:.3f} | {cell('x_floor')} | {cell('x_peft')} | "
                     f"{cell('rss_above_floor_mib', '+.0f')} | {r['median_minor_faults']:,.0f} | {r['trainable_params']:,} |")
    tuned = [r for r in rows if "x_default" in r]
    if tuned:
        lines += ["", "| config | malloc tuned / default step (median over groups) | each group |", "|---|---:|---|"]
        lines += [f"| {r['config'].removesuffix(TUNED)} | {r['x_default']:.3f} | {', '.join(f'{v:.3f}' for v in r['x_default_each'])} |" for r in tuned]
    if goals:
        lines += ["", "## Targets", ""] + [f"- **{'PASS' if g['pass'] else 'FAIL'}** {g['target']}: {g['detail']}" for g in goals]
    return "\n".join(lines)


README_START = "<!-- cpu-table:start (written by benchmarks/bench_cpu_lora.py --readme) -->"
README_END = "<!-- cpu-table:end -->"


def readme_table(rows: list[dict], goals: list[dict], env: dict[str, Any]) -> str:
    """The README's CPU table: step, in-group ratios and RSS per row, where it ran, the targets' verdicts."""
    lines = ["| configuration | step (s, median) | × floor | × peft | peak RSS above floor |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        label = f"**{r['label']}**" if r["config"].startswith("ours-") else r["label"]
        above = f"+{r['rss_above_floor_mib']:.0f} MiB" if "rss_above_floor_mib" in r else ""
        lines.append(f"| {label} | {r['median_step_s']:.3f} | {r.get('x_floor', 1):.3f} | "
                     f"{format(r['x_peft'], '.3f') if 'x_peft' in r else ''} | {above} |")
    mark = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    verdicts = [f"{g['target'].replace(': ours <=', ' ≤').replace(' step time', '').replace('x ', '× ')}: {g['value']:.3f}×, "
                f"{mark(g['pass'])}"
                for g in goals if "RSS" not in g["target"]]
    rss = [g for g in goals if "RSS" in g["target"]]
    if rss:
        verdicts.append(f"peak RSS above floor ≤ 0.5× peft's: {min(g['value'] for g in rss):.2f}–{max(g['value'] for g in rss):.2f}×, "
                        f"{mark(all(g['pass'] for g in rss))}")
    where = (f"{env['date']}, {env['cpu']}, lightning_peft {env['commit']}" if "cpu" in env
             else "; ".join(s.split(": ", 1)[-1].split(", `")[0] for s in env.get("pooled", [])))
    return "\n".join(lines + ["", f"Measured {where}. Targets: {'; '.join(verdicts)}."])


def environment() -> dict[str, str]:
    import peft
    import torch
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=str(REPO)).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": f"{os.cpu_count()} cores, {cpu}",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
            "commit": git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain", "--", "lightning_peft") else "")}


def write(prefix: Path, command: str, runs: list[dict], configs: list[str], settings: dict[str, Any],
          sources: Optional[list[str]] = None, readme: bool = False) -> str:
    """``prefix.md`` (the table and the targets) and ``prefix.json`` (per-process medians: poolable), and with
    ``readme`` the README's CPU table; returns the markdown."""
    rows = table_rows(runs, configs)
    goals = targets(rows)
    head = ["# CPU LoRA training step: floor vs peft vs lightning_peft", "", f"- command: `{command}`"]
    if sources:  # the machine and code are those of the pooled runs
        env: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pooled": sources}
        head += [f"- pooled {env['date']} from:"] + [f"  - {s}" for s in sources]
    else:
        env = environment()
        head += [f"- {env['date']}; {env['cpu']}; {THREADS} torch threads", f"- {env['versions']}; lightning_peft {env['commit']}"]
    head += [f"- settings: {json.dumps(settings)}"]
    text = "\n".join(head + ["", "Ratios are formed inside each group (processes in lock-step), then the median over groups; "
                                 "method and workload: benchmarks/README.md.", "", markdown(rows, goals), ""])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(text, encoding="utf-8")
    payload = {"command": command, "environment": env, "settings": settings, "table": rows, "targets": goals}
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in payload.items())
    records = ",\n".join("  " + json.dumps({k: r[k] for k in RECORD_KEYS}) for r in runs)  # one line per process
    prefix.with_suffix(".json").write_text("{\n" + body + ',\n "runs": [\n' + records + "\n ]\n}\n", encoding="utf-8")
    if readme:
        update_readme(prefix.with_suffix(".json"))
    return text


def readme_block(saved: dict[str, Any]) -> str:
    """The README's CPU block for a saved results file (its dropout-0.1 rows; all rows stay in the .md)."""
    rows = [r for r in saved["table"] if r["config"] == "floor" or r["config"].endswith("p0.1")]
    return readme_table(rows, saved["targets"], saved["environment"])


def update_readme(saved_json: Path) -> None:
    """Rewrite README.md's CPU table from a saved results file."""
    from readme_block import replace_block

    replace_block(README_START, README_END, readme_block(json.loads(saved_json.read_text(encoding="utf-8"))))


def pool(paths: list[str]) -> tuple[list[dict], list[str], list[str]]:
    """The per-process records of saved runs, each file's rounds kept as groups of their own."""
    runs, configs, sources = [], [], []
    for i, path in enumerate(paths):
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        env = saved.get("environment", {})
        commit = env.get("commit", env.get("lightning_peft_commit", "?"))
        sources.append(f"{os.path.basename(path)}: {env.get('date', '?')}, {env.get('cpu', '?')}, commit {commit}, `{saved.get('command', '?')}`")
        for r in saved["runs"]:
            runs.append({**{k: r[k] for k in RECORD_KEYS}, "round": f"{i}:{r['round']}"})  # rounds of two files: two groups
            configs += [r["config"]] if r["config"] not in configs else []
    return runs, configs, sources


def profile(name: str, steps: int = 3) -> None:
    """torch.profiler's top operators (self CPU time) of ``steps`` steps after 2 warm-up steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, step, zero, _ = build(name)
    for _ in range(2):
        zero()
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            zero()
            step()
    print(f"=== {describe(name)}: {steps} steps ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)} (default) "
                    f"and of {','.join(PY_CONFIGS + DORA_CONFIGS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process (median taken)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per process first")
    ap.add_argument("--rounds", type=int, default=2, help="times every group runs (alternating order)")
    ap.add_argument("--malloc-ab", action="store_true", help="also run every config with glibc heap trimming off (MALLOC_ENV)")
    ap.add_argument("--out", default=None, help="write PREFIX.md/.json (default for a full run: benchmarks/results/cpu_lora)")
    ap.add_argument("--readme", action="store_true", help="also rewrite README.md's CPU table from what is written")
    ap.add_argument("--readme-only", action="store_true", help="no measurement: rewrite README.md's CPU table from "
                    "the saved results (--out PREFIX, default benchmarks/results/cpu_lora)")
    ap.add_argument("--pool", default=None, metavar="JSON[,JSON...]", help="no measurement: the groups of saved runs together")
    ap.add_argument("--profile", default=None, metavar="CONFIG", help="print torch.profiler's top ops for one config")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.profile:
        return profile(args.profile)
    if args.readme_only:
        return update_readme(Path(args.out or DEFAULT_OUT).with_suffix(".json").resolve())
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:])

    if args.pool:
        runs, configs, sources = pool(args.pool.split(","))
        if args.out:
            print(write(Path(args.out), command, runs, configs, {"pooled runs": len(sources)}, sources, args.readme))
        else:
            rows = table_rows(runs, configs)
            print(markdown(rows, targets(rows)))
        return

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        parse_config(c)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still closes its children (finally)
    if any(c.startswith("ours-") for c in configs):  # compile the CPU kernels once, before any child wants them
        from lightning_peft.ops import cpu_backend

        if not cpu_backend.load():
            sys.exit(f"the CPU kernels are unavailable: {cpu_backend.status()['reason']}")
    groups = make_groups(configs, args.malloc_ab)
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for group in groups if rnd % 2 == 0 else groups[::-1]:
            start = time.perf_counter()
            runs += run_group(group, rnd, args.steps, args.warmup)
            steps = ", ".join(f"{r['config']} {r['median_step_s']:.3f} s" for r in runs[-len(group):])
            print(f"[round {rnd}] {steps} ({time.perf_counter() - start:.0f} s)", flush=True)
    all_configs = list(dict.fromkeys(n for g in groups for n in g))  # with the +malloc twins, in group order
    settings = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "malloc_ab": args.malloc_ab}
    out = args.out or (str(DEFAULT_OUT) if set(configs) == set(CONFIGS) and not args.malloc_ab else None)
    if out:
        print(write(Path(out), command, runs, all_configs, settings, readme=args.readme))
    else:
        rows = table_rows(runs, all_configs)
        print(markdown(rows, targets(rows)) + "\n\n(a subset run: nothing written; --out PREFIX writes it)")


if __name__ == "__main__":
    main()

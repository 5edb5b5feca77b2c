"""CPU LoRA training-step benchmark: frozen floor vs HF peft LoRA vs lightning_peft LoRA.

Reference workload (GUIDE section 6): a tiny Llama built from a config (no hub access),
seed 0, fp32, ``torch.set_num_threads(2)``, batch 8 x 256 random tokens, labels = inputs,
``model.train()``, 3 warm-up steps then the median of 10 timed steps.

A timed step is **forward + backward only** (``loss = model(input_ids, labels=labels).loss;
loss.backward()``), for every configuration: the floor has no optimizer, so neither do the
LoRA configurations. Gradients are cleared with ``zero_grad(set_to_none=True)`` between steps,
outside the timed region. ours' dropout RNG advances once per step through its own forward
pre-hook (inside the timed region, as in real training).

Configurations (LoRA r=8, lora_alpha=16), each in its own process so peak RSS is its own:

* ``floor``: the same model fully frozen plus ``enable_input_require_grads()``, so backward
  runs through every layer down to the input embeddings, with no parameter gradients.
* ``peft-{qv,all}-p{0,0.1}``: ``peft.get_peft_model`` with ``target_modules=["q_proj",
  "v_proj"]`` or ``"all-linear"`` and ``lora_dropout`` 0 / 0.1.
* ``ours-{qv,all}-p{0,0.1}``: ``lightning_peft.get_peft_model``, same arguments.

Every child process imports torch, transformers, peft *and* lightning_peft whatever its
configuration, so the import footprint is identical and "RSS above floor" is training memory.
Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the child (whole-process high-water mark).

The whole set is run ``--rounds`` times (default 2) in alternating order (forward, reversed,
...) to even out drift; per configuration the reported step time is the median of the
per-round medians and the reported RSS the median of the per-round peaks.

Usage::

    python benchmarks/bench_cpu_lora.py                      # full run, writes benchmarks/results/cpu_lora.{md,json}
    python benchmarks/bench_cpu_lora.py --configs floor,ours-all-p0.1 --steps 4 --warmup 1 --rounds 1
    python benchmarks/bench_cpu_lora.py --profile ours-all-p0.1,peft-all-p0.1,floor   # torch.profiler top ops

A subset or overridden run writes no results file unless ``--out PREFIX`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cpu_lora"

LORA_R, LORA_ALPHA = 8, 16
BATCH, SEQ = 8, 256
THREADS = 2
MODEL_CONFIG = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512,
)
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}
TARGET_LABEL = {"qv": "q,v", "all": "all-linear"}
DROPOUTS = {"p0": 0.0, "p0.1": 0.1}

CONFIGS = ["floor"] + [f"{impl}-{t}-{p}" for t in TARGETS for p in DROPOUTS for impl in ("peft", "ours")]


def parse_config(name: str) -> tuple[str, str | None, float | None]:
    """``"ours-all-p0.1"`` -> ``("ours", "all", 0.1)``; ``"floor"`` -> ``("floor", None, None)``."""
    if name == "floor":
        return "floor", None, None
    impl, target, p = name.split("-")
    if impl not in ("peft", "ours") or target not in TARGETS or p not in DROPOUTS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return impl, target, DROPOUTS[p]


def describe(name: str) -> str:
    impl, target, p = parse_config(name)
    if impl == "floor":
        return "floor (frozen, input grads)"
    return f"{impl} {TARGET_LABEL[target]} p={p:g}"


# --------------------------------------------------------------------------------------------
# child side: build one configuration, run it, report one JSON line
# --------------------------------------------------------------------------------------------

def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _system_busy_s() -> float:
    """CPU seconds all processes on the machine have been busy since boot (from /proc/stat), or nan."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def build(name: str):
    """Model, batch and a step function for configuration ``name`` (all libraries imported up front)."""
    import torch
    import transformers
    import peft  # noqa: F401  (imported in every child: identical import footprint)
    import lightning_peft  # noqa: F401

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL_CONFIG)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)

    emb_grad = {"requires_grad": None}

    impl, target, p = parse_config(name)
    if impl == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        mod = peft if impl == "peft" else lightning_peft
        lcfg = mod.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=p, target_modules=TARGETS[target])
        model = mod.get_peft_model(model, lcfg)

    # Record whether backward will produce a gradient for the input-embedding output.
    def _emb_hook(_module, _inp, out):
        emb_grad["requires_grad"] = bool(out.requires_grad)

    model.get_input_embeddings().register_forward_hook(_emb_hook)

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    model.train()

    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)

    def step() -> float:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        return float(loss.detach())

    def zero() -> None:
        model.zero_grad(set_to_none=True)

    return model, step, zero, {"trainable_params": trainable, "emb_grad": emb_grad}


def child(name: str, steps: int, warmup: int, abort_above: float | None = None) -> dict:
    import torch

    t0 = time.perf_counter()
    rss_start = _current_rss_mib()
    model, step, zero, info = build(name)
    rss_built = _current_rss_mib()
    build_s = time.perf_counter() - t0
    losses, times, cpu_times, own_cpu, other_cpu, warm_other = [], [], [], [], [], []
    for i in range(warmup + steps):
        zero()
        busy0, own0, t = _system_busy_s(), time.process_time(), time.perf_counter()
        loss = step()
        dt, own, busy = time.perf_counter() - t, time.process_time() - own0, _system_busy_s() - busy0
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
            cpu_times.append(own)
            own_cpu.append(own / dt)
            other_cpu.append(max(0.0, busy - own) / dt)
        else:
            warm_other.append(max(0.0, busy - own) / dt)
        # Give up early on a contended machine (the parent retries later): after the warm-up
        # and again after 5 timed steps.
        seen = warm_other if i == warmup - 1 else other_cpu if i == warmup + 4 else None
        if abort_above is not None and seen and statistics.median(seen) > abort_above:
            return {"config": name, "aborted": True, "other_cores": statistics.median(seen)}
    zero()
    return {
        "config": name,
        "step_times_s": times,
        "median_step_s": statistics.median(times),
        "cpu_step_times_s": cpu_times,
        "median_cpu_step_s": statistics.median(cpu_times),
        "peak_rss_mib": _max_rss_mib(),
        "rss_after_imports_mib": rss_start,
        "rss_after_build_mib": rss_built,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_params": info["trainable_params"],
        "emb_output_requires_grad": info["emb_grad"]["requires_grad"],
        "build_s": build_s,
        # Contention check: cores this process kept busy during timed steps, and cores that
        # *other* processes on the machine used meanwhile (medians over timed steps).
        "own_cores": statistics.median(own_cpu),
        "other_cores_per_step": other_cpu,
        "other_cores": statistics.median(other_cpu),
        "torch_threads": torch.get_num_threads(),
    }


def profile(name: str, steps: int, warmup: int, rows: int, shapes: bool = False) -> None:
    import torch  # noqa: F401
    from torch.profiler import ProfilerActivity, profile as tprofile

    _, step, zero, info = build(name)
    for _ in range(warmup):
        zero()
        step()
    zero()
    busy0, own0, t = _system_busy_s(), time.process_time(), time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for _ in range(steps):
            zero()
            step()
    elapsed = time.perf_counter() - t
    other = max(0.0, (_system_busy_s() - busy0) - (time.process_time() - own0)) / elapsed
    print(f"=== profile: {name} ({describe(name)}), {steps} profiled steps after {warmup} warm-up, "
          f"{elapsed / steps:.3f} s/step under the profiler, other processes used {other:.2f} cores"
          f"{' (CONTENDED: absolute times inflated)' if other > 0.15 else ''}, trainable params {info['trainable_params']:,} ===")
    averages = prof.key_averages(group_by_input_shape=shapes)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60,
                         max_shapes_column_width=70))
    total_self = sum(e.self_cpu_time_total for e in averages) / 1e3 / steps
    print(f"total self CPU: {total_self:.1f} ms/step (op time on the calling thread; intra-op worker threads are not counted separately)")
    ours = [e for e in prof.key_averages() if "lightning_peft" in e.key]
    for e in sorted(ours, key=lambda e: -e.cpu_time_total):
        print(f"  {e.key[:70]:70s} {e.count // steps:4d} calls/step  total incl. children {e.cpu_time_total / 1e3 / steps:8.1f} ms/step "
              f"({100 * e.cpu_time_total / 1e3 / steps / total_self:.1f}% of total self CPU)")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# parent side: run the children, aggregate, report
# --------------------------------------------------------------------------------------------

def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "ignore")
    # Benchmark this checkout's lightning_peft whether or not it is pip-installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def wait_for_quiet(max_wait_s: float, busy_cores: float = 0.15, window_s: float = 1.0) -> float:
    """Wait (up to ``max_wait_s``) for a ``window_s`` window in which the machine is nearly idle; returns seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        b0, w0 = _system_busy_s(), time.perf_counter()
        time.sleep(window_s)
        busy = (_system_busy_s() - b0) / (time.perf_counter() - w0)
        if not busy > busy_cores:  # also true for nan (no /proc/stat)
            break
    return time.perf_counter() - t0


def run_child(name: str, steps: int, warmup: int, abort_above: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--steps", str(steps), "--warmup", str(warmup)]
    cmd += ["--abort-above", str(abort_above)] if abort_above is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=str(REPO))
    result_line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or result_line is None:
        return {"config": name, "error": f"exit {proc.returncode}\n{proc.stderr[-6000:]}{proc.stdout[-2000:]}"}
    return json.loads(result_line[len("RESULT "):])


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict]:
    agg = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            agg[name] = {"error": rs[-1]["error"]}
            continue
        agg[name] = {
            "median_step_s": statistics.median(r["median_step_s"] for r in ok),
            "median_cpu_step_s": statistics.median(r["median_cpu_step_s"] for r in ok),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
            "round_medians_s": [r["median_step_s"] for r in ok],
            "round_peak_rss_mib": [r["peak_rss_mib"] for r in ok],
            "first_loss": ok[0]["first_loss"],
            "trainable_params": ok[0]["trainable_params"],
            "emb_output_requires_grad": ok[0]["emb_output_requires_grad"],
            "errors": [r["error"] for r in rs if "error" in r],
            "max_other_cores": max(r["other_cores"] for r in ok),
            "attempts": [r.get("attempts", 1) for r in ok],
        }
    return agg


def peer(name: str) -> str | None:
    impl, target, p = parse_config(name)
    if impl == "floor":
        return None
    other = "peft" if impl == "ours" else "ours"
    return name.replace(impl, other, 1)


def build_table(agg: dict[str, dict], order: list[str]) -> list[dict]:
    floor = agg.get("floor", {})
    rows = []
    for name in order:
        a = agg[name]
        row = {"config": name, "label": describe(name)}
        if "error" in a:
            row["error"] = a["error"]
            rows.append(row)
            continue
        row.update(median_step_s=a["median_step_s"], median_cpu_step_s=a["median_cpu_step_s"], peak_rss_mib=a["peak_rss_mib"],
                   first_loss=a["first_loss"], trainable_params=a["trainable_params"],
                   emb_grad=a["emb_output_requires_grad"], round_medians_s=a["round_medians_s"],
                   max_other_cores=a["max_other_cores"])
        if "median_step_s" in floor:
            row["vs_floor"] = a["median_step_s"] / floor["median_step_s"]
            row["cpu_vs_floor"] = a["median_cpu_step_s"] / floor["median_cpu_step_s"]
            row["rss_above_floor_mib"] = a["peak_rss_mib"] - floor["peak_rss_mib"]
        pn = peer(name)
        if parse_config(name)[0] == "ours" and pn in agg and "median_step_s" in agg[pn]:
            row["vs_peft"] = a["median_step_s"] / agg[pn]["median_step_s"]
            row["cpu_vs_peft"] = a["median_cpu_step_s"] / agg[pn]["median_cpu_step_s"]
        rows.append(row)
    return rows


def evaluate_targets(agg: dict[str, dict]) -> list[dict]:
    def t(name):
        return agg.get(name, {}).get("median_step_s")

    def c(name):
        return agg.get(name, {}).get("median_cpu_step_s")

    def rss_above(name):
        if "peak_rss_mib" not in agg.get(name, {}) or "peak_rss_mib" not in agg.get("floor", {}):
            return None
        return agg[name]["peak_rss_mib"] - agg["floor"]["peak_rss_mib"]

    out = []

    def ratio_target(desc, num_cfg, den_cfg, limit, num_name, den_name):
        num, den = t(num_cfg), t(den_cfg)
        if num is None or den is None:
            out.append({"target": desc, "status": "N/A", "detail": "not measured in this run"})
            return
        r, rc = num / den, c(num_cfg) / c(den_cfg)
        out.append({"target": desc, "status": "PASS" if r <= limit else "FAIL", "value": r, "cpu_time_ratio": rc, "limit": limit,
                    "detail": f"{num_name} {num:.3f} s / {den_name} {den:.3f} s = {r:.3f}x (limit {limit:.2f}x); "
                              f"CPU-time ratio {rc:.3f}x"})

    ratio_target("all-linear p=0.1: ours <= 0.80x peft step time", "ours-all-p0.1", "peft-all-p0.1", 0.80, "ours", "peft")
    ratio_target("all-linear p=0.1: ours <= 1.25x floor step time", "ours-all-p0.1", "floor", 1.25, "ours", "floor")
    ratio_target("q,v p=0.1: ours <= 1.05x floor step time", "ours-qv-p0.1", "floor", 1.05, "ours", "floor")
    for tgt in TARGETS:
        for p in DROPOUTS:
            o, q = rss_above(f"ours-{tgt}-{p}"), rss_above(f"peft-{tgt}-{p}")
            desc = f"{TARGET_LABEL[tgt]} p={DROPOUTS[p]:g}: ours' peak RSS above floor <= 0.5x peft's"
            if o is None or q is None:
                out.append({"target": desc, "status": "N/A", "detail": "not measured in this run"})
                continue
            ok = o <= 0.5 * q
            r = o / q if q > 0 else float("nan")
            out.append({"target": desc, "status": "PASS" if ok else "FAIL", "value": r, "limit": 0.5,
                        "detail": f"ours +{o:.0f} MiB / peft +{q:.0f} MiB = {r:.2f}x (limit 0.50x)"})
    return out


def fmt_table(rows: list[dict], max_other_cores: float = 0.15) -> str:
    head = ("| config | median step (s) | x floor | x peft (same config) | peak RSS (MiB) | RSS above floor (MiB) "
            "| per-round medians (s) | CPU s/step | CPU x floor | CPU x peft | other procs' cores (max) | trainable params | emb. output grad | first loss |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | ERROR | | | | | | | | | | | | |")
            continue
        vs_floor = f"{r['vs_floor']:.3f}" if "vs_floor" in r else ""
        vs_peft = f"{r['vs_peft']:.3f}" if "vs_peft" in r else ""
        cpu_floor = f"{r['cpu_vs_floor']:.3f}" if "cpu_vs_floor" in r else ""
        cpu_peft = f"{r['cpu_vs_peft']:.3f}" if "cpu_vs_peft" in r else ""
        above = f"{r['rss_above_floor_mib']:+.0f}" if "rss_above_floor_mib" in r and r["config"] != "floor" else ""
        rounds = ", ".join(f"{x:.3f}" for x in r["round_medians_s"])
        other = f"{r['max_other_cores']:.2f}" + (" (CONTENDED)" if r["max_other_cores"] > max_other_cores else "")
        lines.append(f"| {r['label']} | {r['median_step_s']:.3f} | {vs_floor} | {vs_peft} | {r['peak_rss_mib']:.0f} | {above} "
                     f"| {rounds} | {r['median_cpu_step_s']:.3f} | {cpu_floor} | {cpu_peft} | {other} | {r['trainable_params']:,} | {'yes' if r['emb_grad'] else 'no'} | {r['first_loss']:.4f} |")
    return "\n".join(lines)


def fmt_targets(targets: list[dict], rows: list[dict] | None = None, max_other_cores: float = 0.15) -> str:
    text = "\n".join(f"- **{t['status']}** {t['target']}: {t['detail']}" for t in targets)
    contended = [r["label"] for r in rows or [] if r.get("max_other_cores", 0.0) > max_other_cores]
    if contended:
        text += ("\n\nWarning: other processes competed for the CPUs during " + ", ".join(contended)
                 + " even after reruns; their times are inflated and the verdicts involving them are unreliable.")
    return text


def environment() -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), check=True).stdout.strip()
        except Exception as e:  # noqa: BLE001
            return f"unavailable ({e})"

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    import torch
    import transformers

    dirty = sh(["git", "status", "--porcelain", "--", "lightning_peft"])
    return {
        "date": sh(["date", "-u"]),
        "nproc": sh(["nproc"]),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning_peft_commit": sh(["git", "rev-parse", "--short", "HEAD"]),
        "lightning_peft_dirty": bool(dirty),
        "lightning_peft_dirty_files": dirty.splitlines() if dirty else [],
    }


def write_results(prefix: Path, env: dict, command: str, args, rows, targets, runs) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = [
        "# CPU LoRA training step: floor vs peft vs lightning_peft",
        "",
        f"- date: {env['date']}",
        f"- machine: {env['nproc']} cores (nproc), {env['cpu']}; torch threads {THREADS}",
        f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, lightning_peft commit {env['lightning_peft_commit']}"
        + (" (+ uncommitted changes in lightning_peft/)" if env["lightning_peft_dirty"] else ""),
        f"- command: `{command}`",
        "",
        "Workload (GUIDE section 6): tiny Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4096) "
        f"from config, seed 0, fp32, {THREADS} threads, batch {BATCH} x {SEQ} random tokens, labels = inputs, "
        f"`model.train()`, {args.warmup} warm-up steps then median of {args.steps}; LoRA r={LORA_R}, alpha={LORA_ALPHA}. "
        "A step is **forward + backward only** for every configuration (no optimizer, as the floor has none); "
        "grads cleared with `zero_grad(set_to_none=True)` outside the timed region. "
        "Floor = the same model fully frozen with `enable_input_require_grads()`. "
        "Each configuration runs in its own process; every process imports torch, transformers, peft and "
        "lightning_peft, so import memory is the same for all. Peak RSS = the child's `ru_maxrss`. "
        f"The set ran {args.rounds} round(s) in alternating order; step time = median of the per-round medians, "
        "RSS = median of per-round peaks. Ratios are within this run only. "
        "The machine is shared: before each process the parent waits (up to --quiet-wait s) for a 1 s window "
        "with under 0.15 busy cores; each step also records the cores *other* processes used meanwhile (/proc/stat), "
        f"a configuration seeing more than {args.max_other_cores} such cores is rerun (up to {args.retries} times, "
        "least-contended attempt kept); the table shows the worst kept value. "
        "\"CPU s/step\" = this process's CPU seconds per step (median; all its threads), a work measure that is "
        "far less sensitive to other processes than wall time; targets are judged on wall time. "
        "\"emb. output grad\" = whether the input-embedding output requires grad (backward computes it): "
        "only the floor does; LoRA configs backprop into layer 0's adapters but stop at its frozen input.",
        "",
        fmt_table(rows, args.max_other_cores),
        "",
        "## Targets",
        "",
        fmt_targets(targets, rows, args.max_other_cores),
        "",
    ]
    errs = [r for r in rows if "error" in r]
    if errs:
        md += ["## Errors", ""]
        for r in errs:
            md += [f"### {r['label']}", "", "```", r["error"].strip(), "```", ""]
    prefix.with_suffix(".md").write_text("\n".join(md))
    payload = {"environment": env, "command": command,
               "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": THREADS,
                            "batch": BATCH, "seq": SEQ, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "model": MODEL_CONFIG},
               "table": rows, "targets": targets, "runs": runs}
    prefix.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {prefix.with_suffix('.md')} and {prefix.with_suffix('.json')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {','.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process (median taken)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole set is run, alternating order")
    ap.add_argument("--quiet-wait", type=float, default=180.0,
                    help="before each process, wait up to this many seconds for a nearly idle machine")
    ap.add_argument("--max-other-cores", type=float, default=0.15,
                    help="rerun a configuration whose timed steps saw other processes using more cores than this")
    ap.add_argument("--retries", type=int, default=5, help="reruns allowed per configuration and round for contention")
    ap.add_argument("--out", default=None, help="results prefix (writes PREFIX.md/.json); default: "
                    "benchmarks/results/cpu_lora for a full default run, nothing otherwise")
    ap.add_argument("--profile", default=None, metavar="CONFIG[,CONFIG...]",
                    help="print torch.profiler top ops (self CPU time) for these configs, each in its own process")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--profile-shapes", action="store_true", help="group profiler rows by input shape (LoRA-branch ops show r=8)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--abort-above", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.warmup, args.abort_above)), flush=True)
        return
    if args.profile_child:
        profile(args.profile_child, args.profile_steps, args.warmup, args.profile_rows, args.profile_shapes)
        return

    if args.profile:
        for name in args.profile.split(","):
            parse_config(name)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-child", name, "--warmup", str(args.warmup),
                   "--profile-steps", str(args.profile_steps), "--profile-rows", str(args.profile_rows)]
            cmd += ["--profile-shapes"] if args.profile_shapes else []
            rc = subprocess.run(cmd, env=child_env(), cwd=str(REPO)).returncode
            if rc != 0:
                print(f"profile of {name} failed with exit code {rc}", flush=True)
        return

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        parse_config(c)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:])

    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rnd in range(args.rounds):
        order = configs if rnd % 2 == 0 else list(reversed(configs))
        for name in order:
            t = time.perf_counter()
            attempts = []
            for attempt in range(1 + max(0, args.retries)):
                wait_for_quiet(args.quiet_wait)
                last = attempt == args.retries
                attempts.append(run_child(name, args.steps, args.warmup, None if last else args.max_other_cores))
                if "error" in attempts[-1] or last or (
                        not attempts[-1].get("aborted") and attempts[-1]["other_cores"] <= args.max_other_cores):
                    break
                print(f"[round {rnd}] {name:16s} other processes used {attempts[-1]['other_cores']:.2f} cores "
                      f"(> {args.max_other_cores}): {'stopped early, ' if attempts[-1].get('aborted') else ''}rerunning",
                      flush=True)
            ok = [a for a in attempts if "error" not in a and not a.get("aborted")]
            r = min(ok, key=lambda a: a["other_cores"]) if ok else attempts[-1]
            r["round"], r["attempts"] = rnd, len(attempts)
            runs[name].append(r)
            if "error" in r:
                print(f"[round {rnd}] {name:16s} ERROR ({time.perf_counter() - t:.0f}s)\n{r['error']}", flush=True)
            else:
                print(f"[round {rnd}] {name:16s} median {r['median_step_s']:.3f} s  peak RSS {r['peak_rss_mib']:.0f} MiB  "
                      f"cpu {r['median_cpu_step_s']:.3f} s  loss {r['first_loss']:.4f}  cores own {r['own_cores']:.2f} other {r['other_cores']:.2f}  "
                      f"({time.perf_counter() - t:.0f}s)", flush=True)

    agg = aggregate(runs)
    rows = build_table(agg, configs)
    targets = evaluate_targets(agg)
    print()
    print(fmt_table(rows, args.max_other_cores))
    print("\nTargets:")
    print(fmt_targets(targets, rows, args.max_other_cores))

    out = args.out
    full = (set(configs) == set(CONFIGS) and args.steps == 10 and args.warmup == 3 and args.rounds >= 2)
    if out is None and full:
        out = str(DEFAULT_OUT)
    if out:
        write_results(Path(out), environment(), command, args, rows, targets, runs)
    else:
        print("\n(subset/override run: no results written; pass --out PREFIX to write)")


if __name__ == "__main__":
    main()

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

Timing on a shared, drifting 2-core machine. Configurations are compared in *groups*: for each
(targets, dropout) setting the floor, peft and ours processes are alive together and take turns
step by step (lock-step, rotating order; only one computes at a time), so slow drift of the
machine hits all three alike and every ratio is formed inside its group. Each step also records
the cores *other* processes used meanwhile (/proc/stat); a step that saw more than
``--max-other-cores`` is redone after waiting for a quiet moment (``--step-retries``). The whole
set of groups runs ``--rounds`` times (default 2) in alternating order. Reported: per config the
median of its per-run medians; per ratio the median over (group, round) of the in-group ratio
(and, from three groups on, their mean ± standard error).

Usage::

    python benchmarks/bench_cpu_lora.py                      # full run, writes benchmarks/results/cpu_lora.{md,json}
    python benchmarks/bench_cpu_lora.py --configs floor,ours-all-p0.1 --steps 4 --warmup 1 --rounds 1
    python benchmarks/bench_cpu_lora.py --profile ours-all-p0.1,peft-all-p0.1,floor   # torch.profiler top ops
    python benchmarks/bench_cpu_lora.py --pool a.json,b.json   # targets over the groups of saved runs together

A subset or overridden run writes no results file unless ``--out PREFIX`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import tempfile
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


def serve(name: str) -> None:
    """Child process: build ``name``, then run one step per ``step`` line on stdin until ``done``.

    Protocol on stdout (one JSON object per line): ``READY {...}``, ``STEP {...}`` per step,
    ``DONE {...}`` with the peak RSS. Nothing else is printed to stdout.
    """
    t0 = time.perf_counter()
    rss_start = _current_rss_mib()
    _, step, zero, info = build(name)
    ready = {"config": name, "build_s": time.perf_counter() - t0, "rss_at_start_mib": rss_start,
             "rss_after_build_mib": _current_rss_mib(), "trainable_params": info["trainable_params"]}
    print("READY " + json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            zero()
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            busy0, own0, t = _system_busy_s(), time.process_time(), time.perf_counter()
            loss = step()
            wall, own, busy = time.perf_counter() - t, time.process_time() - own0, _system_busy_s() - busy0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
            print("STEP " + json.dumps({"wall_s": wall, "cpu_s": own, "other_cores": max(0.0, busy - own) / wall,
                                        "minor_faults": faults, "loss": loss}), flush=True)
        elif cmd == "done":
            zero()
            print("DONE " + json.dumps({"peak_rss_mib": _max_rss_mib(), "rss_at_end_mib": _current_rss_mib(),
                                        "emb_output_requires_grad": info["emb_grad"]["requires_grad"]}), flush=True)
            return


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
# parent side: run the groups in lock-step, aggregate, report
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


class Child:
    """One configuration's process, driven step by step over its stdin/stdout."""

    def __init__(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", name]
        env = {**child_env(), **(extra_env or {})}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=str(REPO))

    def _expect(self, tag: str) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.stderr.seek(0)
                raise RuntimeError(f"{self.name}: process exited with code {self.proc.returncode}\n{self.stderr.read()[-6000:]}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])

    def ready(self) -> dict:
        return self._expect("READY")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._expect("STEP")

    def done(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        out = self._expect("DONE")
        self.proc.wait()
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def make_groups(configs: list[str]) -> list[list[str]]:
    """One group per (targets, dropout) setting present: [floor?, peft?, ours?]; floor alone if nothing else."""
    settings = []
    for c in configs:
        impl, target, p = parse_config(c)
        if impl != "floor" and (target, p) not in settings:
            settings.append((target, p))
    floor = ["floor"] if "floor" in configs else []
    groups = [floor + [c for c in configs if c != "floor" and parse_config(c)[1:] == s] for s in settings]
    return groups or ([floor] if floor else [])


def run_group(group: list[str], rnd: int, args, log) -> dict[str, dict]:
    """Run ``group``'s processes in lock-step; returns per config its run record (or an error)."""
    children = {name: Child(name) for name in group}
    results: dict[str, dict] = {}
    try:
        info = {}
        for name, ch in children.items():
            try:
                info[name] = ch.ready()
            except RuntimeError as e:
                results[name] = {"config": name, "round": rnd, "group": group, "error": str(e)}
        alive = [n for n in group if n not in results]
        steps: dict[str, list[dict]] = {n: [] for n in alive}
        for i in range(args.warmup + args.steps):
            order = alive[i % len(alive):] + alive[:i % len(alive)] if alive else []
            for name in order:
                if name in results:
                    continue
                tries = 0
                try:
                    while True:
                        rec = children[name].step()
                        tries += 1
                        if (i < args.warmup or rec["other_cores"] <= args.max_other_cores or tries > args.step_retries
                                or args.wait_budget_left <= 0):
                            break
                        args.wait_budget_left -= wait_for_quiet(min(args.quiet_wait, args.wait_budget_left), args.max_other_cores)
                except RuntimeError as e:
                    results[name] = {"config": name, "round": rnd, "group": group, "error": str(e)}
                    continue
                rec["tries"], rec["warmup"] = tries, i < args.warmup
                steps[name].append(rec)
        for name in alive:
            if name in results:
                continue
            try:
                fin = children[name].done()
            except RuntimeError as e:
                results[name] = {"config": name, "round": rnd, "group": group, "error": str(e)}
                continue
            timed = [s for s in steps[name] if not s["warmup"]]
            results[name] = {
                "config": name, "round": rnd, "group": group, **info[name], **fin,
                "steps": steps[name],
                "median_step_s": statistics.median(s["wall_s"] for s in timed),
                "median_cpu_step_s": statistics.median(s["cpu_s"] for s in timed),
                "median_minor_faults": statistics.median(s["minor_faults"] for s in timed),
                "other_cores": statistics.median(s["other_cores"] for s in timed),
                "max_other_cores_step": max(s["other_cores"] for s in timed),
                "redone_steps": sum(s["tries"] - 1 for s in timed),
                "first_loss": steps[name][0]["loss"],
            }
    finally:
        for ch in children.values():
            ch.kill()
    for name in group:
        r = results[name]
        if "error" in r:
            log(f"[round {rnd}] {name:16s} ERROR\n{r['error']}")
        else:
            log(f"[round {rnd}] {name:16s} median {r['median_step_s']:.3f} s  cpu {r['median_cpu_step_s']:.3f} s  "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB  loss {r['first_loss']:.4f}  other cores {r['other_cores']:.2f} "
                f"(max {r['max_other_cores_step']:.2f}, {r['redone_steps']} steps redone)")
    return results


def aggregate(runs: list[dict], configs: list[str]) -> dict[str, dict]:
    """Per config: medians over its runs, and in-group ratios (to the floor, to peft) over (group, round)."""
    by_key = {(r["round"], tuple(r["group"]), r["config"]): r for r in runs}
    agg: dict[str, dict] = {}
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            agg[name] = {"error": mine[-1]["error"] if mine else "not run"}
            continue
        a = {
            "median_step_s": statistics.median(r["median_step_s"] for r in ok),
            "median_cpu_step_s": statistics.median(r["median_cpu_step_s"] for r in ok),
            "median_minor_faults": statistics.median(r["median_minor_faults"] for r in ok),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
            "run_medians_s": [r["median_step_s"] for r in ok],
            "first_loss": ok[0]["first_loss"],
            "trainable_params": ok[0]["trainable_params"],
            "emb_output_requires_grad": ok[0]["emb_output_requires_grad"],
            "max_other_cores": max(r["other_cores"] for r in ok),
            "redone_steps": sum(r["redone_steps"] for r in ok),
        }
        for ref_name, key in (("floor", "floor"), ("peft", "peft")):
            if ref_name == "floor":
                ref = "floor" if name != "floor" else None
            else:
                ref = peer(name) if parse_config(name)[0] == "ours" else None
            if ref is None:
                continue
            wall, cpu, rss = [], [], []
            for r in ok:
                other = by_key.get((r["round"], tuple(r["group"]), ref))
                if other and "error" not in other:
                    wall.append(r["median_step_s"] / other["median_step_s"])
                    cpu.append(r["median_cpu_step_s"] / other["median_cpu_step_s"])
                    rss.append(r["peak_rss_mib"] - other["peak_rss_mib"])
            if wall:
                a[f"vs_{key}"] = statistics.median(wall)
                a[f"cpu_vs_{key}"] = statistics.median(cpu)
                a[f"vs_{key}_each"] = wall
                if key == "floor":
                    a["rss_above_floor_mib"] = statistics.median(rss)
        agg[name] = a
    return agg


def peer(name: str) -> str | None:
    impl, _, _ = parse_config(name)
    if impl == "floor":
        return None
    other = "peft" if impl == "ours" else "ours"
    return other + name[len(impl):]


def build_table(agg: dict[str, dict], order: list[str]) -> list[dict]:
    rows = []
    for name in order:
        row = {"config": name, "label": describe(name), **agg[name]}
        rows.append(row)
    return rows


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean of independent measurements and its standard error (needs at least two values)."""
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def evaluate_targets(agg: dict[str, dict]) -> list[dict]:
    out = []

    def ratio_target(desc, cfg, key, limit):
        a = agg.get(cfg, {})
        if key not in a:
            out.append({"target": desc, "status": "N/A", "detail": "not measured in this run"})
            return
        r, rc = a[key], a["cpu_" + key]
        values = a[key + "_each"]
        each = ", ".join(f"{x:.3f}" for x in values)
        entry = {"target": desc, "status": "PASS" if r <= limit else "FAIL", "value": r, "cpu_time_ratio": rc, "limit": limit}
        spread = ""
        if len(values) >= 3:  # the groups are independent processes: their mean and its standard error
            entry["mean"], entry["standard_error"] = mean_and_standard_error(values)
            spread = f"; mean {entry['mean']:.3f} ± {entry['standard_error']:.3f} (s.e., {len(values)} groups)"
        entry["detail"] = f"{r:.3f}x (limit {limit:.2f}x; per group/round {each}{spread}); CPU-time ratio {rc:.3f}x"
        out.append(entry)

    ratio_target("all-linear p=0.1: ours <= 0.80x peft step time", "ours-all-p0.1", "vs_peft", 0.80)
    ratio_target("all-linear p=0.1: ours <= 1.25x floor step time", "ours-all-p0.1", "vs_floor", 1.25)
    ratio_target("q,v p=0.1: ours <= 1.05x floor step time", "ours-qv-p0.1", "vs_floor", 1.05)
    for tgt in TARGETS:
        for p in DROPOUTS:
            o, q = agg.get(f"ours-{tgt}-{p}", {}), agg.get(f"peft-{tgt}-{p}", {})
            desc = f"{TARGET_LABEL[tgt]} p={DROPOUTS[p]:g}: ours' peak RSS above floor <= 0.5x peft's"
            if "rss_above_floor_mib" not in o or "rss_above_floor_mib" not in q:
                out.append({"target": desc, "status": "N/A", "detail": "not measured in this run"})
                continue
            om, qm = o["rss_above_floor_mib"], q["rss_above_floor_mib"]
            r = om / qm if qm > 0 else float("nan")
            out.append({"target": desc, "status": "PASS" if om <= 0.5 * qm else "FAIL", "value": r, "limit": 0.5,
                        "detail": f"ours {om:+.0f} MiB / peft {qm:+.0f} MiB = {r:.2f}x (limit 0.50x)"})
    return out


def fmt_table(rows: list[dict], max_other_cores: float = 0.15) -> str:
    head = ("| config | median step (s) | x floor | x peft (same config) | peak RSS (MiB) | RSS above floor (MiB) "
            "| per-run medians (s) | CPU s/step | CPU x floor | CPU x peft | page faults/step "
            "| other procs' cores (worst run) "
            "| trainable params | emb. output grad | first loss |")
    ncol = head.count("|") - 1
    lines = [head, "|" + "|".join(["---"] * ncol) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | ERROR |" + " |" * (ncol - 2))
            continue

        def f(key, spec=".3f"):
            return format(r[key], spec) if key in r else ""

        other = f"{r['max_other_cores']:.2f}" + (" (CONTENDED)" if r["max_other_cores"] > max_other_cores else "")
        lines.append(
            f"| {r['label']} | {r['median_step_s']:.3f} | {f('vs_floor')} | {f('vs_peft')} | {r['peak_rss_mib']:.0f} "
            f"| {f('rss_above_floor_mib', '+.0f')} | {', '.join(f'{x:.3f}' for x in r['run_medians_s'])} "
            f"| {r['median_cpu_step_s']:.3f} | {f('cpu_vs_floor')} | {f('cpu_vs_peft')} "
            f"| {r['median_minor_faults']:,.0f} | {other} "
            f"| {r['trainable_params']:,} | {'yes' if r['emb_output_requires_grad'] else 'no'} | {r['first_loss']:.4f} |")
    return "\n".join(lines)


def fmt_targets(targets: list[dict], rows: list[dict] | None = None, max_other_cores: float = 0.15) -> str:
    text = "\n".join(f"- **{t['status']}** {t['target']}: {t['detail']}" for t in targets)
    contended = [r["label"] for r in rows or [] if r.get("max_other_cores", 0.0) > max_other_cores]
    if contended:
        text += ("\n\nWarning: other processes competed for the CPUs during " + ", ".join(contended)
                 + " even after redoing steps; their times are inflated and the verdicts involving them are unreliable.")
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
        "lightning_peft, so import memory is the same for all. Peak RSS = the child's `ru_maxrss`; 'page faults/step' = median minor page faults "
        "(`ru_minflt`) of a timed step: memory the step touched that the OS had to map in (again).",
        "",
        "Method: for each (targets, dropout) setting the floor, peft and ours processes live together and take turns "
        "step by step (rotating order, one computing at a time), so machine drift hits the three alike; each ratio "
        "(x floor, x peft, RSS above floor) is formed inside its group and then the median over groups and rounds is "
        f"taken (the floor runs in every group). {args.rounds} round(s), groups in alternating order. Step time = "
        "median of per-run medians. A step during which other processes used more than "
        f"{args.max_other_cores} cores (/proc/stat) is redone after waiting for a quiet moment (up to "
        f"{args.step_retries} times). \"CPU s/step\" = the process's CPU seconds per step (all threads). "
        "\"emb. output grad\" = whether the input-embedding output requires grad (backward computes it): only the "
        "floor does; LoRA configs backprop into layer 0's adapters but stop at its frozen input.",
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
                            "batch": BATCH, "seq": SEQ, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "model": MODEL_CONFIG,
                            "max_other_cores": args.max_other_cores, "step_retries": args.step_retries},
               "table": rows, "targets": targets, "runs": runs}
    prefix.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {prefix.with_suffix('.md')} and {prefix.with_suffix('.json')}")


def pool_runs(paths: list[str]) -> str:
    """The targets over the groups of several saved runs together (each group keeps its own floor).

    For code that did not change between the runs (check each file's commit): more independent
    processes give a better estimate of a ratio than any single run's median.
    """
    runs, configs, described = [], [], []
    for i, path in enumerate(paths):
        saved = json.loads(Path(path).read_text())
        env = saved["environment"]
        described.append(f"{path}: {env['date']}, commit {env['lightning_peft_commit']}, `{saved['command']}`")
        for r in saved["runs"]:
            runs.append({**r, "round": f"{i}:{r['round']}"})  # rounds of different files are different groups
            if r["config"] not in configs:
                configs.append(r["config"])
    targets = evaluate_targets(aggregate(runs, configs))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), "--pool", ",".join(paths)])
    return "\n".join([
        "# CPU LoRA benchmark: targets over the groups of several runs", "", f"- command: `{command}`", "- runs pooled:",
        *(f"  - {d}" for d in described), "", fmt_targets(targets), "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {','.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process (median taken)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per process")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole set is run, alternating order")
    ap.add_argument("--max-other-cores", type=float, default=0.15,
                    help="redo a timed step during which other processes used more cores than this")
    ap.add_argument("--step-retries", type=int, default=5, help="times a contended step may be redone")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before redoing a contended step, wait up to this many seconds for a nearly idle machine")
    ap.add_argument("--max-total-wait", type=float, default=3600.0,
                    help="total seconds the run may spend waiting for quiet moments; after that contended steps are kept (and flagged)")
    ap.add_argument("--out", default=None, help="results prefix (writes PREFIX.md/.json); default: "
                    "benchmarks/results/cpu_lora for a full default run, nothing otherwise")
    ap.add_argument("--profile", default=None, metavar="CONFIG[,CONFIG...]",
                    help="print torch.profiler top ops (self CPU time) for these configs, each in its own process")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--profile-shapes", action="store_true", help="group profiler rows by input shape (LoRA-branch ops show r=8)")
    ap.add_argument("--pool", default=None, metavar="JSON[,JSON...]",
                    help="no new measurement: pool the groups of these saved runs (their .json) and print the targets")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve:
        serve(args.serve)
        return
    if args.profile_child:
        profile(args.profile_child, args.profile_steps, args.warmup, args.profile_rows, args.profile_shapes)
        return

    if args.pool:
        print(pool_runs(args.pool.split(",")))
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
    groups = make_groups(configs)
    args.wait_budget_left = args.max_total_wait

    def log(msg: str) -> None:
        print(msg, flush=True)

    runs: list[dict] = []
    for rnd in range(args.rounds):
        for group in (groups if rnd % 2 == 0 else list(reversed(groups))):
            t = time.perf_counter()
            res = run_group(group, rnd, args, log)
            runs += [res[n] for n in group]
            log(f"[round {rnd}] group {','.join(group)} took {time.perf_counter() - t:.0f} s")

    agg = aggregate(runs, configs)
    rows = build_table(agg, configs)
    targets = evaluate_targets(agg)
    print()
    print(fmt_table(rows, args.max_other_cores))
    print("\nTargets:")
    print(fmt_targets(targets, rows, args.max_other_cores))

    out = args.out
    full = set(configs) == set(CONFIGS) and args.steps == 10 and args.warmup == 3 and args.rounds >= 2
    if out is None and full:
        out = str(DEFAULT_OUT)
    if out:
        write_results(Path(out), environment(), command, args, rows, targets, runs)
    else:
        print("\n(subset/override run: no results written; pass --out PREFIX to write)")


if __name__ == "__main__":
    main()

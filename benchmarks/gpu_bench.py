"""The GPU benchmarks of benchmarks/gpu_check.sh, as subcommands of one script.

    python benchmarks/gpu_bench.py kernels --out DIR [--grid gpu|full|cpu] [--budget-s S]
    python benchmarks/gpu_bench.py profile --out DIR
    python benchmarks/gpu_bench.py e2e --impl ours|peft|frozen --out DIR [--tiny --cpu] [--layers L]
    python benchmarks/gpu_bench.py report DIR

``kernels``: one LoRA linear, frozen base linear (floor) vs peft-style eager vs ours (the
``lightning_peft::lora_linear_*`` ops) vs torch.compile'd eager, timed with
``torch.utils.benchmark`` (median, CUDA synchronised), plus the bytes autograd saves beyond x
(and a batch mixing 4 adapters: the grouped op vs a loop of single-adapter ops, ``GroupedLora``)
(counted with saved_tensors_hooks). The target config comes first and the run stops adding
configs when ``--budget-s`` is spent; rows go to DIR/kernels.json as they are measured.
``profile``: device time per kernel of one fwd+bwd step at the target config (torch.profiler),
with the achieved bandwidth of our two fused kernels. ``e2e``: a 7B-width Llama (2 layers)
fine-tuned under Lightning, bf16-mixed, LoRA r=16 p=0.1 on every linear, tokens/s and peak
memory, one implementation per process. ``report``: DIR/summary.md, summary.json and a compact
table (printed last) from what the stages left in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

# The issue's targets (H200): one LoRA linear, and end to end against peft under the same Trainer.
TARGET_CONFIG = "cuda-bf16-N8192-K4096-D4096-r16-p0.1-fwdbwd"
TARGETS = {"ratio_to_floor": 1.10, "speedup_vs_eager": 1.4, "saved_over_target": 1.0, "e2e_throughput": 1.2, "e2e_memory": 0.8}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Case:
    """One configuration of one LoRA linear."""

    device: str
    dtype: str
    n: int  # tokens
    k: int  # in features
    d: int  # out features
    r: int
    p: float
    mode: str  # "fwd" (training forward) | "fwdbwd"

    @property
    def config(self) -> str:
        return f"{self.device}-{self.dtype}-N{self.n}-K{self.k}-D{self.d}-r{self.r}-p{self.p:g}-{self.mode}"


def grid(name: str) -> list[tuple[Case, tuple[str, ...]]]:
    """(config, implementations) in the order they are measured: the target first."""
    if name == "cpu":  # dry run: the PyTorch implementation at small sizes
        return [(Case("cpu", "fp32", 512, k, d, 16, p, "fwdbwd"), ("floor", "eager", "ours")) for k, d in ((512, 512), (512, 1376)) for p in (0.1, 0.0)]
    target = Case("cuda", "bf16", 8192, 4096, 4096, 16, 0.1, "fwdbwd")
    if name == "full":
        return [(Case("cuda", dt, n, k, d, r, p, m), ("floor", "eager", "ours", "compiled"))
                for dt in DTYPES for n in (2048, 8192, 16384) for k, d in ((4096, 4096), (4096, 11008), (11008, 4096))
                for r in (8, 16, 64) for p in (0.0, 0.1) for m in ("fwd", "fwdbwd")]
    plain = ("floor", "eager", "ours")
    # torch.compile last: its compile takes tens of seconds, so it runs only if that time is left
    mixed = ("grouped", "grouped_loop")  # a batch mixing 4 adapters (GroupedLora): one grouped op vs a loop of single ops
    return [(target, plain), (target, mixed), (replace(target, p=0.0, mode="fwd"), ("floor", *mixed)),
            (replace(target, mode="fwd"), plain), (replace(target, p=0.0), plain),
            (replace(target, r=64), plain), (replace(target, n=2048), plain), (replace(target, n=16384), plain),
            (replace(target, d=11008), plain), (replace(target, k=11008), plain), (replace(target, dtype="fp32"), plain),
            (target, ("compiled",))]


class PeftStyleLora(nn.Module):
    """peft's LoRA layer math: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``."""

    def __init__(self, base: nn.Linear, r: int, p: float) -> None:
        super().__init__()
        self.base = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        nn.init.normal_(self.lora_B.weight, std=0.02)  # B = 0 would time a different (all-zero) product
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling = 2.0  # lora_alpha = 2 r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class OpLora(nn.Module):
    """The same parameters through the fused op; the dropout key lives on the device."""

    def __init__(self, ref: PeftStyleLora, p: float) -> None:
        super().__init__()
        self.ref, self.p = ref, p
        self.register_buffer("rng", torch.tensor([1234, 0], dtype=torch.int64, device=ref.base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lightning_peft.ops import lora_linear

        ref = self.ref
        return lora_linear(x, ref.base.weight, ref.base.bias, ref.lora_A.weight, ref.lora_B.weight,
                           scaling=ref.scaling, dropout_p=self.p, rng=self.rng, training=True)


class GroupedLora(nn.Module):
    """A batch of 8 rows mixing 4 adapters of rank r (rows [3, 0, 1, 2, 1, 3, 0, 2]): the grouped op
    (``grouped``) or a Python loop of single-adapter op calls on each adapter's rows (``grouped_loop``)."""

    def __init__(self, base: nn.Linear, r: int, p: float, loop: bool) -> None:
        super().__init__()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base, self.p, self.loop = base, p, loop
        self.a = nn.ParameterList([nn.Parameter(torch.randn(r, base.in_features, **factory) / base.in_features**0.5) for _ in range(4)])
        self.b = nn.ParameterList([nn.Parameter(torch.randn(base.out_features, r, **factory) * 0.02) for _ in range(4)])
        self.index = torch.tensor([3, 0, 1, 2, 1, 3, 0, 2])  # on the CPU: checked without a device sync
        self.rngs = [torch.tensor([1234 + j, 0], dtype=torch.int64, device=factory["device"]) for j in range(4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lightning_peft.ops import lora_linear, lora_linear_grouped

        rows = x.view(8, -1, x.shape[-1])
        if not self.loop:
            y = lora_linear_grouped(rows, self.base.weight, self.base.bias, list(self.a), list(self.b), scalings=[2.0] * 4,
                                    dropout_ps=[self.p] * 4, rngs=self.rngs, adapter_index=self.index, training=True)
            return y.view(x.shape[0], -1)
        y = rows.new_empty(8, rows.shape[1], self.base.out_features)
        for j in range(4):
            sel = (self.index == j).nonzero().flatten().to(x.device)
            y = y.index_copy(0, sel, lora_linear(rows[sel], self.base.weight, self.base.bias, self.a[j], self.b[j], scaling=2.0,
                                                 dropout_p=self.p, rng=self.rngs[j], training=True))
        return y.view(x.shape[0], -1)


def build(case: Case, impl: str):
    """(callable x -> y, x, the trainable parameters); random data everywhere (never zeros)."""
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    base = nn.Linear(case.k, case.d, bias=False, device=case.device, dtype=dtype).requires_grad_(False)
    x = torch.randn(case.n, case.k, device=case.device, dtype=dtype, requires_grad=case.mode == "fwdbwd")
    if impl == "floor":
        return base, x, []
    if impl in ("grouped", "grouped_loop"):
        mixed = GroupedLora(base, case.r, case.p, loop=impl == "grouped_loop")
        return mixed, x, [*mixed.a, *mixed.b]
    lora = PeftStyleLora(base, case.r, case.p).train()
    params = [lora.lora_A.weight, lora.lora_B.weight]
    fn = {"eager": lora, "compiled": torch.compile(lora, dynamic=False), "ours": OpLora(lora, case.p)}[impl]
    return fn, x, params


def saved_bytes_beyond_x(fn, x: torch.Tensor, known: list[torch.Tensor]) -> int:
    """Bytes of the storages autograd saves for backward, other than x's and the parameters'."""
    ptrs = {t.untyped_storage().data_ptr() for t in [x, *known]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in ptrs:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def measure(case: Case, impl: str, min_run_time: float) -> dict:
    from torch.utils.benchmark import Timer

    fn, x, params = build(case, impl)
    grad_y = torch.randn(case.n, case.d, device=case.device, dtype=DTYPES[case.dtype])
    wrt = [x, *params]

    def step():
        y = fn(x)
        if case.mode == "fwdbwd":
            torch.autograd.grad(y, wrt, grad_y)

    for _ in range(3):  # warm up: compiles, cuBLAS heuristics, the allocator, the JIT load
        step()
    m = Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time)
    frozen = [p for p in getattr(fn, "parameters", lambda: [])()]
    saved = saved_bytes_beyond_x(fn, x, frozen + params) if case.mode == "fwdbwd" else 0
    return {**asdict(case), "config": case.config, "impl": impl, "ms_per_call": m.median * 1e3, "ms_iqr": m.iqr * 1e3,
            "runs": len(m.times), "saved_bytes_beyond_x": saved, "saved_target_bytes": case.n * case.k // 8}


def add_ratios(rows: list[dict]) -> list[dict]:
    by_config: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["impl"]] = row
    for row in rows:
        floor, eager = by_config[row["config"]].get("floor"), by_config[row["config"]].get("eager")
        row["ratio_to_floor"] = row["ms_per_call"] / floor["ms_per_call"] if floor else None
        row["speedup_vs_eager"] = eager["ms_per_call"] / row["ms_per_call"] if eager else None
        row["saved_over_target"] = row["saved_bytes_beyond_x"] / row["saved_target_bytes"] if row["mode"] == "fwdbwd" else None
    return rows


def kernel_targets(rows: list[dict]) -> list[dict]:
    ours = next((r for r in rows if r["config"] == TARGET_CONFIG and r["impl"] == "ours"), None)
    if ours is None:
        return []
    checks = [("time / frozen base linear", "ratio_to_floor", "<="), ("speedup vs peft-style eager", "speedup_vs_eager", ">="),
              ("saved bytes beyond x / (N*K/8)", "saved_over_target", "<=")]
    out = []
    for label, key, op in checks:
        value, target = ours[key], TARGETS[key]
        ok = value is not None and (value <= target if op == "<=" else value >= target)
        out.append({"check": label, "value": value, "target": f"{op} {target}", "pass": ok})
    return out


def cmd_kernels(args) -> int:
    start = time.monotonic()
    if args.grid != "cpu":
        from lightning_peft.ops import cuda_backend

        if not cuda_backend.load():
            print(f"gpu_bench: the kernels did not load: {cuda_backend.status()['reason'][:300]}")
            return 1
    rows: list[dict] = []
    path = os.path.join(args.out, "kernels.json")
    for case, impls in grid(args.grid):
        for impl in impls:
            needed = 60 if impl == "compiled" else 0  # seconds a torch.compile takes, about
            if time.monotonic() - start + needed > args.budget_s:
                print(f"gpu_bench: budget of {args.budget_s:.0f} s spent; stopped before {case.config} {impl}")
                return 0
            rows.append(measure(case, impl, args.min_run_time))
            add_ratios(rows)
            with open(path, "w", encoding="utf-8") as fh:  # after every row: a kill at the limit keeps the data
                json.dump({"rows": rows, "targets": kernel_targets(rows)}, fh, indent=1)
            r = rows[-1]
            print(f"{r['config']:<46} {impl:<9} {r['ms_per_call']:9.4f} ms  x floor {_fmt(r['ratio_to_floor'], '.3f')}", flush=True)
    return 0


# ----------------------------------------------------------------------------- profile


def cmd_profile(args) -> int:
    from lightning_peft.ops import cuda_backend

    if not cuda_backend.load():
        print(f"gpu_bench: the kernels did not load: {cuda_backend.status()['reason'][:300]}")
        return 1
    case = Case("cuda", "bf16", 8192, 4096, 4096, 16, 0.1, "fwdbwd")
    nk = case.n * case.k
    must_move = {"dropout_hidden_kernel": 2 * nk + nk // 8, "dropout_grad_kernel": 4 * nk + nk // 8}  # bytes, bf16
    results = []
    for impl in ("floor", "eager", "ours"):
        fn, x, params = build(case, impl)
        grad_y = torch.randn(case.n, case.d, device="cuda", dtype=x.dtype)
        for _ in range(5):
            torch.autograd.grad(fn(x), [x, *params], grad_y)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                torch.autograd.grad(fn(x), [x, *params], grad_y)
            torch.cuda.synchronize()
        kernels = []
        for evt in prof.key_averages():
            us = float(getattr(evt, "device_time_total", 0.0) or 0.0) / args.iters
            if us > 0 and evt.count:
                row = {"kernel": evt.key, "us_per_step": us, "calls_per_step": evt.count // args.iters}
                for name, nbytes in must_move.items():
                    if name in evt.key:
                        row["achieved_GBps"] = nbytes / (us * 1e-6) / 1e9
                kernels.append(row)
        kernels.sort(key=lambda r: -r["us_per_step"])
        results.append({"impl": impl, "total_us_per_step": sum(r["us_per_step"] for r in kernels), "kernels": kernels})
        print(f"--- {impl}: {results[-1]['total_us_per_step']:.1f} us of kernels per fwd+bwd step ({case.config})")
        for r in kernels[:12]:
            bw = f"  [{r['achieved_GBps']:.0f} GB/s of the bytes it must move]" if "achieved_GBps" in r else ""
            print(f"  {r['us_per_step']:9.1f} us x{r['calls_per_step']:<2d} {r['kernel'][:90]}{bw}")
    with open(os.path.join(args.out, "profile.json"), "w", encoding="utf-8") as fh:
        json.dump({"config": case.config, "results": results}, fh, indent=1)
    return 0


# ----------------------------------------------------------------------------- end to end


def cmd_e2e(args) -> int:
    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    use_cuda = not args.cpu
    if use_cuda and not torch.cuda.is_available():
        print("gpu_bench e2e: no CUDA device (use --cpu --tiny for a dry run)")
        return 1
    device = torch.device("cuda" if use_cuda else "cpu")
    batch, seq, steps, warmup = (2, 64, 3, 1) if args.tiny else (4, 2048, 10, 3)
    widths = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4, vocab_size=512) if args.tiny \
        else dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    config = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=max(128, seq), **widths)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if args.impl == "frozen":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # something to differentiate
    else:
        lib = __import__("peft" if args.impl == "peft" else "lightning_peft")
        model = lib.get_peft_model(model, lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=modules))
    for param in model.parameters():  # fp32 adapters, as peft's autocast_adapter_dtype does
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    times: list[float] = []

    class LitLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch_, batch_idx):
            return self.model(input_ids=batch_, labels=batch_).loss

        def on_train_batch_start(self, batch_, batch_idx):
            if use_cuda:
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, outputs, batch_, batch_idx):
            if args.impl == "ours":  # a fresh dropout mask per step, as PEFTCallback does
                from lightning_peft import advance_dropout_rng

                advance_dropout_rng(self.model)
            if use_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self._t0)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, fused=use_cuda)

    data = torch.randint(0, config.vocab_size, ((warmup + steps) * batch, seq), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="gpu" if use_cuda else "cpu", devices=1, precision="bf16-mixed", max_steps=warmup + steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(LitLM(), torch.utils.data.DataLoader(data, batch_size=batch))
    step_s = statistics.median(times[warmup:])
    result = {
        "impl": args.impl, "device": torch.cuda.get_device_name() if use_cuda else "cpu", "torch": torch.__version__,
        "layers": args.layers, "tiny": args.tiny, "tokens_per_step": batch * seq, "steps_timed": len(times) - warmup,
        "step_ms_median": 1e3 * step_s, "step_ms_spread": 1e3 * (max(times[warmup:]) - min(times[warmup:])),
        "tokens_per_s": batch * seq / step_s,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if use_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_mem_kind": "cuda max_memory_allocated" if use_cuda else "process peak RSS",
    }
    print(f"e2e {args.impl:>6}: {result['tokens_per_s']:,.0f} tokens/s  step {result['step_ms_median']:.1f} ms  "
          f"peak {result['peak_mem_bytes'] / 2**30:.2f} GiB  ({result['device']}, {args.layers} layers)")
    with open(os.path.join(args.out, f"e2e_{args.impl}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return 0


# ----------------------------------------------------------------------------- report


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_stages(path: str) -> list[dict]:
    """``stages.tsv`` (gpu_check.sh): name, status, exit code, seconds, limit, note."""
    stages = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                name, status, rc, seconds, limit, note = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
                stages.append({"stage": name, "status": status, "rc": rc, "seconds": float(seconds or 0), "limit_s": limit, "note": note})
    return stages


def read_junit(path: str) -> dict:
    """Counts, failing test ids and skip reasons of a pytest --junitxml file."""
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skips = [], {}
    for suite in [root] if root.tag == "testsuite" else list(root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    failed.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "message": (node.get("message") or "")[:300]})
            skip = case.find("skipped")
            if skip is not None:
                skips[skip.get("message") or ""] = skips.get(skip.get("message") or "", 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": skips}


def build_summary(res: str) -> dict:
    kernels = _read_json(os.path.join(res, "kernels.json")) or {}
    ours, peft = _read_json(os.path.join(res, "e2e_ours.json")), _read_json(os.path.join(res, "e2e_peft.json"))
    e2e: dict = {"ours": ours, "peft": peft}
    if ours and peft and (ours.get("tiny") or peft.get("tiny")):
        e2e["note"] = "tiny dry run: not a measurement, targets not evaluated"
    elif ours and peft:
        e2e["throughput_ratio"] = ours["tokens_per_s"] / peft["tokens_per_s"]
        e2e["memory_ratio"] = ours["peak_mem_bytes"] / peft["peak_mem_bytes"]
        e2e["targets"] = [
            {"check": "e2e tokens/s vs peft", "value": e2e["throughput_ratio"], "target": f">= {TARGETS['e2e_throughput']}",
             "pass": e2e["throughput_ratio"] >= TARGETS["e2e_throughput"]},
            {"check": "e2e peak memory vs peft", "value": e2e["memory_ratio"], "target": f"<= {TARGETS['e2e_memory']}",
             "pass": e2e["memory_ratio"] <= TARGETS["e2e_memory"]},
        ]
    return {"environment": _read_json(os.path.join(res, "environment.json")), "stages": read_stages(os.path.join(res, "stages.tsv")),
            "tests": read_junit(os.path.join(res, "tests.xml")), "kernels": kernels.get("rows", []),
            "kernel_targets": kernels.get("targets", []), "e2e": e2e, "profile": _read_json(os.path.join(res, "profile.json"))}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    env = summary.get("environment") or {}
    lines = ["# GPU check", "", f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"commit {env.get('commit', '?')}, kernels: {env.get('kernels', '?')}", "",
             "| stage | status | exit | seconds | limit | note |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['rc']} | {s['seconds']:.0f} | {s['limit_s']} | {s['note']} |" for s in summary["stages"]]
    tests = summary["tests"]
    if tests:
        lines += ["", f"Tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped."]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failed"][:30]]
        lines += [f"- skipped x{n}: {reason}" for reason, n in tests["skip_reasons"].items()]
    if summary["kernels"]:
        lines += ["", "## One LoRA linear", "", "| config | impl | ms/call | x floor | x faster than eager | saved / (N*K/8) |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['config']} | {r['impl']} | {r['ms_per_call']:.4f} | {_fmt(r['ratio_to_floor'], '.3f')} | "
                  f"{_fmt(r['speedup_vs_eager'], '.2f')} | {_fmt(r['saved_over_target'], '.3f')} |" for r in summary["kernels"]]
    if summary.get("profile"):
        lines += ["", f"## Kernels per fwd+bwd step ({summary['profile']['config']})", ""]
        for res in summary["profile"]["results"]:
            lines.append(f"- **{res['impl']}**: {res['total_us_per_step']:.1f} us")
            lines += [f"    - {k['us_per_step']:.1f} us x{k['calls_per_step']} `{k['kernel'][:80]}`"
                      + (f" ({k['achieved_GBps']:.0f} GB/s)" if "achieved_GBps" in k else "") for k in res["kernels"][:10]]
    e2e = summary["e2e"]
    if e2e.get("ours") or e2e.get("peft"):
        lines += ["", "## End to end (Lightning, bf16-mixed)", "", "| impl | tokens/s | step ms | peak GiB |", "|---|---:|---:|---:|"]
        lines += [f"| {i} | {e2e[i]['tokens_per_s']:,.0f} | {e2e[i]['step_ms_median']:.1f} | {e2e[i]['peak_mem_bytes'] / 2**30:.2f} |"
                  for i in ("peft", "ours") if e2e.get(i)]
        if e2e.get("note"):
            lines += ["", e2e["note"]]
    checks = summary["kernel_targets"] + e2e.get("targets", [])
    if checks:
        lines += ["", "## Targets", ""] + [f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']} = {_fmt(c['value'], '.3f')} (target {c['target']})"
                                          for c in checks]
    return "\n".join(lines) + "\n"


def compact(summary: dict) -> str:
    env = summary.get("environment") or {}
    out = ["=" * 78, f"GPU CHECK  {env.get('gpu', '?')} | torch {env.get('torch', '?')} | kernels: {env.get('kernels', '?')}",
           f"{'stage':<11} {'status':<26} {'exit':>4} {'s':>5} {'limit':>5}  note"]
    out += [f"{s['stage']:<11} {s['status']:<26} {s['rc']:>4} {s['seconds']:>5.0f} {s['limit_s']:>5}  {s['note'][:40]}" for s in summary["stages"]]
    tests = summary["tests"]
    if tests:
        out.append(f"tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped")
        out += [f"  FAILED {f['test']}: {f['message'][:150]}" for f in tests["failed"][:10]]
    for r in summary["kernels"]:
        out.append(f"{r['config']:<46} {r['impl']:<9} {r['ms_per_call']:8.4f} ms x{_fmt(r['ratio_to_floor'], '.3f')}")
    if summary.get("profile"):
        out.append("profile (us of kernels per step): " + ", ".join(f"{r['impl']}={r['total_us_per_step']:.0f}" for r in summary["profile"]["results"]))
    for impl in ("peft", "ours"):
        r = summary["e2e"].get(impl)
        if r:
            out.append(f"e2e {impl:>5}: {r['tokens_per_s']:>10,.0f} tokens/s  step {r['step_ms_median']:.1f} ms  peak {r['peak_mem_bytes'] / 2**30:.2f} GiB")
    if summary["e2e"].get("note"):
        out.append(f"e2e: {summary['e2e']['note']}")
    out += [f"{'PASS' if c['pass'] else 'FAIL'}: {c['check']} = {_fmt(c['value'], '.3f')} (target {c['target']})"
            for c in summary["kernel_targets"] + summary["e2e"].get("targets", [])]
    return "\n".join(out)


def cmd_report(args) -> int:
    summary = build_summary(args.dir)
    with open(os.path.join(args.dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(args.dir, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(summary))
    print(compact(summary))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("kernels")
    p.add_argument("--out", required=True)
    p.add_argument("--grid", default="gpu" if torch.cuda.is_available() else "cpu", choices=["gpu", "full", "cpu"])
    p.add_argument("--budget-s", type=float, default=float("inf"), help="stop adding measurements after this long")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timed runs per measurement")
    p = sub.add_parser("profile")
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=10)
    p = sub.add_parser("e2e")
    p.add_argument("--impl", choices=["ours", "peft", "frozen"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny widths (dry run)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (dry run)")
    p.add_argument("--layers", type=int, default=2)
    p = sub.add_parser("report")
    p.add_argument("dir")
    args = parser.parse_args(argv)
    if hasattr(args, "out"):
        os.makedirs(args.out, exist_ok=True)
    return {"kernels": cmd_kernels, "profile": cmd_profile, "e2e": cmd_e2e, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

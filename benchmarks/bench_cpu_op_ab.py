"""In-process, interleaved A/B of the CPU LoRA op's dropout mechanisms on the reference workload.

Not a test (benchmarks/ is outside pytest's testpaths). One process builds the frozen floor model
and the LoRA model (GUIDE §6: tiny Llama 512/1376/4 layers, batch 8 x 256, fp32, 2 threads, r=8,
forward + backward), then times one step of the floor and of each variant in rotating order, so
machine drift (the machine is shared) hits all alike. It prints, per variant, the mean ± standard
error over rotations of its step / the floor step and of its step / the first variant's step, in
wall time and in the process's CPU time (all threads; steadier when other processes load the cores).

The differences at stake are 2-3% of a step: they need a quiet machine. Under load (5-8 runnable
processes on 2 cores, 2026-12-04) the ratios of repeated runs scattered by ±10%.

Variants (each the op as shipped, with one mechanism swapped out):

* ``positions``: the op as shipped (CPU drop positions; backward keeps the distances as bytes);
* ``replay``: backward keeps only the (seed, offset) key and draws the positions again;
* ``philox``: the non-CPU path on CPU: Philox packed keep-bits drawn with torch integer ops;
* ``dh_gb``: backward's ``d_hidden`` as ``g B`` (``[N, D] x [D, r]``) instead of ``(Bᵀ gᵀ)ᵀ``;
* ``dora``: not a mechanism but a method: the op as shipped under DoRA (``use_dora=True``), whose
  step over the ``positions`` step is DoRA's cost over LoRA (``--variants positions,dora``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_cpu_op_ab.py --targets all --reps 24
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_cpu_op_ab.py --targets qv --variants positions,replay
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import time
from typing import Iterator

import torch

VARIANTS = ("positions", "replay", "philox", "dh_gb", "dora")
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The op with the mechanism ``name`` swaps out (module attributes are looked up at each call)."""
    op = importlib.import_module("lightning_peft.ops.lora_linear")
    saved = op.encode_drop_positions, op._uses_drop_positions, op._d_hidden
    if name == "dh_gb":
        op._d_hidden = lambda g2, lora_b, alpha: torch.mm(g2, lora_b).mul_(alpha)
    elif name == "replay":  # numel 0: the distances never fit the 1-bit budget, so the key is kept
        op.encode_drop_positions = lambda increments, numel, rng: saved[0](increments, 0, rng)
    elif name == "philox":
        op._uses_drop_positions = lambda device: False
    try:
        yield
    finally:
        op.encode_drop_positions, op._uses_drop_positions, op._d_hidden = saved


def build(targets, p: float | None, dora: bool = False):
    """A step function (forward + backward) of the reference model: frozen floor when ``targets`` is None."""
    import transformers

    import lightning_peft

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config)
    if targets is None:
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        model = lightning_peft.get_peft_model(model, lightning_peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=targets,
                                                                                       use_dora=dora))
    model.train()
    ids = torch.randint(0, config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))

    def step() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    return step


def mean_se(values: list[float]) -> str:
    """Mean ± standard error, and the median (robust to the rotations another process disturbed)."""
    mean = sum(values) / len(values)
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.3f} ± {se:.3f} (med {sorted(values)[len(values) // 2]:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", choices=TARGETS, default="all")
    ap.add_argument("--p", type=float, default=0.1, help="lora_dropout")
    ap.add_argument("--reps", type=int, default=24, help="timed rotations (each times the floor and every variant once)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = ap.parse_args()
    torch.set_num_threads(2)
    floor, lora = build(None, None), build(TARGETS[args.targets], args.p)
    names = ["floor", *args.variants.split(",")]
    dora = build(TARGETS[args.targets], args.p, dora=True) if "dora" in names else None

    def timed(name: str) -> tuple[float, float]:
        if name == "floor":
            return floor()
        if name == "dora":
            return dora()
        with variant(name):
            return lora()

    for name in names * 2:  # warm-up
        timed(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(timed(name))
    first = names[1]
    print(f"targets {args.targets}, p={args.p}, {args.reps} rotations, torch {torch.__version__}, 2 threads")
    print(f"| variant | median wall step (s) | wall / floor | wall / {first} | CPU time / floor | CPU time / {first} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        walls = sorted(wall for wall, _ in times[name])
        ratios = [mean_se([a[i] / b[i] for a, b in zip(times[name], times[ref])]) for i in (0, 1) for ref in ("floor", first)]
        print(f"| {name} | {walls[len(walls) // 2]:.3f} | {ratios[0]} | {ratios[1]} | {ratios[2]} | {ratios[3]} |")


if __name__ == "__main__":
    main()

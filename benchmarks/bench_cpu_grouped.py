"""In-process, interleaved A/B of the grouped LoRA op (mixed-adapter batches) on CPU, one linear layer.

Not a test. Shapes: N = 8 rows x 128 tokens, (K, D) = (512, 512), (512, 1536) and (1536, 512),
4 adapters of rank 8, fp32; the rows' adapters are ``[0, 1, 2, 3, 0, 1, 2, 3]`` shuffled (unsorted).
Every variant is timed in rotating order within one process, so the shared machine's drift hits
all alike; the report is the median over rotations of each variant's time / its reference's time.

Inference (``torch.no_grad``, eval), reference: the frozen base forward ``F.linear(x, W, b)``,
each form of the grouped op forced (``lora_grouped.FORMS``):

* ``batched``: each batch row's own zero-padded factors in two batched GEMMs (``bmm``);
* ``stacked``: two whole-batch GEMMs of width sum r, other adapters' columns zeroed;
* ``segmented``: rows sorted by adapter, one GEMM pair per adapter's segment, rows put back.

``infer/token``: the same with a per-token adapter index (random, base tokens included), where
the batched form does not apply.

Training (forward + backward, dropout 0.1, grads of x and the factors), reference: the
single-adapter op on the same batch (every row the same adapter):

* ``grouped``: the grouped op with the 4 adapters;
* ``loop``: a Python loop of single-adapter op calls on each adapter's rows (gather + scatter).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_cpu_grouped.py --reps 20 --threads 1 --clock thread

Measured 2026-12-04 on the shared 2-core VM under load (load average 2-7: repeated runs moved the
ratios by up to +-0.1, so read ranges over three runs):

| K x D | infer: batched | stacked | segmented | per token: stacked | segmented | train: grouped | loop |
|---|---|---|---|---|---|---|---|
| 512 x 512 | 1.12-1.21 | 1.20-1.27 | 1.23-1.54 | 1.29-1.32 | 1.27-1.47 | 1.13-1.50 | 2.17-2.32 |
| 512 x 1536 | 1.09-1.14 | 1.15-1.19 | 1.22-1.42 | 1.17-1.19 | 1.21-1.28 | 1.07-1.28 | 2.17-2.42 |
| 1536 x 512 | 1.10-1.13 | 1.15-1.19 | 1.11-1.21 | 1.16-1.18 | 1.12-1.15 | 1.11-1.27 | 2.09-2.18 |

(infer: time / frozen base forward; train: time / single-adapter op, dropout 0.1.) The batched
form is the cheapest wherever it applies; for a per-token index the stacked and segmented forms
are within noise of each other at sum r = 32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from lightning_peft.ops import lora_grouped
from lightning_peft.ops.lora_linear import lora_linear

SHAPES = [(512, 512), (512, 1536), (1536, 512)]


def _time(fn: Callable[[], object], inner: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(inner):
        fn()
    return (clock() - start) / inner


def _forced(form: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the forward's form forced (``choose_form`` is looked up at each call)."""

    def run() -> object:
        saved = lora_grouped.choose_form
        lora_grouped.choose_form = lambda *args: form
        try:
            return fn()
        finally:
            lora_grouped.choose_form = saved

    return run


def cases(k: int, d: int, n_adapters: int = 4, rank: int = 8, rows: int = 8, tokens: int = 128) -> dict:
    """{group: ({variant: callable}, reference variant)} for one (K, D) shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, tokens, k, generator=g)
    w = torch.randn(d, k, generator=g) / k**0.5
    b = torch.randn(d, generator=g)
    a_s = [(torch.randn(rank, k, generator=g) / k**0.5).requires_grad_(True) for _ in range(n_adapters)]
    b_s = [(torch.randn(d, rank, generator=g) / rank**0.5).requires_grad_(True) for _ in range(n_adapters)]
    rngs = [torch.tensor([j + 1, 0]) for j in range(n_adapters)]
    index = torch.arange(rows) % n_adapters
    index = index[torch.randperm(rows, generator=g)]
    scalings = [2.0] * n_adapters

    def grouped(p: float, training: bool, xx: torch.Tensor) -> torch.Tensor:
        return lora_grouped.lora_linear_grouped(
            xx, w, b, a_s, b_s, scalings=scalings, dropout_ps=[p] * n_adapters, rngs=rngs, adapter_index=index, training=training
        )

    token_index = torch.randint(-1, n_adapters, (rows * tokens,), generator=g)

    def infer(form: str, per_token: bool = False) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                if per_token:
                    return lora_grouped.lora_linear_grouped(
                        x, w, b, a_s, b_s, scalings=scalings, dropout_ps=[0.1] * n_adapters, rngs=rngs, adapter_index=token_index, training=False
                    )
                return grouped(0.1, False, x)

        return _forced(form, run)

    def base() -> object:
        with torch.no_grad():
            return F.linear(x, w, b)

    def train_grouped() -> None:
        xx = x.detach().requires_grad_(True)
        grouped(0.1, True, xx).sum().backward()

    def train_single() -> None:
        xx = x.detach().requires_grad_(True)
        lora_linear(xx, w, b, a_s[0], b_s[0], scaling=2.0, dropout_p=0.1, rng=rngs[0], training=True).sum().backward()

    def train_loop() -> None:
        xx = x.detach().requires_grad_(True)
        y = F.linear(xx, w, b)  # base rows, then each adapter's rows replaced
        out = y.clone()
        for j in range(n_adapters):
            rows_j = (index == j).nonzero().flatten()
            out = out.index_copy(0, rows_j, lora_linear(xx[rows_j], w, b, a_s[j], b_s[j], scaling=2.0, dropout_p=0.1, rng=rngs[j], training=True))
        out.sum().backward()

    return {
        "infer": ({"base": base, **{form: infer(form) for form in lora_grouped.FORMS}}, "base"),
        "infer/token": ({"base": base, **{form: infer(form, True) for form in ("stacked", "segmented")}}, "base"),
        "train": ({"single": train_single, "grouped": train_grouped, "loop": train_loop}, "single"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--inner", type=int, default=5, help="calls per timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock", choices=("thread", "wall"), default="thread",
        help="thread: this thread's CPU time (with --threads 1 all the math runs on it; steadiest on a shared machine)",
    )
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, {args.reps} rotations x {args.inner} calls; N = 8 x 128 tokens, 4 adapters r = 8")
    for k, d in SHAPES:
        groups = cases(k, d)
        for label, (variants, ref) in groups.items():
            names = list(variants)
            for fn in variants.values():  # warm-up
                fn()
            times: Dict[str, list] = {name: [] for name in names}
            for rep in range(args.reps):
                for i in range(len(names)):
                    name = names[(i + rep) % len(names)]
                    times[name].append(_time(variants[name], args.inner, clock))
            ratios = {
                name: statistics.median(t / r for t, r in zip(times[name], times[ref])) for name in names if name != ref
            }
            ref_ms = statistics.median(times[ref]) * 1e3
            body = ", ".join(f"{name} {ratio:.3f}x" for name, ratio in ratios.items())
            print(f"K={k:4d} D={d:4d} {label:11s}: {ref} {ref_ms:.3f} ms; {body} (median of per-rotation ratios)")


if __name__ == "__main__":
    main()

"""Microbenchmarks of one LoRA linear: the frozen base linear (floor), peft-style eager LoRA,
torch.compile'd eager LoRA, and ours (the ``lightning_peft::lora_linear_*`` ops), in one run.

Not part of the test suite (pytest.ini's testpaths is tests/). Run::

    python -m pytest benchmarks/bench_kernels.py --benchmark-json=bench.json -q
    python benchmarks/bench_kernels_report.py bench.json          # ratio table (markdown + JSON)

Grids (``LP_BENCH_GRID``): ``gpu`` (default with a GPU: a reduced but representative subset,
the target config included), ``full`` (tokens {2048, 8192, 16384} x (K, D) {(4096, 4096),
(4096, 11008), (11008, 4096)} x r {8, 16, 64} x p {0, 0.1} x {bf16, fp32} x {fwd, fwd+bwd}:
hundreds of cases and a torch.compile each, opt-in), ``cpu`` (default without a GPU: the PyTorch
fallback at small sizes). ``LP_BENCH_COMPILE=0`` drops the compiled variant, ``=1`` forces it
(the CPU grid leaves it out by default: inductor's C++ compile takes minutes on 2 cores).

pytest-benchmark's own table shows time per round (``inner`` calls, see extra_info); the report
divides. Each case records in ``extra_info``: milliseconds per call (CUDA events on GPU, median of the
rounds), and the bytes autograd saves for backward beyond x and the parameters (counted with
``torch.autograd.graph.saved_tensors_hooks``), next to the target N*K/8.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from lightning_peft.ops import cuda_backend, lora_linear

HAS_CUDA = torch.cuda.is_available()
GRID = os.environ.get("LP_BENCH_GRID") or ("gpu" if HAS_CUDA else "cpu")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ALPHA_OVER_R = 2.0  # lora_alpha = 2 r, the usual choice


@dataclass(frozen=True)
class Case:
    """One timed measurement: a configuration and an implementation."""

    device: str
    dtype: str
    n: int  # tokens
    k: int  # in features
    d: int  # out features
    r: int
    p: float
    mode: str  # "fwd" (training forward, autograd recording) | "fwdbwd"
    impl: str  # "floor" | "eager" | "compiled" | "ours" | "ours_post"

    @property
    def config(self) -> str:
        return f"{self.device}-{self.dtype}-N{self.n}-K{self.k}-D{self.d}-r{self.r}-p{self.p:g}-{self.mode}"

    @property
    def id(self) -> str:
        return f"{self.config}-{self.impl}"


def _compile_wanted(default: bool) -> bool:
    flag = os.environ.get("LP_BENCH_COMPILE")
    return default if flag is None else flag == "1"


def _impls(compiled: bool, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("floor", "eager") + (("compiled",) if compiled else ()) + ("ours",) + extra


def grid_cases(grid: str) -> list[Case]:
    """The cases of a grid (see the module docstring)."""
    cases: list[Case] = []
    if grid == "cpu":
        compiled = _compile_wanted(False)
        for (k, d) in ((512, 512), (512, 1376)):
            for p in (0.0, 0.1):
                for mode in ("fwd", "fwdbwd"):
                    cases += [Case("cpu", "fp32", 512, k, d, 16, p, mode, i) for i in _impls(compiled)]
        return cases
    if grid == "full":
        compiled = _compile_wanted(True)
        for dtype in ("bf16", "fp32"):
            for n in (2048, 8192, 16384):
                for (k, d) in ((4096, 4096), (4096, 11008), (11008, 4096)):
                    for r in (8, 16, 64):
                        for p in (0.0, 0.1):
                            for mode in ("fwd", "fwdbwd"):
                                cases += [Case("cuda", dtype, n, k, d, r, p, mode, i) for i in _impls(compiled)]
        return cases
    if grid != "gpu":
        raise ValueError(f"LP_BENCH_GRID must be gpu, full or cpu, got {grid!r}")
    compiled = _compile_wanted(True)
    target = Case("cuda", "bf16", 8192, 4096, 4096, 16, 0.1, "fwdbwd", "")
    variants = [
        (target, _impls(compiled, ("ours_post",))),  # the target config, with the A/B variant
        (Case(**{**asdict(target), "mode": "fwd"}), _impls(False, ("ours_post",))),  # one compile only: time
        (Case(**{**asdict(target), "p": 0.0}), _impls(False)),
        (Case(**{**asdict(target), "r": 64}), _impls(False)),
        (Case(**{**asdict(target), "n": 2048}), _impls(False)),
        (Case(**{**asdict(target), "n": 16384}), _impls(False)),
        (Case(**{**asdict(target), "d": 11008}), _impls(False)),
        (Case(**{**asdict(target), "k": 11008}), _impls(False)),
        (Case(**{**asdict(target), "dtype": "fp32"}), _impls(False)),
    ]
    for base, impls in variants:
        cases += [Case(**{**asdict(base), "impl": i}) for i in impls]
    return cases


CASES = grid_cases(GRID)


# ----------------------------------------------------------------------------- the implementations


class PeftStyleLora(nn.Module):
    """peft's LoRA layer math: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``."""

    def __init__(self, base: nn.Linear, r: int, p: float) -> None:
        super().__init__()
        self.base = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling = ALPHA_OVER_R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class OpLora(nn.Module):
    """The same parameters through the fused op; the dropout key lives on the device."""

    def __init__(self, ref: PeftStyleLora, p: float) -> None:
        super().__init__()
        self.ref = ref
        self.p = p
        self.register_buffer("rng", torch.tensor([1234, 0], dtype=torch.int64, device=ref.base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.ref
        return lora_linear(
            x, ref.base.weight, ref.base.bias, ref.lora_A.weight, ref.lora_B.weight,
            scaling=ref.scaling, dropout_p=self.p, rng=self.rng, training=self.training,
        )


def build(case: Case):
    """(callable x -> y, x, the trainable parameters) for a case; random data everywhere (never zeros)."""
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    base = nn.Linear(case.k, case.d, bias=False, device=case.device, dtype=dtype).requires_grad_(False)
    x = torch.randn(case.n, case.k, device=case.device, dtype=dtype, requires_grad=case.mode == "fwdbwd")
    if case.impl == "floor":
        return base, x, []
    lora = PeftStyleLora(base, case.r, case.p).train()
    nn.init.normal_(lora.lora_B.weight, std=0.02)  # B = 0 would time a different (all-zero) product
    params = [lora.lora_A.weight, lora.lora_B.weight]
    if case.impl == "eager":
        return lora, x, params
    if case.impl == "compiled":
        return torch.compile(lora, dynamic=False), x, params
    return OpLora(lora, case.p).train(), x, params


def saved_bytes_beyond_x(fn, x: torch.Tensor, params: list[torch.Tensor], frozen: list[torch.Tensor]) -> int:
    """Bytes of the storages autograd saves for backward, other than x's and the parameters'."""
    known = {t.untyped_storage().data_ptr() for t in [x, *params, *frozen]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _variant_and_fallback():
    """Each case starts from the default kernel variant; the CPU grid times the fallback."""
    cuda_backend.set_variant(post_add=False)
    yield
    cuda_backend.set_variant(post_add=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lora_linear(benchmark, case: Case):
    if case.device == "cuda" and not HAS_CUDA:
        pytest.skip("needs CUDA")
    if case.impl.startswith("ours") and case.device == "cuda":
        assert cuda_backend.load(), f"CUDA kernels did not load: {cuda_backend.status()}"
    cuda_backend.set_variant(post_add=case.impl == "ours_post")
    fn, x, params = build(case)
    frozen = [t for t in getattr(fn, "parameters", lambda: [])() if not t.requires_grad]
    grad_y = torch.randn(case.n, case.d, device=case.device, dtype=DTYPES[case.dtype])
    wrt = [x, *params]

    if case.mode == "fwd":
        def step():
            fn(x)
    else:
        def step():
            torch.autograd.grad(fn(x), wrt, grad_y)

    # Warm up (compiles, cuBLAS heuristics, allocator), then size the inner loop to ~20 ms a round.
    for _ in range(3):
        step()
    _sync(case.device)
    start = time.perf_counter()
    step()
    _sync(case.device)
    once = time.perf_counter() - start
    inner = max(1, min(50, int(0.02 / max(once, 1e-6))))
    samples: list[float] = []

    def one_round():
        if case.device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                step()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)

    rounds = 10 if case.device == "cuda" else 7
    benchmark.group = case.config
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)

    saved = saved_bytes_beyond_x(fn, x, params, frozen) if case.mode == "fwdbwd" else 0
    benchmark.extra_info.update(asdict(case))
    benchmark.extra_info.update(
        config=case.config,
        inner=inner,
        ms_per_call=statistics.median(samples),
        ms_spread=(max(samples) - min(samples)),
        saved_bytes_beyond_x=saved,
        saved_target_bytes=case.n * case.k // 8,
        kernels=cuda_backend.status()["source"] if case.impl.startswith("ours") else None,
    )
    assert math.isfinite(statistics.median(samples)) and statistics.median(samples) > 0

"""Reference pieces for the CUDA kernel tests, and CPU tests of those pieces themselves.

Helpers (imported by tests/test_cuda_lora_op.py): plain-eager LoRA in low precision, the
flash-attention tolerance rule, and an independent NumPy Philox4x32-10 that predicts the
kernels' mask bytes. The tests below check the helpers (they run everywhere, no GPU needed):
Philox against the published Random123 known-answer vectors, the reference mask's statistics,
and that the tolerance rule rejects a wrong result.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_peft.ops.dropout_mask import quantized_drop_probability, unpack_mask

_M32 = np.uint64(0xFFFFFFFF)


def fresh_seed() -> int:
    """A new seed per test run (inputs must be fresh); failures print it so they can be replayed."""
    return int.from_bytes(os.urandom(4), "little")


@contextlib.contextmanager
def kernel_debug_options(ops, poison: Optional[bool] = None, splits: Optional[int] = None, sm_count: Optional[int] = None,
                         schedule: Sequence[int] = ()) -> Iterator[None]:
    """The kernels' test-only switches (csrc/lora_ops.cpp ``set_debug_options``), restored on exit.

    ``ops``: ``torch.ops.lightning_peft_cuda`` (GPU) or an emulation build's namespace. ``poison``:
    outputs and workspaces start as NaN / 0xFF with guard tails checked after each call;
    ``splits``: force the split count (1: every block walks all its chunks / row tiles);
    ``sm_count``: plan for that many SMs; ``schedule`` (emulation only): [thread order, block
    order, seed] with orders 0 ascending, 1 descending, 2 shuffled. None leaves a switch as it is.
    """
    def value(v):
        return -1 if v is None else int(v)

    previous = ops.set_debug_options(value(poison), value(splits), value(sm_count), list(schedule))
    try:
        yield
    finally:
        ops.set_debug_options(previous[0], previous[1], previous[2], list(previous[3:]))


def nan_guarded(t: Tensor, guard: int = 64) -> Tensor:
    """A contiguous copy of ``t`` followed in memory by ``guard`` NaNs (0xFF for integer types):
    a kernel reading past the end of an input then produces NaN or a wrong mask, not a silent pass."""
    fill = float("nan") if t.is_floating_point() else 255
    buffer = torch.full((t.numel() + guard,), fill, dtype=t.dtype, device=t.device)
    buffer[: t.numel()].copy_(t.reshape(-1))
    return buffer[: t.numel()].view(t.shape)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011) on uint64 NumPy arrays holding 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # exact: both factors < 2**32
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def philox_mask_reference(seed: int, offset: int, rows: int, cols: int, p: float) -> Tensor:
    """Packed keep mask ``uint8 [rows, ceil(cols/8)]`` the CUDA kernels must produce.

    Byte b of row n comes from Philox4x32-10 with key = seed (lo, hi) and counter =
    (n * ceil(cols/8) + b as lo/hi words, offset lo, offset hi); its 8 bits are the 8 16-bit draws
    ``>= round(p * 65536)``, LSB first; bits past ``cols`` are 0.
    """
    kb = (cols + 7) // 8
    seed_u, offset_u = seed % (1 << 64), offset % (1 << 64)
    idx = np.arange(rows * kb, dtype=np.uint64)
    c0, c1 = idx & _M32, idx >> np.uint64(32)
    c2 = np.full_like(idx, offset_u & 0xFFFFFFFF)
    c3 = np.full_like(idx, offset_u >> 32)
    words = philox4x32_10(c0, c1, c2, c3, seed_u & 0xFFFFFFFF, seed_u >> 32)
    threshold = np.uint64(round(p * 65536))
    bits = np.zeros_like(idx)
    for j in range(8):
        draw = (words[j >> 1] >> np.uint64(16 * (j & 1))) & np.uint64(0xFFFF)
        bits |= (draw >= threshold).astype(np.uint64) << np.uint64(j)
    mask = bits.astype(np.uint8).reshape(rows, kb)
    if cols % 8:
        mask[:, -1] &= np.uint8((1 << (cols % 8)) - 1)
    return torch.from_numpy(mask)


def lora_eager(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], a: Tensor, b: Tensor, scaling: float,
               keep: Optional[Tensor], drop_p: float) -> Tensor:
    """Plain PyTorch LoRA in the inputs' own dtype (what the kernels must not be much worse than).

    ``keep``: bool ``[N, K]`` (None: no dropout). ``weight`` None: no base term. Dropout is applied as ``x * (1 / keep_prob)`` on kept
    elements, one rounding, like ``F.dropout``.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if keep is not None:
        x2 = torch.where(keep, x2 * (1.0 / (1.0 - quantized_drop_probability(drop_p))), torch.zeros((), dtype=x.dtype, device=x.device))
    lora = (x2 @ a.t()) @ b.t() * scaling
    if weight is None:  # the LoRA branch alone (the op's weight=None)
        y = lora if bias is None else lora + bias
    else:
        y = torch.nn.functional.linear(x.reshape(-1, k), weight, bias) + lora
    return y.reshape(*x.shape[:-1], b.shape[0])


def hidden_eager(x: Tensor, a: Tensor, keep: Optional[Tensor], drop_p: float) -> Tensor:
    """``lora_hidden`` computed the plain way in the inputs' dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if keep is not None:
        x2 = torch.where(keep, x2 * (1.0 / (1.0 - quantized_drop_probability(drop_p))), torch.zeros((), dtype=x.dtype, device=x.device))
    return x2 @ a.t()


def max_err(value: Tensor, ref: Tensor) -> float:
    """Largest absolute difference, computed in fp64; NaN anywhere counts as infinite."""
    diff = (value.double() - ref.double()).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def flash_rule_slack(ref: Tensor, dtype: torch.dtype) -> float:
    """The absolute slack of the rule: a few ulps of the largest reference value.

    Max-abs errors over small tensors are noisy (measured over random seeds on the emulated
    kernels: up to ~1.7 ulps above 2x eager in fp32 at 3 x 8, under 0.5 ulp in fp16/bf16), so
    fp32 gets 8 ulps (still 1000x below what a TF32 or half-precision shortcut would cost) and
    fp16/bf16 get 2.
    """
    ulps = 8.0 if dtype == torch.float32 else 2.0
    return ulps * torch.finfo(dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)


def assert_flash_rule(name: str, ours: Tensor, eager: Tensor, ref: Tensor, dtype: torch.dtype, context: str = "") -> None:
    """flash-attention's rule: max |ours - ref| <= 2 max |eager - ref| + slack (flash_rule_slack).

    ``ref`` is the fp64 recomputation from the same (low-precision) inputs and mask; ``eager`` is
    plain PyTorch in ``dtype``.
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)} {context}"
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} != {dtype} {context}"
    ours_err, eager_err = max_err(ours, ref), max_err(eager, ref)
    slack = flash_rule_slack(ref, dtype)
    assert ours_err <= 2.0 * eager_err + slack, (
        f"{name}: error vs fp64 {ours_err:.3e} > 2 x eager's {eager_err:.3e} + slack {slack:.1e} {context}"
    )


# ----------------------------------------------------------------------------- tests of the helpers


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Random123 tests/kat_vectors, "philox4x32 10" lines (the published known answers)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    out = philox4x32_10(*(np.array([c], dtype=np.uint64) for c in counter), *key)
    assert tuple(int(w[0]) for w in out) == expected


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_reference_mask_has_the_quantized_keep_rate_and_zero_padding(p):
    rows, cols = 300, 1003  # 1003 % 8 = 3: the last byte has 5 padding bits
    mask = philox_mask_reference(fresh_seed(), 7, rows, cols, p)
    keep = unpack_mask(mask, cols)
    expected = 1.0 - quantized_drop_probability(p)
    sigma = (expected * (1 - expected) / keep.numel()) ** 0.5
    assert abs(keep.float().mean().item() - expected) < 5 * sigma
    assert (mask[:, -1] >> 3).eq(0).all()  # bits past K are 0, like pack_mask's padding


def test_reference_mask_depends_on_seed_and_offset():
    base = philox_mask_reference(1, 0, 64, 64, 0.5)
    assert torch.equal(base, philox_mask_reference(1, 0, 64, 64, 0.5))
    assert not torch.equal(base, philox_mask_reference(2, 0, 64, 64, 0.5))
    assert not torch.equal(base, philox_mask_reference(1, 1, 64, 64, 0.5))


def test_flash_rule_accepts_eager_quality_and_rejects_a_wrong_result():
    g = torch.Generator().manual_seed(fresh_seed())
    ref = torch.randn(64, 64, dtype=torch.float64, generator=g)
    eager = ref.to(torch.bfloat16)
    assert_flash_rule("same as eager", eager.clone(), eager, ref, torch.bfloat16)
    wrong = eager.clone()
    wrong[3, 5] += 0.5
    with pytest.raises(AssertionError, match="error vs fp64"):
        assert_flash_rule("off by 0.5", wrong, eager, ref, torch.bfloat16)
    poisoned = eager.clone()
    poisoned[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_flash_rule("NaN", poisoned, eager, ref, torch.bfloat16)

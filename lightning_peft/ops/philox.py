"""The CUDA kernels' Philox keep-bit draw (csrc/philox.cuh) in plain torch integer ops, for any device.

The non-CPU fallback of the LoRA op draws its packed mask with :func:`philox_keep_mask`, so on a
GPU it gets bit-identical masks to the kernels, straight from the ``rng`` tensor on its device:
no ``.item()``, no host sync, nothing baked into a CUDA graph. Every 32-bit word lives in an
``int64`` tensor; products of two 32-bit words are split into 16-bit halves so that nothing
exceeds 2^49 (signed int64 overflow is undefined in the kernels torch runs).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["philox4x32_10", "philox_keep_mask"]

_M32 = 0xFFFFFFFF
# Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11); the Random123 constants.
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUNDS = 10


def _mul_hi_lo(m: int, c: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``m * c`` (``m`` a 32-bit constant, ``c`` int64 holding 32-bit words).

    With ``c = h·2^16 + l``: ``a = m·l`` and ``b = m·h`` are below 2^48, and
    ``m·c = a + b·2^16``, so hi = ``((a >> 16) + b) >> 16`` and lo = ``(a + (b mod 2^16)·2^16) mod 2^32``.
    """
    a = (c & 0xFFFF) * m
    b = (c >> 16) * m
    return ((a >> 16) + b) >> 16, (a + ((b & 0xFFFF) << 16)) & _M32


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcasting); returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(_PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return c0, c1, c2, c3


def philox_keep_mask(rng: Tensor, rows: int, cols: int, threshold: int) -> Tensor:
    """The packed keep mask the CUDA kernels draw: ``uint8 [rows, ceil(cols / 8)]``, on ``rng``'s device.

    Conventions of csrc/philox.cuh ``keep_byte``: mask byte ``i = n · ceil(cols/8) + b`` is one
    Philox4x32-10 call with key ``(seed lo, seed hi)`` and counter ``(i lo, i hi, offset lo, offset hi)``;
    bit ``j`` (LSB first) is 1 when the 16-bit lane ``(word[j // 2] >> 16 · (j % 2)) & 0xFFFF`` is
    ``>= threshold``; bits past ``cols`` are 0.

    Args:
        rng: ``int64 [2]`` = (seed, offset), read as unsigned 64-bit words on its own device.
        rows, cols: the mask covers an ``[rows, cols]`` input.
        threshold: ``dropout_mask.drop_threshold(p)``, in [0, 65535].
    """
    bytes_per_row = (cols + 7) // 8
    seed, offset = rng[0], rng[1]
    # & after >> : the arithmetic shift of a negative int64 fills with ones, the mask removes them.
    key = (seed & _M32, (seed >> 32) & _M32)
    index = torch.arange(rows * bytes_per_row, dtype=torch.int64, device=rng.device)
    counter = (index & _M32, index >> 32, offset & _M32, (offset >> 32) & _M32)
    words = philox4x32_10(counter, key)
    packed = torch.zeros(rows * bytes_per_row, dtype=torch.uint8, device=rng.device)
    for j in range(8):  # lane j: half j % 2 of word j // 2
        lane = (words[j // 2] >> (16 * (j % 2))) & 0xFFFF
        packed |= (lane >= threshold).to(torch.uint8) << j
    mask = packed.view(rows, bytes_per_row)
    if cols % 8:
        mask[:, -1] &= (1 << (cols % 8)) - 1
    return mask

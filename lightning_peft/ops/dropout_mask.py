"""Seeded dropout masks of the LoRA op: drop positions on CPU, packed keep-bits everywhere else.

Every mask comes from a *private* stream keyed by ``rng = int64 [2] (seed, offset)``: the same key
gives the same mask whatever else consumed the global RNG, and each element is dropped
independently with probability ``quantized_drop_probability(p)`` (within 2^-17 of p).

* **CPU: drop positions** (:func:`draw_drops`): the sorted flat indices of the dropped elements,
  drawn as geometric gaps from a keyed CPU generator, one random number per *drop*; the op masks
  with a copy plus ``index_fill_``. Backward keeps the distances between drops, one byte each, or,
  where that would cost more than a bit per element or a distance passes 255, the key to draw them
  again (:func:`encode_drop_positions`).
* **CPU with the compiled kernels: a hashed draw** (:func:`hashed_keep_mask`), one counter-based
  hash per 4 elements that csrc/cpu/lora_rows.cpp computes inside its passes over the rows; backward
  keeps only the key (:func:`encode_hash_key`) and draws again.
* **Other devices: packed keep-bits** (``philox.philox_keep_mask``), the CUDA kernels' layout:
  ``uint8 [N, ceil(K / 8)]``, bit ``j`` (least significant first) of byte ``b`` in row ``n`` is 1
  when element ``(n, 8 * b + j)`` is kept; padding bits past K are 0 (:func:`pack_mask`,
  :func:`unpack_mask`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_peft.ops.kernel_loader import ops_registered

__all__ = [
    "quantized_drop_probability",
    "drop_threshold",
    "draw_drops",
    "encode_drop_positions",
    "decode_drop_positions",
    "encode_hash_key",
    "decode_hash_key",
    "hashed_keep_mask",
    "is_hash_key",
    "pack_mask",
    "unpack_mask",
]

_INT16_LEVELS = 1 << 16


def drop_threshold(p: float) -> int:
    """``T = round(p * 65536)``, at most 65535: an element is dropped when its uniform 16-bit draw is below T.

    The cap keeps at least one keep level for p within 2^-17 of 1 (otherwise nothing would be kept
    and the 1 / keep-probability scale would be infinite). csrc/lora_ops.cpp computes the same.
    """
    return min(round(p * _INT16_LEVELS), _INT16_LEVELS - 1)


def quantized_drop_probability(p: float) -> float:
    """The drop probability both mask forms realise for a requested ``p``: ``drop_threshold(p) / 65536``.

    |error| <= 7.7e-6 (2^-17) for p < 1 - 2^-17. The kept values are scaled by
    ``1 / (1 - realised)``, keeping dropout unbiased.
    """
    return drop_threshold(p) / _INT16_LEVELS


def _generator_for(rng: Tensor) -> torch.Generator:
    """A CPU generator keyed by ``rng = int64 [2] (seed, offset)``; different keys, different streams."""
    seed, offset = (int(v) for v in rng.tolist())
    # Mix so that neighbouring (seed, offset) pairs give unrelated generator seeds.
    mixed = (seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 63)
    return torch.Generator(device="cpu").manual_seed(mixed)


# Uniform draws per batch of draw_drops: the expected drop count plus this many standard
# deviations (and a constant), so one batch nearly always covers all elements.
_POSITION_BATCH_SIGMAS = 6.0
_POSITION_BATCH_EXTRA = 16
_INT31_LEVELS_LOG = 31 * math.log(2.0)


def draw_drops(numel: int, p: float, rng: Tensor) -> tuple[Tensor, Tensor]:
    """The dropped elements among ``numel``, each dropped independently with probability
    ``q = quantized_drop_probability(p)``: ``(positions, increments)``, both ``int64 [n_dropped]``.

    ``positions`` are the sorted flat indices of the drops, ``increments`` the first position then
    each position minus the previous one (>= 1), so ``positions = increments.cumsum(0)``.

    How: the gap before the next drop is geometric, ``P(gap >= g) = (1 - q)^g``, and
    ``gap = floor(log U / log(1 - q))`` for U uniform in (0, 1] is exactly that. U is
    ``(v + 1) / 2^31`` for a 31-bit draw ``v`` of the keyed generator, and the gaps are summed in
    float64 / int64, so the only departure from exact i.i.d. Bernoulli(q) drops is U's 2^-31 grid.

    Args:
        numel: number of elements (row-major flat index of the ``[N, K]`` input).
        p: requested drop probability in [0, 1).
        rng: CPU ``int64 [2]`` tensor ``(seed, offset)``; same key, same drops.
    """
    q = quantized_drop_probability(p)
    if numel == 0 or q == 0.0:
        empty = torch.empty((0,), dtype=torch.int64)
        return empty, empty
    log_keep = math.log1p(-q)
    generator = _generator_for(rng)
    position_batches, increment_batches = [], []
    previous = -1  # position of the drop before this batch (-1: none yet)
    while True:
        expected = (numel - previous - 1) * q
        count = max(1, int(expected + _POSITION_BATCH_SIGMAS * math.sqrt(expected)) + _POSITION_BATCH_EXTRA)
        draws = torch.empty((count,), dtype=torch.int32).random_(generator=generator)  # v in [0, 2^31)
        # The distance between drops is gap + 1 = floor(ln U / ln(1 - q)) + 1
        # = floor((ln U + ln(1 - q)) / ln(1 - q)), with ln U = ln(v + 1) - 31 ln 2 (v + 1 is exact
        # in float64; log is ~2x faster than log1p). The quotient is >= 1: the truncating cast floors.
        log_u_plus_log_keep = draws.to(torch.float64).add_(1.0).log_().sub_(_INT31_LEVELS_LOG - log_keep)
        increments = log_u_plus_log_keep.div_(log_keep).to(torch.int64)
        increments[0] += previous  # the running sum starts from the previous drop
        positions = increments.cumsum(0)
        if previous >= 0:  # rare (a later batch): its first increment is the distance to that drop
            increments[0] -= previous
        inside = int(torch.searchsorted(positions, numel))
        position_batches.append(positions[:inside])
        increment_batches.append(increments[:inside])
        if inside < count:  # the last drop of this batch already lies past the end
            break
        previous = int(positions[-1])  # rare: the batch ended early; the stream continues
    if len(position_batches) == 1:
        return position_batches[0], increment_batches[0]
    return torch.cat(position_batches), torch.cat(increment_batches)


# First byte of an encoded CPU mask: how the rest is to be read.
_REPLAY_KEY, _DISTANCES_UINT8, _HASH_KEY = 0, 1, 2


def encode_drop_positions(increments: Tensor, numel: int, rng: Tensor) -> Tensor:
    """What backward keeps of a CPU mask: ``uint8 [1 + payload]``, never more than 1 bit per element.

    The first byte says what follows: the distances between drops (``increments`` of
    :func:`draw_drops`) as bytes, when there are at most ``numel / 8`` drops and every distance is at
    most 255 (p <= 1/8 in practice; 0.8 bits per element at p = 0.1); otherwise the 16 bytes of the
    ``(seed, offset)`` key, and backward draws the positions again.

    Measured: distances vs the key alone, step / floor 1.240 ± 0.009 vs 1.271 ± 0.011 (all-linear p=0.1) and 1.036 ± 0.007 vs 1.061 ± 0.008 (q,v) in a quiet-machine interleaved A/B (2026-11-29); rerun with `benchmarks/bench_cpu_op_ab.py --targets all|qv --variants positions,replay`.

    Args:
        increments: ``int64 [n_dropped]`` from :func:`draw_drops` with key ``rng``.
        numel: the number of elements the drops index.
        rng: the CPU ``int64 [2]`` key (copied: the layer advances its buffer in place).
    """
    n_dropped = increments.numel()
    if n_dropped * 8 <= numel and (n_dropped == 0 or int(increments.max()) <= 255):
        encoded = torch.empty((1 + n_dropped,), dtype=torch.uint8)
        encoded[0] = _DISTANCES_UINT8
        encoded[1:].copy_(increments)  # narrows while copying: one pass
        return encoded
    encoded = torch.empty((1 + 16,), dtype=torch.uint8)
    encoded[0] = _REPLAY_KEY
    encoded[1:] = rng.to(dtype=torch.int64, copy=True).view(torch.uint8)
    return encoded


def decode_drop_positions(encoded: Tensor, numel: int, p: float) -> Tensor:
    """Inverse of :func:`encode_drop_positions` and :func:`encode_hash_key`: the sorted ``int64 [n_dropped]`` drop positions."""
    if int(encoded[0]) == _HASH_KEY:
        seed, offset = decode_hash_key(encoded)
        if ops_registered("lightning_peft_cpu", "lora_rows_keep_mask"):
            keep = torch.ops.lightning_peft_cpu.lora_rows_keep_mask(seed, offset, 1, numel, p)  # compiled: same bits, faster
        else:
            keep = hashed_keep_mask(seed, offset, 1, numel, p)
        return (~keep).view(-1).nonzero().squeeze(1)
    if int(encoded[0]) == _REPLAY_KEY:
        return draw_drops(numel, p, encoded[1:].clone().view(torch.int64))[0]  # clone: aligned for the view
    return encoded[1:].cumsum(0, dtype=torch.int64)


def encode_hash_key(rng: Tensor) -> Tensor:
    """What backward keeps of a hashed CPU mask (:func:`hashed_keep_mask`): ``uint8 [17]``, a format
    byte and the 16 bytes of the ``(seed, offset)`` key (copied: the layer advances its buffer in place)."""
    encoded = torch.empty((1 + 16,), dtype=torch.uint8)
    encoded[0] = _HASH_KEY
    encoded[1:] = rng.to(dtype=torch.int64, copy=True).view(torch.uint8)
    return encoded


def decode_hash_key(encoded: Tensor) -> tuple[int, int]:
    """The ``(seed, offset)`` of an :func:`encode_hash_key` key."""
    seed, offset = encoded[1:].clone().view(torch.int64).tolist()  # clone: aligned for the view
    return int(seed), int(offset)


def is_hash_key(mask: Tensor) -> bool:
    """Whether a forward's CPU ``mask`` output is an :func:`encode_hash_key` key."""
    return mask.dim() == 1 and mask.numel() == 17 and int(mask[0]) == _HASH_KEY


_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on ``uint64`` arrays (numpy wraps uint64 products modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hashed_keep_mask(seed: int, offset: int, rows: int, cols: int, p: float) -> Tensor:
    """The keep mask ``bool [rows, cols]`` of csrc/cpu/lora_rows.cpp's hashed draw for key ``(seed, offset)``.

    A reference in numpy (the kernels compute the same inside their passes): with ``mix64``
    SplitMix64's finaliser and ``G = 0x9E3779B97F4A7C15``, ``key = mix64(seed + mix64(offset + G))``;
    flat element ``e`` (row-major) draws the 16 bits ``16 (e % 4) ..`` of ``mix64(key + (e // 4 + 1) G)``
    and is dropped when that draw is below ``drop_threshold(p)`` (all arithmetic modulo 2^64).
    """
    numel = rows * cols
    key = _key_of(seed, offset)
    counters = np.arange(1, (numel + 3) // 4 + 1, dtype=np.uint64)
    words = _mix64(np.uint64(key) + counters * np.uint64(_GAMMA))
    draws = words.astype("<u8").view("<u2")[:numel]
    keep = torch.from_numpy(draws >= drop_threshold(p))
    return keep.view(rows, cols)


def _key_of(seed: int, offset: int) -> int:
    """The 64-bit key of :func:`hashed_keep_mask` from a signed ``(seed, offset)`` pair."""
    inner = int(_mix64(np.array([(offset + _GAMMA) & _M64], dtype=np.uint64))[0])
    return int(_mix64(np.array([(seed + inner) & _M64], dtype=np.uint64))[0])


def pack_mask(keep: Tensor) -> Tensor:
    """Pack ``bool [N, K]`` into ``uint8 [N, ceil(K / 8)]`` (layout in the module docstring)."""
    rows, cols = keep.shape
    padded = torch.nn.functional.pad(keep.to(torch.uint8), (0, -cols % 8)).view(rows, (cols + 7) // 8, 8)
    bits = torch.arange(8, dtype=torch.uint8, device=keep.device)
    return (padded << bits).sum(-1, dtype=torch.uint8)  # distinct bits: the sum is their OR


def unpack_mask(mask: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_mask`: ``uint8 [N, ceil(K / 8)]`` -> ``bool [N, K]``."""
    bits = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask[..., None] >> bits) & 1).view(mask.shape[0], mask.shape[1] * 8)[:, :cols].bool()

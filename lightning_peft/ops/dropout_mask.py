"""Seeded dropout masks for the pure-PyTorch LoRA path: drawn sparse on CPU, 1 bit per element elsewhere.

Why not ``torch.nn.functional.dropout``: it draws one float per element from the global
generator (~5 ns/element on a CPU core), writes a byte per element and keeps it for backward.
Every mask here comes from a *private* generator keyed by ``(seed, offset)``, so the same key
always gives the same mask no matter what else consumed the global RNG, and each element is
dropped independently with probability ``quantized_drop_probability(p)`` (within 2^-17 of p).
Two forms, same distribution:

* **Drop positions** (:func:`draw_drops`, the CPU path): the sorted flat indices of the
  dropped elements, drawn as geometric gaps, so a draw costs O(p · numel) random numbers instead of
  O(numel); masking is a copy plus ``index_fill_`` at those positions. Backward keeps them as the
  distances between drops, 8 or 16 bits per drop, or, where that would cost more than one bit per
  element, just the key to draw them again (:func:`encode_drop_positions`).
* **Packed keep-bits** (:func:`draw_packed_keep_mask`, the layout the CUDA kernels produce): each
  element gets a uniform 16-bit number, compared bit-serially 64 lanes per word, and the mask comes
  out packed 8 elements per byte. Masking is a bitwise AND with "select bits"
  (:func:`unpack_mask_as_select_bits`, :func:`apply_select_bits`).

Bit layout (shared with the CUDA kernels): ``mask`` is ``uint8 [N, ceil(K / 8)]``; bit ``j``
(least significant first) of byte ``b`` in row ``n`` is 1 when element ``(n, 8 * b + j)`` is kept.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

__all__ = [
    "quantized_drop_probability",
    "drop_threshold",
    "Drops",
    "draw_drops",
    "draw_drop_positions",
    "encode_drop_positions",
    "decode_drop_positions",
    "keep_mask_from_positions",
    "draw_keep_mask",
    "draw_packed_keep_mask",
    "pack_mask",
    "unpack_mask",
    "unpack_mask_as_select_bits",
    "apply_select_bits",
    "mask_bytes_per_row",
]

_INT16_LEVELS = 1 << 16
_INT16_BITS = 16
# Multiplying a 64-bit word of eight 0/1 bytes by this gathers byte i into bit 56 + i
# (all partial products land on distinct bits, so nothing carries into the top byte).
_GATHER_BYTES = 0x0102040810204080


def _as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit constant as the signed value torch's int64 ops expect."""
    return value - (1 << 64) if value >= (1 << 63) else value


_REPLICATE_BYTE = 0x0101010101010101
_SELECT_BIT_I_OF_BYTE_I = _as_int64(0x8040201008040201)
_SEVEN_F = 0x7F7F7F7F7F7F7F7F


def drop_threshold(p: float) -> int:
    """``T = round(p * 65536)``, at most 65535: an element is dropped when its uniform 16-bit draw is below T.

    The cap keeps at least one keep level for p within 2^-17 of 1 (otherwise nothing would be kept
    and the 1 / keep-probability scale would be infinite). csrc/lora_ops.cpp computes the same.
    """
    return min(round(p * _INT16_LEVELS), _INT16_LEVELS - 1)


def quantized_drop_probability(p: float) -> float:
    """The drop probability the 16-bit draw realises for a requested ``p``: ``drop_threshold(p) / 65536``.

    |error| <= 7.7e-6 (2^-17) for p < 1 - 2^-17. The kept values are scaled by
    ``1 / (1 - realised)``, keeping dropout unbiased.
    """
    return drop_threshold(p) / _INT16_LEVELS


def mask_bytes_per_row(k: int) -> int:
    """Bytes of packed mask per row of ``k`` elements."""
    return (k + 7) // 8


def _generator_for(rng: torch.Tensor) -> torch.Generator:
    """A CPU generator keyed by ``rng = int64 [2] (seed, offset)``; different keys, different streams."""
    seed, offset = (int(v) for v in rng.tolist())
    # Mix so that neighbouring (seed, offset) pairs give unrelated generator seeds.
    mixed = (seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 63)
    return torch.Generator(device="cpu").manual_seed(mixed)


# Uniform draws per batch of draw_drop_positions: the expected drop count plus this many standard
# deviations (and a constant), so one batch nearly always covers all elements.
_POSITION_BATCH_SIGMAS = 6.0
_POSITION_BATCH_EXTRA = 16
_INT31_LEVELS_LOG = 31 * math.log(2.0)


class Drops(NamedTuple):
    """Where the drops of one mask are, in the two forms their users need: ``positions = increments.cumsum(0)``."""

    positions: torch.Tensor  # int64 [n_dropped]: sorted flat indices of the dropped elements
    increments: torch.Tensor  # int64 [n_dropped]: the first position, then each position minus the previous one (>= 1)


def draw_drops(numel: int, p: float, rng: torch.Tensor) -> Drops:
    """The dropped elements among ``numel``, each dropped independently with probability
    ``q = quantized_drop_probability(p)``, as sorted positions and the increments between them.

    How: the gap before the next drop is geometric, ``P(gap >= g) = (1 - q)^g``, and
    ``gap = floor(log U / log(1 - q))`` for U uniform in (0, 1] is exactly that. U is
    ``(v + 1) / 2^31`` for a 31-bit draw ``v`` of the keyed generator, and the gaps are summed in
    float64 / int64, so the only departure from exact i.i.d. Bernoulli(q) drops is U's 2^-31 grid.
    The cost is one random number per *drop* (0.1 per element at p = 0.1), not one per element.

    Args:
        numel: number of elements (row-major flat index of the ``[N, K]`` input).
        p: requested drop probability in [0, 1).
        rng: ``int64 [2]`` tensor ``(seed, offset)``; same key, same drops.
    """
    q = quantized_drop_probability(p)
    if numel == 0 or q == 0.0:
        empty = torch.empty((0,), dtype=torch.int64)
        return Drops(empty, empty)
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
        return Drops(position_batches[0], increment_batches[0])
    return Drops(torch.cat(position_batches), torch.cat(increment_batches))


def draw_drop_positions(numel: int, p: float, rng: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices ``int64 [n_dropped]`` of the dropped elements: ``draw_drops(...).positions``."""
    return draw_drops(numel, p, rng).positions


# First byte of an encoded drop-position mask: how the rest is to be read.
_REPLAY_KEY, _STEPS_UINT8, _STEPS_INT16 = 0, 1, 2
_STEP_DTYPES = {_STEPS_UINT8: torch.uint8, _STEPS_INT16: torch.int16}


def encode_drop_positions(
    positions: torch.Tensor, numel: int, rng: torch.Tensor, increments: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """What backward keeps of a drop-position mask: ``uint8 [1 + payload]``, never more than 1 bit per element.

    The first byte says what follows: the increments between consecutive drops (the first is the
    first position) as ``uint8`` or ``int16`` (8 or 16 bits per *drop*; 0.8 bits per element at
    p = 0.1), when every increment fits and that costs at most one bit per element; otherwise the
    16 bytes of the ``(seed, offset)`` key, and backward draws the positions again (drops too dense
    for 1 bit each, or too sparse for int16 increments, where drawing again is cheap).

    Args:
        positions: ``int64 [n_dropped]`` from :func:`draw_drops` with key ``rng``.
        numel: the number of elements the positions index.
        rng: ``int64 [2]`` key the positions were drawn from.
        increments: the same drops' ``Drops.increments`` when at hand (saves recomputing them).
    """
    n_dropped = positions.numel()
    longest = None
    for tag, bits, limit in ((_STEPS_UINT8, 8, 255), (_STEPS_INT16, 16, 32767)):
        if n_dropped * bits > numel:
            continue  # more than one bit per element
        if longest is None:
            if increments is None:
                increments = torch.diff(positions, prepend=positions.new_zeros((1,)))
            longest = int(increments.max()) if n_dropped else 0
        if longest <= limit:
            encoded = torch.empty((1 + n_dropped * bits // 8,), dtype=torch.uint8)
            encoded[0] = tag
            if tag == _STEPS_UINT8:
                encoded[1:].copy_(increments)  # narrows while copying: one pass
            else:  # int16 bytes cannot be viewed at the odd offset 1, so narrow first
                encoded[1:] = increments.to(torch.int16).view(torch.uint8)
            return encoded
    encoded = torch.empty((1 + 16,), dtype=torch.uint8)
    encoded[0] = _REPLAY_KEY
    encoded[1:] = rng.to(device="cpu", dtype=torch.int64, copy=True).view(torch.uint8)
    return encoded


def decode_drop_positions(encoded: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """Inverse of :func:`encode_drop_positions`: the sorted ``int64`` drop positions."""
    tag = int(encoded[0])
    if tag == _STEPS_UINT8:
        increments = encoded[1:]
    else:
        payload = encoded[1:].clone()  # aligned for the wider view
        if tag == _REPLAY_KEY:
            return draw_drop_positions(numel, p, payload.view(torch.int64))
        increments = payload.view(_STEP_DTYPES[tag])
    return increments.cumsum(0, dtype=torch.int64)


def keep_mask_from_positions(positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``bool [rows, cols]``: False at the flat ``positions`` of :func:`draw_drop_positions`, True elsewhere."""
    keep = torch.ones(rows * cols, dtype=torch.bool, device=positions.device)
    keep[positions] = False
    return keep.view(rows, cols)


def draw_packed_keep_mask(rows: int, cols: int, p: float, rng: torch.Tensor) -> torch.Tensor:
    """Draw a keep-mask with drop probability ``quantized(p)``, directly in packed form.

    Returns ``uint8 [rows, ceil(cols / 8)]`` (layout in the module docstring; padding bits 0).

    How: every element gets a uniform 16-bit number ``u`` and is dropped when ``u < T`` with
    ``T = round(p * 65536)``. Bit i of the ``u`` of 64 neighbouring elements comes from one random
    64-bit word ``R_i``, so "u < T" for all 64 lanes at once is the textbook bit-serial comparison
    against the constant T, least significant bit first: ``lt = R_i | lt`` where T has a 1 and
    ``lt = R_i & lt`` where it has a 0 (R_i plays the role of NOT u_i, equally uniform). That is
    16 random bits per element, as a per-element int16 draw would use, but without any
    per-element compare or packing pass: the 64-bit words of ``~lt`` already are the packed mask.

    Args:
        rows, cols: mask shape.
        p: requested drop probability in (0, 1).
        rng: ``int64 [2]`` tensor ``(seed, offset)``; same key, same mask.
    """
    bytes_per_row = mask_bytes_per_row(cols)
    n_bytes = rows * bytes_per_row
    n_words = (n_bytes + 7) // 8
    threshold = drop_threshold(p)
    if threshold == 0:  # p < 2^-17 quantizes to "never drop"
        keep = torch.full((rows, bytes_per_row), 0xFF, dtype=torch.uint8)
        if cols % 8:
            keep[:, -1] = (1 << (cols % 8)) - 1
        return keep
    # Below T's lowest set bit, lt stays 0 (lt & R = 0) whatever those bits of u are, so they
    # are never drawn: p = 0.1 (T = 6554) needs 15 words per 64 elements, p = 0.5 only one.
    lowest = (threshold & -threshold).bit_length() - 1
    # Full int64 range: plain random_() leaves the sign bit 0. Row j holds bit (lowest + j).
    bit_words = torch.empty((_INT16_BITS - lowest, n_words), dtype=torch.int64).random_(
        -(2**63), None, generator=_generator_for(rng)
    )
    below = bit_words[0].clone()
    for row, bit in enumerate(range(lowest + 1, _INT16_BITS), start=1):
        if (threshold >> bit) & 1:
            below.bitwise_or_(bit_words[row])
        else:
            below.bitwise_and_(bit_words[row])
    keep = below.bitwise_not_().view(torch.uint8)[:n_bytes].view(rows, bytes_per_row)
    if cols % 8:
        keep[:, -1] &= (1 << (cols % 8)) - 1  # padding bits past K are 0, like pack_mask's
    return keep


def draw_keep_mask(rows: int, cols: int, p: float, rng: torch.Tensor) -> torch.Tensor:
    """The mask of :func:`draw_packed_keep_mask` unpacked: ``bool [rows, cols]`` (for inspection and tests)."""
    return unpack_mask(draw_packed_keep_mask(rows, cols, p, rng), cols)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Pack ``bool [N, K]`` into ``uint8 [N, ceil(K / 8)]`` (layout in the module docstring)."""
    rows, cols = keep.shape
    padded_cols = mask_bytes_per_row(cols) * 8
    if padded_cols != cols or not keep.is_contiguous():
        padded = torch.zeros(rows, padded_cols, dtype=torch.bool, device=keep.device)
        padded[:, :cols] = keep
        keep = padded
    eight_bytes = keep.view(torch.int64)  # [N, K/8]: each word holds eight 0/1 bytes
    return ((eight_bytes * _GATHER_BYTES) >> 56).to(torch.uint8)


def unpack_mask(mask: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``uint8 [N, ceil(K / 8)]`` -> ``bool [N, K]`` (a view when K % 8 == 0)."""
    words = mask.to(torch.int64) * _REPLICATE_BYTE  # byte i of each word = the packed byte
    words &= _SELECT_BIT_I_OF_BYTE_I  # byte i keeps only its bit i: 0 or 2**i
    words += _SEVEN_F  # byte i: bit 7 set iff bit i was set (no carries: max 0x80 + 0x7F)
    words >>= 7
    words &= _REPLICATE_BYTE
    keep = words.view(torch.bool)
    return keep if keep.shape[1] == cols else keep[:, :cols]


# Masking with torch.where(keep, x, 0) runs at about half the speed of a vectorised bitwise AND
# on CPU, so the LoRA op masks through "select bits": an integer tensor as wide as the float
# dtype holding all ones (keep) or 0 (drop), ANDed with the float's bit pattern.
_SELECT_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _select_bits_dtype(dtype: torch.dtype) -> torch.dtype:
    return _SELECT_BITS_DTYPE[dtype.itemsize]


_SELECT_BITS_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _select_bits_table(int_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8]`` table: row b holds the select bits of packed byte b (bit j -> column j)."""
    key = (int_dtype, device)
    table = _SELECT_BITS_TABLES.get(key)
    if table is None:
        bit_of_byte = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        table = _SELECT_BITS_TABLES[key] = bit_of_byte.neg().to(device=device, dtype=int_dtype)
    return table


def unpack_mask_as_select_bits(mask: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed ``uint8 [N, ceil(K / 8)]`` -> select bits ``[N, K]`` for ``dtype`` (-1 keep, 0 drop)."""
    # One table lookup per packed byte writes its 8 select values: half the time of bit tricks
    # followed by a widening copy.
    rows, packed = mask.shape
    table = _select_bits_table(_select_bits_dtype(dtype), mask.device)
    bits = table.index_select(0, mask.reshape(-1).to(torch.int64)).view(rows, packed * 8)
    return bits if packed * 8 == cols else bits[:, :cols]


def apply_select_bits(values: torch.Tensor, select_bits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` where kept, +0.0 where dropped (``values [N, K]`` float, ``select_bits`` from above).

    Bitwise, so a dropped inf or NaN becomes exactly 0 like ``torch.where`` would make it.
    ``out`` (same shape and dtype as ``values``, may be ``values`` itself) receives the result.
    """
    int_dtype = select_bits.dtype
    target = torch.empty(values.shape, dtype=values.dtype, device=values.device) if out is None else out
    torch.bitwise_and(values.view(int_dtype), select_bits, out=target.view(int_dtype))
    return target

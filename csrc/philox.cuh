// Philox4x32-10 counter-based RNG and the dropout keep-bits derived from it.
//
// Why counter-based: the keep bit of element (n, k) is a pure function of
// (seed, offset, n, k / 8), so any kernel with any tiling (and a replay of the same CUDA graph
// with a new seed in the rng tensor) gets the same or a fresh mask without storing RNG state.
//
// One Philox call yields 128 bits = eight 16-bit draws = the 8 keep bits of one mask byte.
// Element j of the byte is kept when its draw u (uniform on 0..65535) satisfies u >= p16, with
// p16 = round(p * 65536): the same quantized drop probability as the CPU path
// (lightning_peft/ops/dropout_mask.py), so both backends have identical statistics.
#pragma once

#include <cstdint>

#ifdef LIGHTNING_PEFT_EMULATE
#include "emulation/cuda_emulation.h"  // __umulhi & co. on the CPU (tests only)
#endif

namespace lightning_peft_cuda {

// Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11); the Random123 constants.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

/// Philox4x32 with key (k0, k1) applied to counter c; returns four 32-bit words.
__device__ __forceinline__ uint4 philox4x32(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint32_t hi0 = __umulhi(kPhiloxM0, c.x);
    const uint32_t lo0 = kPhiloxM0 * c.x;
    const uint32_t hi1 = __umulhi(kPhiloxM1, c.z);
    const uint32_t lo1 = kPhiloxM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

/// The (seed, offset) pair read on device from the module's int64[2] rng tensor (no host sync,
/// so CUDA graphs replay with whatever the buffer holds at replay time).
struct RngKey {
  uint32_t seed_lo, seed_hi, offset_lo, offset_hi;
};

__device__ __forceinline__ RngKey load_rng_key(const int64_t* rng) {
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  return RngKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(offset),
                static_cast<uint32_t>(offset >> 32)};
}

/// Keep bits of mask byte number `byte_index` (= n * ceil(K/8) + k/8): bit j (LSB first) is 1 when
/// element 8 * (byte_index mod ceil(K/8)) + j of row n is kept. Bits past K are the caller's job.
__device__ __forceinline__ uint32_t keep_byte(const RngKey& key, uint64_t byte_index, uint32_t p16) {
  const uint4 c = make_uint4(static_cast<uint32_t>(byte_index), static_cast<uint32_t>(byte_index >> 32),
                             key.offset_lo, key.offset_hi);
  const uint4 w = philox4x32(c, key.seed_lo, key.seed_hi);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t draw = (words[j >> 1] >> ((j & 1) * 16)) & 0xFFFFu;
    bits |= static_cast<uint32_t>(draw >= p16) << j;
  }
  return bits;
}

}  // namespace lightning_peft_cuda

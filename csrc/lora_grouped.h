// Host-side entry points of the grouped (mixed-adapter, SGMV-style) LoRA kernels. Plain pointers
// and sizes only, like lora_kernels.h; csrc/lora_grouped_ops.cpp owns the tensors and checks.
//
// A batch of N tokens, sorted by adapter: `order` (int64 [U]) lists the units (batch rows of T
// tokens each, or single tokens with T = 1) stably sorted by adapter, `offsets` (int64 [n + 1])
// where each adapter's units start in it (offsets[0] = the base-only units before adapter 0).
// Sorted token s is original token order[s / T] * T + s % T; adapter g owns the sorted tokens
// [T * offsets[g], T * offsets[g + 1]). Everything is read on the device: no host sync, so the
// launches are CUDA-graph safe (grids are sized by an upper bound, idle blocks exit).
//
// Per-adapter factors arrive stacked and zero-padded to R = max rank: W [n, R_or_D, R_or_K].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lora_kernels.h"

namespace lightning_peft_cuda {

constexpr int kMaxGroups = 64;  // adapters per call the kernels take (more: the PyTorch path)

/// Per-adapter constants, passed by value (no host-to-device copy per call).
struct GroupTable {
  int n;                      // adapters
  int rank[kMaxGroups];       // r_g <= R
  float scale[kMaxGroups];    // multiplier of the adapter's result
  uint32_t p16[kMaxGroups];   // drop threshold (0: no dropout / no mask for this adapter)
};

struct Segments {
  const int64_t* order;    // [U] on the device
  const int64_t* offsets;  // [n + 1] on the device
  int64_t T;               // tokens per unit
  int64_t N;               // tokens
};

/// out[s, c] = scale_g * sum_k (in[orig(s), k] * keep_g(s, k)) * w[g, c, k] for the sorted rows s
/// of every adapter g, c < R (0 past r_g). With dropout for g (`rngs` non-null and p16_g > 0) the
/// keep bits are drawn from Philox keyed by rngs[g] = (seed, offset) over g's sub-batch, exactly as
/// the single-adapter kernel draws them for that sub-batch (row i of the sub-batch = mask byte
/// row i), and written packed to mask[s, :]. Base rows (and the mask of adapters without dropout)
/// are left untouched: the caller zeroes them.
struct ShrinkArgs {
  const void* in;  // [N, K] original order, unit column stride, row stride ld_in
  int64_t ld_in, K;
  const void* w;  // [n, R, K] contiguous
  int64_t R;
  const int64_t* rngs;  // [n, 2] or nullptr (no dropout anywhere)
  uint8_t* mask;        // [N, ceil(K/8)] sorted order, or nullptr
  void* out;            // [N, R] sorted order, contiguous
};

void launch_grouped_shrink(ElementType type, const Segments& seg, const GroupTable& table, const ShrinkArgs& args,
                           cudaStream_t stream);

/// out[orig(s), d] = (bias[d] + scale_g * sum_c h[s, c] * w[g, d, c]) * keep_g(s, d) for every
/// sorted row s, the base rows included (bias or 0). keep comes from `mask` (sorted order) for
/// adapters with p16_g > 0 when `mask` is given (the backward's grad_x), else 1.
struct ExpandArgs {
  const void* h;  // [N, R] sorted order, contiguous
  int64_t R;
  const void* w;  // [n, D, R] contiguous
  int64_t D;
  const void* bias;     // [D] or nullptr
  const uint8_t* mask;  // [N, ceil(D/8)] sorted order, or nullptr
  void* out;            // [N, D] original order, contiguous
};

void launch_grouped_expand(ElementType type, const Segments& seg, const GroupTable& table, const ExpandArgs& args,
                           cudaStream_t stream);

/// out[g, c, k] = scale_g * sum over g's sorted rows s of left[s, c] * right[orig(s), k] * keep_g(s, k)
/// (fp32, every element written: zeros for an adapter without rows). One block per (64 columns,
/// adapter) walks the adapter's rows in order: deterministic, no atomics.
struct SegmentGradArgs {
  const void* left;  // [N, R] sorted order, contiguous
  int64_t R;
  const void* right;  // [N, C] original order, unit column stride, row stride ld_right
  int64_t ld_right, C;
  const uint8_t* mask;  // [N, ceil(C/8)] sorted order, or nullptr
  float* out;           // [n, R, C] contiguous
};

void launch_grouped_segment_grad(ElementType type, const Segments& seg, const GroupTable& table, const SegmentGradArgs& args,
                                 cudaStream_t stream);

}  // namespace lightning_peft_cuda

// Grouped (mixed-adapter) LoRA kernels in the style of Punica's SGMV / vLLM's lora_shrink and
// lora_expand: a batch sorted by adapter into segments (csrc/lora_grouped.h), one launch for all
// adapters.
//
//   shrink:        out[s, :] = scale_g * (in[orig(s)] ∘ keep_g) · W_gᵀ   (forward: dropout + x·Aᵀ,
//                  drawing the Philox keep bits; backward: d_h = s·ks·dy·B)
//   expand:        out[orig(s), :] = (bias + scale_g * h[s] · W_gᵀ) ∘ keep_g  (forward: y's LoRA term
//                  for every row, base rows = bias; backward: grad_x's LoRA term)
//   segment_grad:  out[g] = scale_g * Σ_{s ∈ g} left[s]ᵀ (right[orig(s)] ∘ keep_g)  (grad_a, grad_b)
//
// Plain FMA tiles with fp32 accumulation for fp32 / fp16 / bf16 inputs, 128 threads, operands
// staged as fp32 in padded shared memory (row stride 33 floats: column walks are conflict-free).
// Simple by design: the grouped op's bulk is the base GEMM (cuBLAS); these kernels move r-wide data.
#include <c10/cuda/CUDAException.h>

#include "lora_grouped.h"
#include "philox.cuh"
#include "tile_common.cuh"

namespace lightning_peft_cuda {
namespace {

constexpr int kGroupedRows = 64;         // rows (sorted tokens) of a tile
constexpr int kGroupedChunk = 32;        // reduction columns staged per step
constexpr int kGroupedLd = kGroupedChunk + 1;  // padded fp32 row of a staged chunk
constexpr int kGradRows = 32;            // rows per step of segment_grad
constexpr int kGradCols = 64;            // output columns of a segment_grad block
constexpr int kGradLd = kGradCols + 1;

static_assert(kThreads == 128, "the thread layouts below assume 128 threads");

struct GroupTile {
  int g;  // adapter, -1 for the base rows
  int64_t row0, row_end;
};

/// The (adapter, 64-row tile) of block `b`: tiles are numbered adapter by adapter (the base rows
/// first, as adapter -1, when `with_base`). False for the idle blocks of the upper-bound grid.
/// Every thread of a block gets the same answer, so an early return precedes every barrier.
__device__ __forceinline__ bool find_group_tile(const Segments& seg, int n, int64_t b, bool with_base, GroupTile& tile) {
  for (int g = with_base ? -1 : 0; g < n; ++g) {
    const int64_t start = g < 0 ? 0 : seg.T * seg.offsets[g];
    const int64_t end = seg.T * seg.offsets[g + 1];
    const int64_t tiles = (end - start + kGroupedRows - 1) / kGroupedRows;
    if (b < tiles) {
      tile.g = g;
      tile.row0 = start + b * kGroupedRows;
      tile.row_end = tile.row0 + kGroupedRows < end ? tile.row0 + kGroupedRows : end;
      return true;
    }
    b -= tiles;
  }
  return false;
}

/// The original token of sorted token s.
__device__ __forceinline__ int64_t original_row(const Segments& seg, int64_t s) {
  return seg.order[s / seg.T] * seg.T + s % seg.T;
}

/// Mask of the valid bits of the byte covering columns [col, col + 8) of a K-column row.
__device__ __forceinline__ uint32_t grouped_valid_bits(int64_t col, int64_t K) {
  const int64_t left = K - col;
  return left >= 8 ? 0xFFu : ((1u << left) - 1u);
}

// ---- shrink ----------------------------------------------------------------------------------

template <int RB> struct ShrinkSmem {
  static constexpr size_t kBytes = sizeof(float) * (kGroupedRows + RB) * kGroupedLd;
};

// Thread layout: output column c = tid % RB, rows rg, rg + G, ... (G = 128 / RB row groups), so a
// warp reads one x element (broadcast) and 32 consecutive, conflict-free W rows per step.
template <typename raw_t, int RF>
__global__ void __launch_bounds__(kThreads)
    grouped_shrink_kernel(Segments seg, GroupTable table, const raw_t* __restrict__ in, int64_t ld_in, int64_t K,
                          const raw_t* __restrict__ w, int64_t R, const int64_t* __restrict__ rngs, uint8_t* __restrict__ mask,
                          raw_t* __restrict__ out) {
  constexpr int RB = 16 * RF;
  constexpr int G = kThreads / RB;
  constexpr int kRowsPerThread = kGroupedRows / G;
  LIGHTNING_PEFT_DYNAMIC_SMEM(smem);
  float* xs = reinterpret_cast<float*>(smem);  // [64][kGroupedLd]: the masked input chunk
  float* ws = xs + kGroupedRows * kGroupedLd;  // [RB][kGroupedLd]: the adapter's W chunk

  GroupTile tile;
  if (!find_group_tile(seg, table.n, blockIdx.x, false, tile)) return;
  const int g = tile.g;
  const int r = table.rank[g];
  const uint32_t p16 = table.p16[g];
  const bool drop = rngs != nullptr && p16 > 0;
  RngKey key{0, 0, 0, 0};
  if (drop) key = load_rng_key(rngs + 2 * g);
  const int64_t seg_start = seg.T * seg.offsets[g];  // row 0 of the adapter's sub-batch
  const int64_t mask_ld = (K + 7) / 8;
  const int tid = threadIdx.x;
  const int c = tid % RB;
  const int rg = tid / RB;
  const raw_t* wg = w + static_cast<int64_t>(g) * R * K;

  float acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kGroupedChunk) {
    // 1. Input chunk, one mask byte (8 columns) per step: the keep bits of sub-batch row i and
    //    byte b are Philox(seed, offset; i * ceil(K/8) + b), the single-adapter kernel's counter.
    for (int q = tid; q < kGroupedRows * (kGroupedChunk / 8); q += kThreads) {
      const int row = q / (kGroupedChunk / 8);
      const int byte = q % (kGroupedChunk / 8);
      const int64_t s = tile.row0 + row;
      const int64_t col = k0 + 8 * byte;
      float v[8];
      uint32_t bits = 0u;
      if (s < tile.row_end && col < K) {
        const raw_t* src = in + original_row(seg, s) * ld_in;
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = col + e < K ? to_float(src[col + e]) : 0.0f;
        bits = 0xFFu;
        if (drop) {
          bits = keep_byte(key, static_cast<uint64_t>((s - seg_start) * mask_ld + col / 8), p16) & grouped_valid_bits(col, K);
          mask[s * mask_ld + col / 8] = static_cast<uint8_t>(bits);
        }
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) xs[row * kGroupedLd + 8 * byte + e] = ((bits >> e) & 1u) ? v[e] : 0.0f;
    }
    // 2. W chunk [RB, 32] (rows >= r and columns >= K are zero).
    for (int q = tid; q < RB * kGroupedChunk; q += kThreads) {
      const int j = q / kGroupedChunk;
      const int cc = q % kGroupedChunk;
      const int64_t col = k0 + cc;
      ws[j * kGroupedLd + cc] = (j < r && col < K) ? to_float(wg[j * K + col]) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kGroupedChunk; ++kk) {
      const float wv = ws[c * kGroupedLd + kk];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += xs[(rg + i * G) * kGroupedLd + kk] * wv;
    }
    __syncthreads();
  }
  if (c >= R) return;
  const float scale = table.scale[g];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t s = tile.row0 + rg + i * G;
    if (s < tile.row_end) out[s * R + c] = from_float<raw_t>(acc[i] * scale);
  }
}

// ---- expand ----------------------------------------------------------------------------------

constexpr size_t kExpandSmemBytes = sizeof(float) * 2 * kGroupedRows * kGroupedLd;

// Thread layout: output column d0 + (tid % 64), rows tid / 64 + 2i: a warp writes 32 consecutive
// columns of one row (coalesced) and reads one h element (broadcast) per step.
template <typename raw_t>
__global__ void __launch_bounds__(kThreads)
    grouped_expand_kernel(Segments seg, GroupTable table, const raw_t* __restrict__ h, int64_t R, const raw_t* __restrict__ w,
                          int64_t D, const raw_t* __restrict__ bias, const uint8_t* __restrict__ mask, raw_t* __restrict__ out) {
  constexpr int kRowsPerThread = kGroupedRows / 2;
  LIGHTNING_PEFT_DYNAMIC_SMEM(smem);
  float* hs = reinterpret_cast<float*>(smem);  // [64 rows][kGroupedLd]
  float* ws = hs + kGroupedRows * kGroupedLd;  // [64 columns][kGroupedLd]

  GroupTile tile;
  if (!find_group_tile(seg, table.n, blockIdx.x, true, tile)) return;
  const int g = tile.g;
  const int r = g < 0 ? 0 : table.rank[g];
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * 64;
  const int tid = threadIdx.x;
  const int col = tid % 64;
  const int rh = tid / 64;
  const raw_t* wg = g < 0 ? w : w + static_cast<int64_t>(g) * D * R;

  float acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.0f;

  for (int c0 = 0; c0 < r; c0 += kGroupedChunk) {  // r is the same for the whole block
    for (int q = tid; q < kGroupedRows * kGroupedChunk; q += kThreads) {
      const int row = q / kGroupedChunk;
      const int cc = q % kGroupedChunk;
      const int64_t s = tile.row0 + row;
      hs[row * kGroupedLd + cc] = (s < tile.row_end && c0 + cc < r) ? to_float(h[s * R + c0 + cc]) : 0.0f;
      const int64_t d = d0 + row;  // the same loop stages W's [64 columns, 32] chunk
      ws[row * kGroupedLd + cc] = (d < D && c0 + cc < r) ? to_float(wg[d * R + c0 + cc]) : 0.0f;
    }
    __syncthreads();
    for (int cc = 0; cc < kGroupedChunk; ++cc) {
      const float wv = ws[col * kGroupedLd + cc];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += hs[(rh + 2 * i) * kGroupedLd + cc] * wv;
    }
    __syncthreads();
  }
  const int64_t d = d0 + col;
  if (d >= D) return;
  const float scale = g < 0 ? 0.0f : table.scale[g];
  const float b = bias != nullptr ? to_float(bias[d]) : 0.0f;
  const bool masked = mask != nullptr && g >= 0 && table.p16[g] > 0;
  const int64_t mask_ld = (D + 7) / 8;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t s = tile.row0 + rh + 2 * i;
    if (s >= tile.row_end) continue;
    float v = acc[i] * scale + b;
    if (masked && !((mask[s * mask_ld + d / 8] >> (d % 8)) & 1u)) v = 0.0f;
    out[original_row(seg, s) * D + d] = from_float<raw_t>(v);
  }
}

// ---- segment_grad ----------------------------------------------------------------------------

template <int RB> struct GradSmem {
  static constexpr size_t kBytes = sizeof(float) * kGradRows * ((RB + 1) + kGradLd);
};

// Thread layout: output column k0 + (tid % 64), rank rows tid / 64 + 2i (i < RB / 2).
template <typename raw_t, int RF>
__global__ void __launch_bounds__(kThreads)
    grouped_segment_grad_kernel(Segments seg, GroupTable table, const raw_t* __restrict__ left, int64_t R,
                                const raw_t* __restrict__ right, int64_t ld_right, int64_t C, const uint8_t* __restrict__ mask,
                                float* __restrict__ out) {
  constexpr int RB = 16 * RF;
  constexpr int kLdLeft = RB + 1;
  constexpr int kRanksPerThread = RB / 2;
  LIGHTNING_PEFT_DYNAMIC_SMEM(smem);
  float* ls = reinterpret_cast<float*>(smem);  // [32 rows][RB + 1]
  float* rs = ls + kGradRows * kLdLeft;        // [32 rows][65]

  const int g = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kGradCols;
  const int tid = threadIdx.x;
  const int col = tid % kGradCols;
  const int rh = tid / kGradCols;
  const int64_t start = seg.T * seg.offsets[g];
  const int64_t end = seg.T * seg.offsets[g + 1];
  const bool masked = mask != nullptr && table.p16[g] > 0;
  const int64_t mask_ld = (C + 7) / 8;

  float acc[kRanksPerThread];
#pragma unroll
  for (int i = 0; i < kRanksPerThread; ++i) acc[i] = 0.0f;

  for (int64_t s0 = start; s0 < end; s0 += kGradRows) {
    for (int q = tid; q < kGradRows * kGradCols; q += kThreads) {
      const int row = q / kGradCols;
      const int kc = q % kGradCols;
      const int64_t s = s0 + row;
      const int64_t k = k0 + kc;
      float v = 0.0f;
      if (s < end && k < C) {
        v = to_float(right[original_row(seg, s) * ld_right + k]);
        if (masked && !((mask[s * mask_ld + k / 8] >> (k % 8)) & 1u)) v = 0.0f;
      }
      rs[row * kGradLd + kc] = v;
    }
    for (int q = tid; q < kGradRows * RB; q += kThreads) {
      const int row = q / RB;
      const int cc = q % RB;
      const int64_t s = s0 + row;
      ls[row * kLdLeft + cc] = (s < end && cc < R) ? to_float(left[s * R + cc]) : 0.0f;
    }
    __syncthreads();
    for (int row = 0; row < kGradRows; ++row) {
      const float rv = rs[row * kGradLd + col];
#pragma unroll
      for (int i = 0; i < kRanksPerThread; ++i) acc[i] += ls[row * kLdLeft + rh + 2 * i] * rv;
    }
    __syncthreads();
  }
  const int64_t k = k0 + col;
  if (k >= C) return;
  const float scale = table.scale[g];
#pragma unroll
  for (int i = 0; i < kRanksPerThread; ++i) {
    const int c = rh + 2 * i;
    if (c < R) out[(static_cast<int64_t>(g) * R + c) * C + k] = acc[i] * scale;
  }
}

unsigned grid_count(int64_t blocks) {
  TORCH_CHECK(blocks <= 0x7FFFFFFF, "lightning_peft_cuda: too many rows for one grouped launch");
  return static_cast<unsigned>(blocks);
}

/// Upper bound on the 64-row tiles of the adapters' segments (+1: the base rows' segment).
int64_t tile_bound(const Segments& seg, int groups) { return (seg.N + kGroupedRows - 1) / kGroupedRows + groups; }

}  // namespace

void launch_grouped_shrink(ElementType type, const Segments& seg, const GroupTable& table, const ShrinkArgs& args,
                           cudaStream_t stream) {
  if (seg.N == 0 || table.n == 0) return;
  TORCH_CHECK(args.R >= 1 && args.R <= kMaxRank, "lightning_peft_cuda: grouped kernels take ranks 1..", kMaxRank);
  dispatch_element_type(type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    dispatch_rank(rank_bucket(args.R), [&](auto rf) {
      constexpr int RF = decltype(rf)::value;
      auto kernel = grouped_shrink_kernel<raw_t, RF>;
      const size_t smem = ShrinkSmem<16 * RF>::kBytes;
      allow_dynamic_smem(kernel, smem);
      LIGHTNING_PEFT_LAUNCH(kernel, dim3(grid_count(tile_bound(seg, table.n))), kThreads, smem, stream, seg, table,
                            static_cast<const raw_t*>(args.in), args.ld_in, args.K, static_cast<const raw_t*>(args.w), args.R,
                            args.rngs, args.mask, static_cast<raw_t*>(args.out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_grouped_expand(ElementType type, const Segments& seg, const GroupTable& table, const ExpandArgs& args,
                           cudaStream_t stream) {
  if (seg.N == 0 || args.D == 0) return;
  TORCH_CHECK((args.D + 63) / 64 <= 65535, "lightning_peft_cuda: too many output columns for one grouped launch");
  dispatch_element_type(type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    auto kernel = grouped_expand_kernel<raw_t>;
    allow_dynamic_smem(kernel, kExpandSmemBytes);
    const dim3 grid(grid_count(tile_bound(seg, table.n + 1)), static_cast<unsigned>((args.D + 63) / 64));
    LIGHTNING_PEFT_LAUNCH(kernel, grid, kThreads, kExpandSmemBytes, stream, seg, table, static_cast<const raw_t*>(args.h), args.R,
                          static_cast<const raw_t*>(args.w), args.D, static_cast<const raw_t*>(args.bias), args.mask,
                          static_cast<raw_t*>(args.out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_grouped_segment_grad(ElementType type, const Segments& seg, const GroupTable& table, const SegmentGradArgs& args,
                                 cudaStream_t stream) {
  if (table.n == 0 || args.C == 0) return;
  TORCH_CHECK(args.R >= 1 && args.R <= kMaxRank, "lightning_peft_cuda: grouped kernels take ranks 1..", kMaxRank);
  dispatch_element_type(type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    dispatch_rank(rank_bucket(args.R), [&](auto rf) {
      constexpr int RF = decltype(rf)::value;
      auto kernel = grouped_segment_grad_kernel<raw_t, RF>;
      const size_t smem = GradSmem<16 * RF>::kBytes;
      allow_dynamic_smem(kernel, smem);
      const dim3 grid(grid_count((args.C + kGradCols - 1) / kGradCols), static_cast<unsigned>(table.n));
      LIGHTNING_PEFT_LAUNCH(kernel, grid, kThreads, smem, stream, seg, table, static_cast<const raw_t*>(args.left), args.R,
                            static_cast<const raw_t*>(args.right), args.ld_right, args.C, args.mask, args.out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace lightning_peft_cuda

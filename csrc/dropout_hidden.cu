// Forward pass over x with dropout, in one read of x:
//   mask bits  = Philox(seed, offset, n, k/8) >= p16            (written, 1 bit per element)
//   hidden     = keep_scale * (x ∘ keep) · Aᵀ                    ([N, r], fp32 accumulation)
// x ∘ keep only ever exists as a 64 x 64 tile in shared memory.
//
// Grid: (ceil(N/64) row tiles) x (K splits). A block walks its K range in 64-column chunks and
// leaves a [64, R] fp32 partial in a workspace; reduce_splits sums the partials in a fixed order
// (deterministic, unlike atomics) and applies keep_scale. Splitting K keeps ~4 blocks per SM busy
// even when N/64 is below the SM count.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "lora_kernels.h"
#include "philox.cuh"
#include "tile_common.cuh"

namespace lightning_peft_cuda {
namespace {

template <typename raw_t, int RF> struct HiddenSmem {
  static constexpr int kRank = 16 * RF;
  static constexpr int kLdx = padded_ld<raw_t>(kTileCols);
  static constexpr size_t kXsBytes = smem_align(sizeof(raw_t) * kTileRows * kLdx);  // masked x tile [64][kLdx]
  static constexpr size_t kAsBytes = smem_align(sizeof(raw_t) * kRank * kLdx);      // A chunk [R][kLdx]
  static constexpr size_t kBytes = kXsBytes + kAsBytes;
};

// hidden_tile[64, R] += Xs[64, 64] · As[R, 64]ᵀ, on tensor cores or FMAs.
template <typename raw_t, int RF, bool kTensorCores> struct HiddenAccumulator;

template <typename raw_t, int RF> struct HiddenAccumulator<raw_t, RF, true> {
  // Warp w owns rows [16w, 16w + 16) and all R columns: RF accumulator fragments.
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[RF];

  __device__ void init() {
#pragma unroll
    for (int f = 0; f < RF; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.0f);
  }

  __device__ void tile(const raw_t* xs, const raw_t* as, int ldx) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int kk = 0; kk < kTileCols / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, raw_t, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, xs + warp * 16 * ldx + kk * 16, ldx);
#pragma unroll
      for (int f = 0; f < RF; ++f) {
        // Aᵀ chunk [64, R] is As [R, 64] read column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, raw_t, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, as + f * 16 * ldx + kk * 16, ldx);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }

  // ws_tile points at row 0 of this block's [64, R] partial (row stride R).
  __device__ void store(float* ws_tile) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int f = 0; f < RF; ++f)
      nvcuda::wmma::store_matrix_sync(ws_tile + warp * 16 * (16 * RF) + f * 16, acc[f], 16 * RF, nvcuda::wmma::mem_row_major);
  }
};

template <typename raw_t, int RF> struct HiddenAccumulator<raw_t, RF, false> {
  // Thread t owns row t/2 and half of the R columns; As reads are warp-wide broadcasts.
  static constexpr int kCols = 16 * RF / 2;
  float acc[kCols];

  __device__ void init() {
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[j] = 0.0f;
  }

  __device__ void tile(const raw_t* xs, const raw_t* as, int ldx) {
    const int row = threadIdx.x >> 1;
    const int j0 = (threadIdx.x & 1) * kCols;
    for (int c = 0; c < kTileCols; ++c) {
      const float xv = to_float(xs[row * ldx + c]);
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[j] += xv * to_float(as[(j0 + j) * ldx + c]);
    }
  }

  __device__ void store(float* ws_tile) {
    const int row = threadIdx.x >> 1;
    const int j0 = (threadIdx.x & 1) * kCols;
#pragma unroll
    for (int j = 0; j < kCols; ++j) ws_tile[row * (16 * RF) + j0 + j] = acc[j];
  }
};

static_assert(kThreads == 2 * kTileRows, "the FMA layout gives each row two threads");

/// Mask of the valid bits of the byte covering columns [col, col + 8) of a K-column row.
__device__ __forceinline__ uint32_t valid_bits(int64_t col, int64_t K) {
  const int64_t left = K - col;
  return left >= 8 ? 0xFFu : ((1u << left) - 1u);
}

template <typename raw_t, int RF>
__global__ void __launch_bounds__(kThreads)
    dropout_hidden_kernel(const raw_t* __restrict__ x, int64_t ldx, int64_t N, int64_t K,  //
                          const raw_t* __restrict__ a, int r, bool vec_ok_x, bool vec_ok_a,  //
                          const int64_t* __restrict__ rng, uint32_t p16,                     //
                          uint8_t* __restrict__ mask, int64_t mask_ld,                       //
                          float* __restrict__ ws, int64_t ws_rows, int64_t cols_per_split) {
  using Smem = HiddenSmem<raw_t, RF>;
  constexpr int R = Smem::kRank;
  constexpr int LDX = Smem::kLdx;
  LIGHTNING_PEFT_DYNAMIC_SMEM(smem);
  raw_t* xs = reinterpret_cast<raw_t*>(smem);
  raw_t* as = reinterpret_cast<raw_t*>(smem + Smem::kXsBytes);

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t k_end = k_begin + cols_per_split < K ? k_begin + cols_per_split : K;
  const RngKey key = load_rng_key(rng);

  HiddenAccumulator<raw_t, RF, UseTensorCores<raw_t>::value> acc;
  acc.init();

  // Registers holding the next chunk: its x vectors and their keep bits. The Philox bits do not
  // depend on x, so they are computed while the loads are in flight.
  Vec8<raw_t> next[kVecsPerThread];
  uint32_t next_bits[kVecsPerThread];
  auto fetch = [&](int64_t kc) {
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      int row, col8;
      vec_coords(tid, i, row, col8);
      const int64_t n = row0 + row;
      const int64_t col = kc + col8 * 8;
      next[i] = n < N ? load_vec8(x + n * ldx, col, K, vec_ok_x) : zero_vec<raw_t>();
    }
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      int row, col8;
      vec_coords(tid, i, row, col8);
      const int64_t n = row0 + row;
      const int64_t col = kc + col8 * 8;
      next_bits[i] = (n < N && col < K) ? keep_byte(key, static_cast<uint64_t>(n * mask_ld + col / 8), p16) & valid_bits(col, K) : 0u;
    }
  };

  if (k_begin < k_end) fetch(k_begin);
  for (int64_t kc = k_begin; kc < k_end; kc += kTileCols) {
    // 1. Masked x chunk -> shared memory; keep bits -> the packed mask (one byte per vector).
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      int row, col8;
      vec_coords(tid, i, row, col8);
      const int64_t n = row0 + row;
      const int64_t col = kc + col8 * 8;
      if (n < N && col < K) mask[n * mask_ld + col / 8] = static_cast<uint8_t>(next_bits[i]);
      store_vec(xs + row * LDX + col8 * 8, apply_keep_bits(next[i], next_bits[i]));
    }
    // 2. A chunk [R, 64] (rows >= r and columns >= K are zero). A is small and stays in L2.
    for (int e = tid; e < R * kVecsPerRow; e += kThreads) {
      const int j = e / kVecsPerRow;
      const int col8 = e % kVecsPerRow;
      const Vec8<raw_t> v = j < r ? load_vec8(a + static_cast<int64_t>(j) * K, kc + col8 * 8, K, vec_ok_a) : zero_vec<raw_t>();
      store_vec(as + j * LDX + col8 * 8, v);
    }
    __syncthreads();
    if (kc + kTileCols < k_end) fetch(kc + kTileCols);  // next chunk's loads overlap this chunk's math
    acc.tile(xs, as, LDX);
    __syncthreads();
  }
  acc.store(ws + (static_cast<int64_t>(blockIdx.y) * ws_rows + row0) * R);
}

template <typename raw_t, int RF>
void launch_hidden(const DropoutHiddenArgs& args, const SplitPlan& plan, cudaStream_t stream) {
  auto kernel = dropout_hidden_kernel<raw_t, RF>;
  const size_t smem = HiddenSmem<raw_t, RF>::kBytes;
  allow_dynamic_smem(kernel, smem);
  const auto* xp = static_cast<const raw_t*>(args.x);
  const auto* ap = static_cast<const raw_t*>(args.a);
  const bool vec_ok_x = args.K % 8 == 0 && args.ldx % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0;
  const bool vec_ok_a = args.K % 8 == 0 && reinterpret_cast<uintptr_t>(ap) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits));
  LIGHTNING_PEFT_LAUNCH(kernel, grid, kThreads, smem, stream, xp, args.ldx, args.N, args.K, ap, args.r, vec_ok_x, vec_ok_a,
                        args.rng, args.p16, args.mask, (args.K + 7) / 8, args.ws, plan.ws_rows, plan.per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

SplitPlan plan_dropout_hidden(ElementType type, int64_t N, int64_t K, int64_t r, int sm_count, int64_t forced_splits) {
  TORCH_CHECK(r >= 1 && r <= kMaxRank, "lightning_peft CUDA kernels support rank 1..", kMaxRank, ", got ", r);
  const int rank_pad = rank_bucket(r);
  int per_sm = 1;
  dispatch_element_type(type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    dispatch_rank(rank_pad, [&](auto rf) {
      constexpr int RF = decltype(rf)::value;
      per_sm = resident_blocks_per_sm(dropout_hidden_kernel<raw_t, RF>, HiddenSmem<raw_t, RF>::kBytes);
    });
  });
  const int64_t row_tiles = std::max<int64_t>((N + kTileRows - 1) / kTileRows, 1);
  const int64_t chunks = std::max<int64_t>((K + kTileCols - 1) / kTileCols, 1);
  // Split K so that the grid is one full wave of resident blocks (each block then streams its
  // K range): no second, mostly idle wave. With many rows, no split at all.
  const int64_t wave = int64_t{sm_count} * per_sm;
  int64_t splits = std::clamp<int64_t>(forced_splits > 0 ? forced_splits : wave / row_tiles, 1, std::min<int64_t>(chunks, 65535));
  const int64_t chunks_per_split = (chunks + splits - 1) / splits;
  splits = (chunks + chunks_per_split - 1) / chunks_per_split;
  TORCH_CHECK(row_tiles <= 0x7FFFFFFF, "lightning_peft_cuda: too many rows for one launch");
  return SplitPlan{row_tiles, splits, chunks_per_split * kTileCols, rank_pad, row_tiles * kTileRows, rank_pad};
}

void launch_dropout_hidden(ElementType type, const DropoutHiddenArgs& args, const SplitPlan& plan, cudaStream_t stream) {
  if (args.N == 0 || args.K == 0) return;  // the caller handles empty shapes
  dispatch_element_type(type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    dispatch_rank(plan.rank_pad, [&](auto rf) { launch_hidden<raw_t, decltype(rf)::value>(args, plan, stream); });
  });
}

}  // namespace lightning_peft_cuda

// Backward pass over x with dropout, in one read of x and of the packed mask:
//   grad_a        = d_hiddenᵀ · (x ∘ keep)            [r, K]   (fp32 partials per row split)
//   grad_x_lora   = (d_hidden · A) ∘ keep              [N, K]   (written once, 128-bit stores)
// d_hidden already carries scaling * keep_scale. The caller then runs the base GEMM dy · W with
// beta = 1 on grad_x_lora, so dx costs one GEMM plus one write of the LoRA term.
//
// Grid: (ceil(K/64) column tiles) x (row splits). A block owns 64 columns, loads its A columns
// once, walks its rows in 64-row tiles and leaves a [R, 64] fp32 grad_a partial per split;
// reduce_splits sums them in a fixed order.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "lora_kernels.h"
#include "tile_common.cuh"

namespace lightning_peft_cuda {
namespace {

template <typename raw_t, int RF> struct GradSmem {
  static constexpr int kRank = 16 * RF;
  static constexpr int kLdx = padded_ld<raw_t>(kTileCols);
  static constexpr int kLdd = padded_ld<raw_t>(kRank);
  static constexpr int kLdc = padded_ld<float>(kTileCols);
  static constexpr size_t kXsBytes = smem_align(sizeof(raw_t) * kTileRows * kLdx);  // masked x tile [64][kLdx]
  static constexpr size_t kDsBytes = smem_align(sizeof(raw_t) * kTileRows * kLdd);  // d_hidden tile [64][kLdd]
  static constexpr size_t kAsBytes = smem_align(sizeof(raw_t) * kRank * kLdx);      // A columns [R][kLdx]
  static constexpr size_t kCsBytes = smem_align(sizeof(float) * kTileRows * kLdc);  // LoRA dx tile [64][kLdc]
  static constexpr size_t kBytes = kXsBytes + kDsBytes + kAsBytes + kCsBytes;
};

// grad_a_tile[R, 64] += Ds[64, R]ᵀ · Xs[64, 64]  and  Cs[64, 64] = Ds[64, R] · As[R, 64].
template <typename raw_t, int RF, bool kTensorCores> struct GradTiles;

template <typename raw_t, int RF> struct GradTiles<raw_t, RF, true> {
  // Warp w owns grad_a columns [16w, 16w + 16) for all R rows, and dx rows [16w, 16w + 16).
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> ga[RF];

  __device__ void init() {
#pragma unroll
    for (int f = 0; f < RF; ++f) nvcuda::wmma::fill_fragment(ga[f], 0.0f);
  }

  __device__ void grad_a_tile(const raw_t* ds, int ldd, const raw_t* xs, int ldx) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll(RF >= 8 ? 1 : 4)  // rolled at R = 128: fewer live fragments (it spilled when unrolled)
    for (int kk = 0; kk < kTileRows / 16; ++kk) {  // contraction over the tile's rows
      wmma::fragment<wmma::matrix_b, 16, 16, 16, raw_t, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, xs + kk * 16 * ldx + warp * 16, ldx);
#pragma unroll
      for (int f = 0; f < RF; ++f) {
        // d_hiddenᵀ [R, 64 rows] is Ds [64, R] read column-major.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, raw_t, wmma::col_major> fa;
        wmma::load_matrix_sync(fa, ds + kk * 16 * ldd + f * 16, ldd);
        wmma::mma_sync(ga[f], fa, fb, ga[f]);
      }
    }
  }

  __device__ void dx_tile(const raw_t* ds, int ldd, const raw_t* as, int ldx, float* cs, int ldc) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[kTileCols / 16];
#pragma unroll
    for (int j = 0; j < kTileCols / 16; ++j) wmma::fill_fragment(c[j], 0.0f);
#pragma unroll(RF >= 8 ? 1 : RF)  // rolled at R = 128, as above
    for (int kk = 0; kk < RF; ++kk) {  // contraction over the rank
      wmma::fragment<wmma::matrix_a, 16, 16, 16, raw_t, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, ds + warp * 16 * ldd + kk * 16, ldd);
#pragma unroll
      for (int j = 0; j < kTileCols / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, raw_t, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, as + kk * 16 * ldx + j * 16, ldx);
        wmma::mma_sync(c[j], fa, fb, c[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kTileCols / 16; ++j)
      wmma::store_matrix_sync(cs + warp * 16 * ldc + j * 16, c[j], ldc, wmma::mem_row_major);
  }

  // ga_tile points at [row 0, column 0] of this block's [R, 64] partial (row stride ld).
  __device__ void store(float* ga_tile, int64_t ld) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int f = 0; f < RF; ++f)
      nvcuda::wmma::store_matrix_sync(ga_tile + f * 16 * ld + warp * 16, ga[f], static_cast<unsigned>(ld),
                                      nvcuda::wmma::mem_row_major);
  }
};

template <typename raw_t, int RF> struct GradTiles<raw_t, RF, false> {
  // Thread t owns grad_a column t % 64 for half of the R rows (t / 64 picks the half); Ds reads
  // are warp-wide broadcasts and Xs reads are consecutive.
  static constexpr int kHalfRank = 16 * RF / 2;
  float ga[kHalfRank];

  __device__ void init() {
#pragma unroll
    for (int j = 0; j < kHalfRank; ++j) ga[j] = 0.0f;
  }

  __device__ void grad_a_tile(const raw_t* ds, int ldd, const raw_t* xs, int ldx) {
    const int c = threadIdx.x % kTileCols;
    const int j0 = (threadIdx.x / kTileCols) * kHalfRank;
    for (int row = 0; row < kTileRows; ++row) {
      const float xv = to_float(xs[row * ldx + c]);
#pragma unroll
      for (int j = 0; j < kHalfRank; ++j) ga[j] += to_float(ds[row * ldd + j0 + j]) * xv;
    }
  }

  __device__ void dx_tile(const raw_t* ds, int ldd, const raw_t* as, int ldx, float* cs, int ldc) {
    // Thread t computes column t % 64 of rows [32 h, 32 h + 32), h = t / 64.
    constexpr int kRows = kTileRows / (kThreads / kTileCols);
    const int c = threadIdx.x % kTileCols;
    const int r0 = (threadIdx.x / kTileCols) * kRows;
    float acc[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) acc[i] = 0.0f;
    for (int j = 0; j < 16 * RF; ++j) {
      const float av = to_float(as[j * ldx + c]);
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] += to_float(ds[(r0 + i) * ldd + j]) * av;
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) cs[(r0 + i) * ldc + c] = acc[i];
  }

  __device__ void store(float* ga_tile, int64_t ld) {
    const int c = threadIdx.x % kTileCols;
    const int j0 = (threadIdx.x / kTileCols) * kHalfRank;
#pragma unroll
    for (int j = 0; j < kHalfRank; ++j) ga_tile[(j0 + j) * ld + c] = ga[j];
  }
};

static_assert(kThreads % kTileCols == 0 && kThreads / kTileCols == 2, "the FMA layout splits the rank in two halves");

template <typename raw_t, int RF>
__global__ void __launch_bounds__(kThreads)
    dropout_grad_kernel(const raw_t* __restrict__ x, int64_t ldx, int64_t N, int64_t K, bool vec_ok_x,  //
                        const uint8_t* __restrict__ mask, int64_t mask_ld,                              //
                        const raw_t* __restrict__ dh, int r,                                            //
                        const raw_t* __restrict__ a, bool vec_ok_a,                                     //
                        raw_t* __restrict__ gx, bool vec_ok_gx,                                         //
                        float* __restrict__ ga_ws, int64_t ga_ld, int64_t rows_per_split) {
  using Smem = GradSmem<raw_t, RF>;
  constexpr int R = Smem::kRank;
  constexpr int LDX = Smem::kLdx;
  constexpr int LDD = Smem::kLdd;
  constexpr int LDC = Smem::kLdc;
  LIGHTNING_PEFT_DYNAMIC_SMEM(smem);
  raw_t* xs = reinterpret_cast<raw_t*>(smem);
  raw_t* ds = reinterpret_cast<raw_t*>(smem + Smem::kXsBytes);
  raw_t* as = reinterpret_cast<raw_t*>(smem + Smem::kXsBytes + Smem::kDsBytes);
  float* cs = reinterpret_cast<float*>(smem + Smem::kXsBytes + Smem::kDsBytes + Smem::kAsBytes);

  const int tid = threadIdx.x;
  const int64_t kc = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t n_end = n_begin + rows_per_split < N ? n_begin + rows_per_split : N;

  // This block's A columns [R, 64], loaded once (zero past r and past K).
  for (int e = tid; e < R * kVecsPerRow; e += kThreads) {
    const int j = e / kVecsPerRow;
    const int col8 = e % kVecsPerRow;
    const Vec8<raw_t> v = j < r ? load_vec8(a + static_cast<int64_t>(j) * K, kc + col8 * 8, K, vec_ok_a) : zero_vec<raw_t>();
    store_vec(as + j * LDX + col8 * 8, v);
  }

  GradTiles<raw_t, RF, UseTensorCores<raw_t>::value> tiles;
  tiles.init();

  Vec8<raw_t> next[kVecsPerThread];
  uint32_t next_bits[kVecsPerThread];
  auto fetch = [&](int64_t n0) {
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      int row, col8;
      vec_coords(tid, i, row, col8);
      const int64_t n = n0 + row;
      const int64_t col = kc + col8 * 8;
      const bool in = n < n_end && col < K;
      next[i] = n < n_end ? load_vec8(x + n * ldx, col, K, vec_ok_x) : zero_vec<raw_t>();
      next_bits[i] = in ? static_cast<uint32_t>(mask[n * mask_ld + col / 8]) : 0u;
    }
  };

  if (n_begin < n_end) fetch(n_begin);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
    uint32_t bits[kVecsPerThread];
#pragma unroll
    for (int i = 0; i < kVecsPerThread; ++i) {
      int row, col8;
      vec_coords(tid, i, row, col8);
      bits[i] = next_bits[i];
      store_vec(xs + row * LDX + col8 * 8, apply_keep_bits(next[i], bits[i]));
    }
    for (int e = tid; e < kTileRows * R; e += kThreads) {
      const int row = e / R;
      const int j = e % R;
      const int64_t n = n0 + row;
      ds[row * LDD + j] = (n < n_end && j < r) ? dh[n * r + j] : raw_zero<raw_t>();
    }
    __syncthreads();
    if (n0 + kTileRows < n_end) fetch(n0 + kTileRows);  // next tile's loads overlap this tile's math
    tiles.grad_a_tile(ds, LDD, xs, LDX);
    if (gx != nullptr) tiles.dx_tile(ds, LDD, as, LDX, cs, LDC);
    __syncthreads();
    if (gx != nullptr) {
#pragma unroll
      for (int i = 0; i < kVecsPerThread; ++i) {
        int row, col8;
        vec_coords(tid, i, row, col8);
        const int64_t n = n0 + row;
        const int64_t col = kc + col8 * 8;
        if (n >= n_end || col >= K) continue;
        Vec8<raw_t> v;
#pragma unroll
        for (int e = 0; e < 8; ++e) v.v[e] = from_float<raw_t>(((bits[i] >> e) & 1u) ? cs[row * LDC + col8 * 8 + e] : 0.0f);
        store_vec8(gx + n * K, col, K, vec_ok_gx, v);
      }
    }
  }
  tiles.store(ga_ws + static_cast<int64_t>(blockIdx.y) * R * ga_ld + kc, ga_ld);
}

template <typename raw_t, int RF>
void launch_grad(const DropoutGradArgs& args, const SplitPlan& plan, cudaStream_t stream) {
  auto kernel = dropout_grad_kernel<raw_t, RF>;
  const size_t smem = GradSmem<raw_t, RF>::kBytes;
  allow_dynamic_smem(kernel, smem);
  const auto* xp = static_cast<const raw_t*>(args.x);
  const auto* ap = static_cast<const raw_t*>(args.a);
  auto* gp = static_cast<raw_t*>(args.grad_x_lora);
  const bool vec_ok_x = args.K % 8 == 0 && args.ldx % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0;
  const bool vec_ok_a = args.K % 8 == 0 && reinterpret_cast<uintptr_t>(ap) % 16 == 0;
  const bool vec_ok_gx = args.K % 8 == 0 && reinterpret_cast<uintptr_t>(gp) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits));
  LIGHTNING_PEFT_LAUNCH(kernel, grid, kThreads, smem, stream, xp, args.ldx, args.N, args.K, vec_ok_x, args.mask, (args.K + 7) / 8,
                        static_cast<const raw_t*>(args.d_hidden), args.r, ap, vec_ok_a, gp, vec_ok_gx, args.ws,
                        plan.ws_cols, plan.per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

SplitPlan plan_dropout_grad(ElementType type, int64_t N, int64_t K, int64_t r, int sm_count, int64_t forced_splits) {
  TORCH_CHECK(r >= 1 && r <= kMaxRank, "lightning_peft CUDA kernels support rank 1..", kMaxRank, ", got ", r);
  const int rank_pad = rank_bucket(r);
  int per_sm = 1;
  dispatch_element_type(type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    dispatch_rank(rank_pad, [&](auto rf) {
      constexpr int RF = decltype(rf)::value;
      per_sm = resident_blocks_per_sm(dropout_grad_kernel<raw_t, RF>, GradSmem<raw_t, RF>::kBytes);
    });
  });
  const int64_t col_tiles = std::max<int64_t>((K + kTileCols - 1) / kTileCols, 1);
  const int64_t row_tiles = std::max<int64_t>((N + kTileRows - 1) / kTileRows, 1);
  // Split N so that the grid is one full wave of resident blocks (see plan_dropout_hidden).
  const int64_t wave = int64_t{sm_count} * per_sm;
  int64_t splits = std::clamp<int64_t>(forced_splits > 0 ? forced_splits : wave / col_tiles, 1, std::min<int64_t>(row_tiles, 65535));
  const int64_t tiles_per_split = (row_tiles + splits - 1) / splits;
  splits = (row_tiles + tiles_per_split - 1) / tiles_per_split;
  TORCH_CHECK(col_tiles <= 0x7FFFFFFF, "lightning_peft_cuda: too many columns for one launch");
  return SplitPlan{col_tiles, splits, tiles_per_split * kTileRows, rank_pad, rank_pad, col_tiles * kTileCols};
}

void launch_dropout_grad(ElementType type, const DropoutGradArgs& args, const SplitPlan& plan, cudaStream_t stream) {
  if (args.N == 0 || args.K == 0) return;  // the caller handles empty shapes
  dispatch_element_type(type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    dispatch_rank(plan.rank_pad, [&](auto rf) { launch_grad<raw_t, decltype(rf)::value>(args, plan, stream); });
  });
}

}  // namespace lightning_peft_cuda

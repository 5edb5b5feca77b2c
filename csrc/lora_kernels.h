// Host-side entry points of the fused LoRA dropout kernels. Plain pointers and sizes only: the
// .cu files include no ATen headers (that alone halves the build time); csrc/lora_ops.cpp owns
// the tensors, allocations and checks.
//
// Notation: N rows (tokens), K input features, r rank (1..128), R = r rounded up to a rank
// bucket (16, 32, 64, 128), p16 = round(p * 65536) the quantized drop threshold and
// keep_scale = 1 / (1 - p16 / 65536).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lightning_peft_cuda {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

constexpr int kMaxRank = 128;
constexpr int kTileRows = 64;  // rows of a kernel tile
constexpr int kTileCols = 64;  // columns of a kernel tile (whole mask bytes)

/// The rank bucket R the kernels are instantiated for: 16, 32, 64 or 128.
inline int rank_bucket(int64_t r) { return r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : 128; }

/// Launch geometry of a split kernel and the shape of its fp32 workspace [splits, ws_rows, ws_cols].
struct SplitPlan {
  int64_t tiles;      // blocks along the unsplit dimension (row tiles for hidden, column tiles for grad)
  int64_t splits;     // blocks along the split dimension (gridDim.y)
  int64_t per_split;  // columns (hidden) or rows (grad) per split, a multiple of 64
  int rank_pad;       // R
  int64_t ws_rows, ws_cols;
};

/// Forward: x ∘ keep times Aᵀ, split over K so that the grid fills one wave of resident blocks.
/// `forced_splits` > 0 (tests only) overrides the count, capped at the number of 64-column chunks.
SplitPlan plan_dropout_hidden(ElementType type, int64_t N, int64_t K, int64_t r, int sm_count, int64_t forced_splits = 0);

/// Backward: split over N (each block owns 64 columns of x for a range of rows), same rule.
SplitPlan plan_dropout_grad(ElementType type, int64_t N, int64_t K, int64_t r, int sm_count, int64_t forced_splits = 0);

struct DropoutHiddenArgs {
  const void* x;  // [N, K], unit column stride, row stride ldx
  int64_t ldx, N, K;
  const void* a;  // [r, K] contiguous
  int r;
  const int64_t* rng;  // int64 [2] (seed, offset) on the device
  uint32_t p16;
  uint8_t* mask;  // out: [N, ceil(K/8)] contiguous; every byte written, bits past K are 0
  float* ws;      // out: [splits, ws_rows, R] fp32 partials of (x ∘ keep) · Aᵀ
};

/// Draw the Philox keep bits, write them packed, and leave per-split partials of (x ∘ keep) · Aᵀ
/// in ws, reading x once and never materialising x ∘ keep.
void launch_dropout_hidden(ElementType type, const DropoutHiddenArgs& args, const SplitPlan& plan, cudaStream_t stream);

struct DropoutGradArgs {
  const void* x;  // [N, K], unit column stride, row stride ldx
  int64_t ldx, N, K;
  const uint8_t* mask;  // [N, ceil(K/8)] contiguous
  const void* d_hidden;  // [N, r] contiguous, already scaled by scaling * keep_scale
  int r;
  const void* a;      // [r, K] contiguous
  void* grad_x_lora;  // out: [N, K] contiguous, or nullptr to skip it
  float* ws;          // out: [splits, R, ws_cols] fp32 partials of d_hiddenᵀ · (x ∘ keep)
};

/// One pass over x and the mask bits: grad_a partials d_hiddenᵀ · (x ∘ keep) into ws, and
/// grad_x_lora = (d_hidden · A) ∘ keep.
void launch_dropout_grad(ElementType type, const DropoutGradArgs& args, const SplitPlan& plan, cudaStream_t stream);

/// out[i, j] = scale * sum_s ws[s * split_stride + i * ld + j], i < rows, j < cols; out contiguous.
void launch_reduce_splits(ElementType out_type, const float* ws, int64_t splits, int64_t split_stride, int64_t ld,
                          int64_t rows, int64_t cols, float scale, void* out, cudaStream_t stream);

}  // namespace lightning_peft_cuda

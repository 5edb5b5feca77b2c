// Deterministic sum of the fp32 partials the tile kernels leave per split, scaled and cast once.
// The partials are small ([splits, N, R] for hidden, [splits, R, K] for grad_a), so one thread per
// output element summing the splits in a fixed order is plenty, and results repeat bit for bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "lora_kernels.h"
#include "tile_common.cuh"

namespace lightning_peft_cuda {
namespace {

template <typename raw_t>
__global__ void reduce_splits_kernel(const float* __restrict__ ws, int64_t splits, int64_t split_stride, int64_t ld,
                                     int64_t rows, int64_t cols, float scale, raw_t* __restrict__ out) {
  const int64_t total = rows * cols;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / cols;
    const int64_t j = idx - i * cols;
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += ws[s * split_stride + i * ld + j];
    out[idx] = from_float<raw_t>(sum * scale);
  }
}

}  // namespace

void reduce_splits(const at::Tensor& ws, int64_t rows, int64_t cols, float scale, at::Tensor& out) {
  TORCH_CHECK(ws.dim() == 3 && ws.scalar_type() == at::kFloat && ws.is_contiguous(), "reduce_splits: bad workspace");
  TORCH_CHECK(out.is_contiguous() && out.numel() == rows * cols, "reduce_splits: bad output");
  TORCH_CHECK(ws.size(1) >= rows && ws.size(2) >= cols, "reduce_splits: workspace smaller than the output");
  const int64_t total = rows * cols;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  dispatch_float_types(out.scalar_type(), "reduce_splits", [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    reduce_splits_kernel<raw_t><<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        ws.data_ptr<float>(), ws.size(0), ws.stride(0), ws.size(2), rows, cols, scale,
        reinterpret_cast<raw_t*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lightning_peft_cuda

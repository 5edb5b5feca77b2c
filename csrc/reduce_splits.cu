// Deterministic sum of the fp32 partials the tile kernels leave per split, scaled and cast once.
// The partials are small ([splits, N, R] for hidden, [splits, R, K] for grad_a), so one thread per
// output element summing the splits in a fixed order is plenty, and results repeat bit for bit.
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

void launch_reduce_splits(ElementType out_type, const float* ws, int64_t splits, int64_t split_stride, int64_t ld,
                          int64_t rows, int64_t cols, float scale, void* out, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  dispatch_element_type(out_type, [&](auto tag) {
    using raw_t = typename decltype(tag)::type;
    LIGHTNING_PEFT_LAUNCH(reduce_splits_kernel<raw_t>, dim3(static_cast<unsigned>(blocks)), threads, 0, stream, ws, splits,
                          split_stride, ld, rows, cols, scale, static_cast<raw_t*>(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lightning_peft_cuda

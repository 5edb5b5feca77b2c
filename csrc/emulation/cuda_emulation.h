// CPU emulation of the CUDA features the LoRA kernels use, so that the real kernel sources can be
// compiled by the host compiler and tested without a GPU (tests/test_cuda_emulation.py).
//
// Each block runs as kThreads std::threads sharing a block's "shared memory" buffer, with
// __syncthreads() a std::barrier. WMMA fragments hold their whole 16x16 tile in every emulated
// lane (the hardware spreads it over the warp); loads, mma and fills keep the API's semantics and
// stores are done by lane 0 only, which is what a warp-collective store amounts to. What this
// cannot see: timing, memory coalescing, bank conflicts, real races between warps that the
// barriers happen to hide, and anything about the hardware's fragment layout.
#pragma once

#include <cuda_runtime.h>  // uint3, dim3, uint4, make_uint4 (host-compatible); __device__ & co. as no-ops
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

namespace lightning_peft_cuda {
namespace emu {

struct ThreadContext {
  uint3 thread{0, 0, 0};
  uint3 block{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid{1, 1, 1};
  unsigned char* smem = nullptr;
  std::barrier<>* barrier = nullptr;
};

inline thread_local ThreadContext ctx;

inline unsigned char* block_smem() { return ctx.smem; }

/// Run `body` as a grid of blocks of `threads` emulated threads, one block at a time. Shared memory
/// starts as 0xCD garbage, so a read of a never-written element shows up in the results.
template <typename F> void launch(dim3 grid, int threads, size_t smem_bytes, F&& body) {
  std::vector<unsigned char> smem(smem_bytes + 128);
  unsigned char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(smem.data(), 0xCD, smem.size());
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            ctx = ThreadContext{uint3{static_cast<unsigned>(t), 0, 0}, uint3{bx, by, bz}, dim3(threads), grid, base, &barrier};
            body();
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}

}  // namespace emu
}  // namespace lightning_peft_cuda

#undef __launch_bounds__
#define __launch_bounds__(...)

#define threadIdx (::lightning_peft_cuda::emu::ctx.thread)
#define blockIdx (::lightning_peft_cuda::emu::ctx.block)
#define blockDim (::lightning_peft_cuda::emu::ctx.block_dim)
#define gridDim (::lightning_peft_cuda::emu::ctx.grid)

inline void __syncthreads() { ::lightning_peft_cuda::emu::ctx.barrier->arrive_and_wait(); }
inline unsigned int lightning_peft_emu_umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
#define __umulhi lightning_peft_emu_umulhi

// The WMMA API (nvcuda::wmma) on whole tiles.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
  float v[kRows * kCols];
};

inline float as_float(float x) { return x; }
inline float as_float(__half x) { return __half2float(x); }
inline float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& x : f.v) x = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  for (int i = 0; i < Frag::kRows; ++i)
    for (int j = 0; j < Frag::kCols; ++j)
      f.v[i * Frag::kCols + j] = as_float(std::is_same<Layout, col_major>::value ? p[i + j * ldm] : p[i * ldm + j]);
}

template <int M, int N, int K, typename TA, typename TB, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.v[i * N + j];
      for (int k = 0; k < K; ++k) sum += a.v[i * K + k] * b.v[k * N + j];
      out[i * N + j] = sum;
    }
  std::memcpy(d.v, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;  // a warp-collective store: one emulated lane writes the tile
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_col_major ? p[i + j * ldm] : p[i * ldm + j]) = f.v[i * N + j];
}

}  // namespace wmma
}  // namespace nvcuda

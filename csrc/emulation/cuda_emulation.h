// CPU emulation of the CUDA features the LoRA kernels use, so that the real kernel sources can be
// compiled by the host compiler and tested without a GPU (tests/test_cuda_emulation.py).
//
// Scheduling is deterministic and adversarial, so that a missing barrier fails reproducibly:
// a block's kThreads threads are fibers (ucontext) on one OS thread, and between two
// __syncthreads() each thread runs alone, start to barrier, in an order chosen per phase
// (ascending, descending or a seeded shuffle). Whatever one thread writes to shared memory
// before another reads it without a barrier in between is therefore seen (or not) the same way
// on every run, and the descending order makes every thread run after the ones it depends on
// would have on hardware. Blocks run one at a time in ascending, descending or shuffled order
// (no kernel may depend on the order of blocks). Shared memory starts as 0xCD garbage.
//
// Checks (a failure is recorded and raised as an error after the launch): every WMMA load /
// store pointer 32-byte aligned with a 16-byte multiple leading dimension, every vector access
// aligned to its size (tile_common.cuh routes them through check_aligned), every thread
// reaching the same barriers. WMMA fragments hold their whole 16x16 tile in every emulated lane
// (the hardware spreads it over the warp); loads, mma and fills keep the API's semantics and
// stores are done by lane 0 only, which is what a warp-collective store amounts to. What this
// cannot see: timing, coalescing, bank conflicts, and the hardware's fragment layout.
#pragma once

#include <cuda_runtime.h>  // uint3, dim3, uint4, make_uint4 (host-compatible); __device__ & co. as no-ops
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <c10/util/Exception.h>

namespace lightning_peft_cuda {
namespace emu {

/// How threads are ordered between barriers and blocks within a grid (set_debug_options' `schedule`).
enum Order : int64_t { kAscending = 0, kDescending = 1, kShuffled = 2 };

struct Schedule {
  int64_t threads = kDescending;  // the default: the order that exposes a missing barrier
  int64_t blocks = kAscending;
  uint64_t seed = 0x5EED;
};

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

struct ThreadContext {
  uint3 thread{0, 0, 0};
  uint3 block{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid{1, 1, 1};
  unsigned char* smem = nullptr;
};

inline thread_local ThreadContext ctx;

inline unsigned char* block_smem() { return ctx.smem; }

/// The first check that failed during the current launch (empty: none).
inline std::string& first_error() {
  static thread_local std::string error;
  return error;
}

inline void fail(const std::string& what) {
  if (first_error().empty()) {
    first_error() = what + " (block " + std::to_string(ctx.block.x) + "," + std::to_string(ctx.block.y) + ", thread " +
                    std::to_string(ctx.thread.x) + ")";
  }
}

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail(std::string(what) + ": pointer not " + std::to_string(bytes) + "-byte aligned");
}

struct Fiber {
  ucontext_t context;
  ThreadContext thread;
  bool done = false;
  bool waiting = false;
};

struct Scheduler {
  ucontext_t main;
  Fiber* current = nullptr;
  const void* body = nullptr;  // the std::function-like callable of the running launch
  void (*call)(const void*) = nullptr;
};

inline thread_local Scheduler sched;

inline void fiber_entry() {
  sched.call(sched.body);
  sched.current->done = true;  // returning resumes sched.main through uc_link
}

inline std::vector<int> make_order(int64_t mode, int n, uint64_t seed) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (mode == kDescending) std::reverse(order.begin(), order.end());
  if (mode == kShuffled) {
    std::mt19937_64 gen(seed);
    std::shuffle(order.begin(), order.end(), gen);
  }
  return order;
}

/// Run `body` as a grid of blocks of `threads` emulated threads (see the file comment).
template <typename F> void launch(dim3 grid, int threads, size_t smem_bytes, F&& body) {
  constexpr size_t kStack = 256 * 1024;
  static thread_local std::vector<std::vector<char>> stacks;
  if (static_cast<int>(stacks.size()) < threads) stacks.resize(threads);
  for (auto& s : stacks) s.resize(kStack);
  std::vector<unsigned char> smem(smem_bytes + 128);
  unsigned char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  const Schedule plan = schedule();
  first_error().clear();
  sched.body = &body;
  sched.call = [](const void* f) { (*static_cast<const std::remove_reference_t<F>*>(f))(); };

  const int blocks = static_cast<int>(grid.x * grid.y * grid.z);
  std::vector<Fiber> fibers(threads);
  for (int b : make_order(plan.blocks, blocks, plan.seed)) {
    const uint3 block{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
    std::memset(smem.data(), 0xCD, smem.size());
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      f = Fiber{};
      f.thread = ThreadContext{uint3{static_cast<unsigned>(t), 0, 0}, block, dim3(threads), grid, base};
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stacks[t].data();
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = &sched.main;
      makecontext(&f.context, fiber_entry, 0);
    }
    for (uint64_t phase = 0;; ++phase) {
      int done = 0, waiting = 0;
      for (int t : make_order(plan.threads, threads, plan.seed ^ (uint64_t(b) << 32) ^ (phase * 0x9E3779B97F4A7C15ull))) {
        Fiber& f = fibers[t];
        if (f.done) continue;
        f.waiting = false;
        sched.current = &f;
        ctx = f.thread;
        swapcontext(&sched.main, &f.context);
      }
      for (const Fiber& f : fibers) {
        done += f.done;
        waiting += f.waiting;
      }
      if (done == threads) break;
      if (done > 0) {  // some threads left the kernel while others wait at a barrier: a hang on hardware
        ctx = fibers[0].thread;
        fail("__syncthreads() not reached by every thread of the block");
        break;
      }
    }
  }
  sched.current = nullptr;
  TORCH_CHECK(first_error().empty(), "lightning_peft CUDA emulation: ", first_error());
}

}  // namespace emu
}  // namespace lightning_peft_cuda

#undef __launch_bounds__
#define __launch_bounds__(...)

#define threadIdx (::lightning_peft_cuda::emu::ctx.thread)
#define blockIdx (::lightning_peft_cuda::emu::ctx.block)
#define blockDim (::lightning_peft_cuda::emu::ctx.block_dim)
#define gridDim (::lightning_peft_cuda::emu::ctx.grid)

inline void __syncthreads() {
  auto& s = ::lightning_peft_cuda::emu::sched;
  ::lightning_peft_cuda::emu::Fiber* self = s.current;
  self->waiting = true;
  swapcontext(&self->context, &s.main);  // resumed in the next phase, in that phase's order
}
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

/// The CUDA programming guide's rules for load/store_matrix_sync: a 256-bit aligned pointer and
/// a leading dimension that is a multiple of 16 bytes.
template <typename P> void check_wmma_operand(const P* p, unsigned ldm, const char* what) {
  ::lightning_peft_cuda::emu::check_aligned(p, 32, what);
  if ((ldm * sizeof(P)) % 16 != 0) ::lightning_peft_cuda::emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& x : f.v) x = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same<T, P>::value, "WMMA fragment and memory element types differ");
  check_wmma_operand(p, ldm, "wmma::load_matrix_sync");
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
  check_wmma_operand(p, ldm, "wmma::store_matrix_sync");
  if (threadIdx.x % 32 != 0) return;  // a warp-collective store: one emulated lane writes the tile
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_col_major ? p[i + j * ldm] : p[i * ldm + j]) = f.v[i * N + j];
}

}  // namespace wmma
}  // namespace nvcuda

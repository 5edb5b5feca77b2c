// Shared pieces of the LoRA tile kernels: element types, 8-element vectors (= one mask byte),
// shared-memory layouts and the choice between tensor cores (WMMA) and plain FMAs.
//
// Every kernel walks [64 rows x 64 columns] tiles of a row-major [N, K] activation. A thread moves
// 8 consecutive columns of one row at a time: 16 bytes for fp16/bf16 (one 128-bit load), 32 bytes
// for fp32, and exactly the 8 elements whose keep bits form one byte of the packed mask.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef LIGHTNING_PEFT_EMULATE
#include "emulation/cuda_emulation.h"  // CPU emulation for tests (tests/test_cuda_emulation.py)
#else
#include <mma.h>
#endif

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "lora_kernels.h"

namespace lightning_peft_cuda {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kVecsPerRow = kTileCols / 8;
constexpr int kVecsPerThread = kTileRows * kVecsPerRow / kThreads;  // 4

static_assert(kTileRows * kVecsPerRow % kThreads == 0, "tile must split evenly over the block");
static_assert(kTileRows == 16 * kWarps, "each warp owns 16 rows in the WMMA layouts");

template <typename T> struct TypeTag {
  using type = T;
};

/// Call f(TypeTag<raw_t>{}) with the CUDA element type (float, __half, __nv_bfloat16): the types
/// WMMA and the conversion intrinsics take.
template <typename F> void dispatch_element_type(ElementType type, F&& f) {
  switch (type) {
    case ElementType::kFloat32: f(TypeTag<float>{}); break;
    case ElementType::kFloat16: f(TypeTag<__half>{}); break;
    case ElementType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "lightning_peft_cuda: unknown element type");
  }
}

/// Instantiate `launch<raw_t, RF>` for the rank bucket of `rank_pad` (16, 32, 64 or 128).
template <typename F> void dispatch_rank(int rank_pad, F&& f) {
  switch (rank_pad) {
    case 16: f(std::integral_constant<int, 1>{}); break;
    case 32: f(std::integral_constant<int, 2>{}); break;
    case 64: f(std::integral_constant<int, 4>{}); break;
    case 128: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "lightning_peft_cuda: rank bucket must be 16, 32, 64 or 128, got ", rank_pad);
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename raw_t> __device__ __forceinline__ raw_t from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename raw_t> __device__ __forceinline__ raw_t raw_zero() { return from_float<raw_t>(0.0f); }

// Tensor cores take fp16/bf16 operands with fp32 accumulation on sm_80+ (bf16 WMMA needs sm_80).
// fp32 stays on FMAs: TF32 would lose the precision an fp32 user asked for. On the host pass and
// on older targets the FMA path is compiled, so every TORCH_CUDA_ARCH_LIST builds.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(LIGHTNING_PEFT_EMULATE)
#define LIGHTNING_PEFT_HAS_MMA 1
#else
#define LIGHTNING_PEFT_HAS_MMA 0
#endif

template <typename raw_t> struct UseTensorCores {
  static constexpr bool value = LIGHTNING_PEFT_HAS_MMA && !std::is_same<raw_t, float>::value;
};

// Padded shared-memory row stride (in elements) for a row of `cols` elements: one 16-byte access
// width of padding breaks the bank conflicts of column-wise reads and keeps 16-byte alignment.
template <typename raw_t> __host__ __device__ constexpr int padded_ld(int cols) {
  return cols + 16 / static_cast<int>(sizeof(raw_t));
}

/// Eight consecutive elements: one mask byte's worth, 16 B (fp16/bf16) or 32 B (fp32).
template <typename raw_t> struct alignas(16) Vec8 {
  raw_t v[8];
};

template <typename raw_t> __device__ __forceinline__ Vec8<raw_t> zero_vec() {
  Vec8<raw_t> out;
#pragma unroll
  for (int i = 0; i < 8; ++i) out.v[i] = raw_zero<raw_t>();
  return out;
}

/// One whole-vector access at `p` (128-bit loads / stores); the emulation checks the alignment
/// the hardware needs (a misaligned vector access is an error on a GPU).
/// (The emulation copies bytewise after the check: the host compiler's aligned SSE moves would
/// crash on the misaligned address instead of reporting it.)
template <typename raw_t> __device__ __forceinline__ Vec8<raw_t> load_vec(const raw_t* p) {
#ifdef LIGHTNING_PEFT_EMULATE
  emu::check_aligned(p, alignof(Vec8<raw_t>), "vector load");
  Vec8<raw_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#else
  return *reinterpret_cast<const Vec8<raw_t>*>(p);
#endif
}

template <typename raw_t> __device__ __forceinline__ void store_vec(raw_t* p, const Vec8<raw_t>& v) {
#ifdef LIGHTNING_PEFT_EMULATE
  emu::check_aligned(p, alignof(Vec8<raw_t>), "vector store");
  std::memcpy(p, &v, sizeof(v));
#else
  *reinterpret_cast<Vec8<raw_t>*>(p) = v;
#endif
}

/// Load 8 elements of `row_ptr` starting at column `col`; columns >= `cols` read as 0.
/// `vec_ok` (whole vectors aligned to 16 B and K % 8 == 0) selects 128-bit loads.
template <typename raw_t>
__device__ __forceinline__ Vec8<raw_t> load_vec8(const raw_t* row_ptr, int64_t col, int64_t cols, bool vec_ok) {
  if (vec_ok) {
    if (col < cols) return load_vec(row_ptr + col);
    return zero_vec<raw_t>();
  }
  Vec8<raw_t> out;
#pragma unroll
  for (int i = 0; i < 8; ++i) out.v[i] = (col + i < cols) ? row_ptr[col + i] : raw_zero<raw_t>();
  return out;
}

/// Store 8 elements at column `col` of `row_ptr`, skipping columns >= `cols`.
template <typename raw_t>
__device__ __forceinline__ void store_vec8(raw_t* row_ptr, int64_t col, int64_t cols, bool vec_ok, const Vec8<raw_t>& v) {
  if (vec_ok) {
    if (col < cols) store_vec(row_ptr + col, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (col + i < cols) row_ptr[col + i] = v.v[i];
}

/// Zero the elements whose keep bit is 0 (bit i of `bits` <-> element i).
template <typename raw_t> __device__ __forceinline__ Vec8<raw_t> apply_keep_bits(Vec8<raw_t> v, uint32_t bits) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (!((bits >> i) & 1u)) v.v[i] = raw_zero<raw_t>();
  return v;
}

/// Which row and 8-column group of the 64 x 64 tile the i-th vector of thread `tid` is.
/// Consecutive threads take consecutive 16-byte pieces of a row, so a warp's loads coalesce.
__device__ __forceinline__ void vec_coords(int tid, int i, int& row, int& col8) {
  const int id = tid + i * kThreads;
  row = id / kVecsPerRow;
  col8 = id % kVecsPerRow;
}

#ifndef LIGHTNING_PEFT_EMULATE
// The kernel's dynamic shared memory, and a launch on a stream.
#define LIGHTNING_PEFT_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define LIGHTNING_PEFT_LAUNCH(kernel, grid, threads, smem, stream, ...) kernel<<<grid, threads, smem, stream>>>(__VA_ARGS__)

/// Let `kernel` use `bytes` of dynamic shared memory. Above 48 KB this needs an opt-in per device;
/// it is done once per (kernel, device) and remembered, so that launches inside CUDA graph capture
/// (after a warm-up call) make no CUDA API calls besides the launch itself.
template <typename Kernel> void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex lock;
  static std::set<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> guard(lock);
  if (done.insert({reinterpret_cast<const void*>(kernel), device}).second) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

/// How many blocks of `kernel` (kThreads threads, `bytes` of dynamic shared memory) fit on one SM;
/// computed once per (kernel, device).
template <typename Kernel> int resident_blocks_per_sm(Kernel kernel, size_t bytes) {
  allow_dynamic_smem(kernel, bytes);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int> known;
  const std::lock_guard<std::mutex> guard(lock);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  auto it = known.find(key);
  if (it == known.end()) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, bytes));
    it = known.emplace(key, blocks > 0 ? blocks : 1).first;
  }
  return it->second;
}
#else
#define LIGHTNING_PEFT_DYNAMIC_SMEM(name) unsigned char* name = ::lightning_peft_cuda::emu::block_smem()
#define LIGHTNING_PEFT_LAUNCH(kernel, grid, threads, smem, stream, ...) \
  ::lightning_peft_cuda::emu::launch(grid, threads, smem, [&] { kernel(__VA_ARGS__); })
#undef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
template <typename Kernel> void allow_dynamic_smem(Kernel, size_t) {}
template <typename Kernel> int resident_blocks_per_sm(Kernel, size_t) { return 2; }  // plans: see sm_count() in lora_ops.cpp
#endif

/// Byte offset of a shared-memory section, rounded up to 128 B.
__host__ __device__ constexpr size_t smem_align(size_t bytes) { return (bytes + 127) / 128 * 128; }

}  // namespace lightning_peft_cuda

// The grouped LoRA kernels (csrc/lora_grouped.cu) and their host code compiled by the host
// compiler against the CPU emulation in cuda_emulation.h: registers
// torch.ops.lightning_peft_grouped_emu.{lora_grouped_forward, lora_grouped_backward} for CPU
// tensors, running the real kernel code (segment walk, Philox bits, tiling). For tests without a
// GPU (tests/test_grouped_kernels_emulation.py); never part of the installed extension.
#ifndef LIGHTNING_PEFT_EMULATE
#define LIGHTNING_PEFT_EMULATE 1
#endif

#include "../lora_grouped.cu"
#include "../lora_grouped_ops.cpp"

namespace {
/// The emulated scheduler's orders (cuda_emulation.h: 0 ascending, 1 descending, 2 shuffled) for
/// this build; the returned list is the previous [threads, blocks, seed].
std::vector<int64_t> set_schedule(int64_t threads, int64_t blocks, int64_t seed) {
  lightning_peft_cuda::emu::Schedule& s = lightning_peft_cuda::emu::schedule();
  std::vector<int64_t> previous{s.threads, s.blocks, static_cast<int64_t>(s.seed)};
  s.threads = threads;
  s.blocks = blocks;
  s.seed = static_cast<uint64_t>(seed);
  return previous;
}
}  // namespace

LIGHTNING_PEFT_GROUPED_FRAGMENT(LIGHTNING_PEFT_GROUPED_NAMESPACE, m) {
  m.def("set_schedule(int threads, int blocks, int seed) -> int[]", &set_schedule);
}

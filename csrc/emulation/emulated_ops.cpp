// The CUDA extension's sources compiled by the host compiler against the CPU emulation in
// cuda_emulation.h: registers torch.ops.lightning_peft_cuda_emu.{lora_forward, lora_backward}
// for CPU tensors, running the real kernel code (tiling, index math, Philox bits, WMMA layouts)
// and the real host orchestration. For tests without a GPU (tests/test_cuda_emulation.py); never
// part of the installed extension (setup.py and the JIT build take csrc/*.cpp and csrc/*.cu only).
#ifndef LIGHTNING_PEFT_EMULATE
#define LIGHTNING_PEFT_EMULATE 1
#endif

#include "../dropout_hidden.cu"
#include "../dropout_grad.cu"
#include "../reduce_splits.cu"
#include "../lora_ops.cpp"

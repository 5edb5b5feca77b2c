// Host-side entry points of the fused LoRA dropout kernels (implemented in the .cu files).
//
// Notation: N rows (tokens), K input features, r rank (1..128), p16 = round(p * 65536) is the
// quantized drop threshold and keep_scale = 1 / (1 - p16 / 65536).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lightning_peft_cuda {

/// Forward pass over x with dropout: draws the Philox keep bits, writes them packed to `mask`
/// and computes hidden = keep_scale * (x ∘ keep) · Aᵀ, without ever materialising x ∘ keep.
///
/// Args:
///   x: [N, K], unit column stride (any row stride); fp32/fp16/bf16.
///   lora_a: [r, K] contiguous, same dtype.
///   rng: int64 [2] (seed, offset) on the same device; read on device.
///   mask: out, uint8 [N, ceil(K/8)] contiguous; every byte is written (bits past K are 0).
///   hidden: out, [N, r] contiguous, x's dtype.
///   poison: fill the fp32 workspace with NaN first (tests: any partial not written shows up).
void dropout_hidden_forward(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& rng, uint32_t p16,
                            float keep_scale, at::Tensor& mask, at::Tensor& hidden, bool poison);

/// Backward pass over x with dropout, reading the packed mask bits on the fly:
///   grad_a = d_hiddenᵀ · (x ∘ keep)                       [r, K]
///   grad_x_lora (+)= (d_hidden · A) ∘ keep                  [N, K]   (when defined)
/// `d_hidden` already carries scaling * keep_scale.
///
/// Args:
///   x: [N, K], unit column stride; mask: uint8 [N, ceil(K/8)] contiguous;
///   d_hidden: [N, r] contiguous; lora_a: [r, K] contiguous; all of x's dtype.
///   grad_x_lora: [N, K] contiguous or an undefined tensor to skip it.
///   accumulate: add into grad_x_lora's current values instead of overwriting them.
///   grad_a: out, [r, K] contiguous.
void dropout_grad_a_backward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& d_hidden,
                             const at::Tensor& lora_a, at::Tensor& grad_x_lora, bool accumulate, at::Tensor& grad_a,
                             bool poison);

/// out[i, j] = scale * sum_s ws[s, i, j] for i < rows, j < cols (ws fp32 [splits, rows_alloc, ld]).
void reduce_splits(const at::Tensor& ws, int64_t rows, int64_t cols, float scale, at::Tensor& out);

}  // namespace lightning_peft_cuda

// CUDA implementation of the grouped (mixed-adapter) LoRA op pair, registered as private ops
//   lightning_peft_cuda::lora_grouped_forward / lora_grouped_backward
// that lightning_peft/ops/lora_grouped_cuda.py calls from the CUDA kernel of the public
// lightning_peft::lora_grouped_forward / lora_grouped_backward ops. Python sorts the units by
// adapter (order, offsets: on the device, no host sync) and builds the full outputs; the shapes
// and layouts are those of lightning_peft/ops/lora_grouped.py (hidden [N, R] and the packed mask
// [N, ceil(K/8)] in sorted token order), so either backward accepts either forward's outputs.
//
// Work split: the base GEMMs (x·Wᵀ, dy·W) on cuBLAS over the whole batch, accumulating (beta = 1)
// onto the LoRA term the expand kernel wrote for every row; everything r-wide in the grouped
// kernels of lora_grouped.cu, one launch each for all adapters.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef LIGHTNING_PEFT_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "lora_grouped.h"

namespace lightning_peft_cuda {
namespace {

using at::Tensor;

#ifndef LIGHTNING_PEFT_EMULATE
cudaStream_t grouped_stream() { return c10::cuda::getCurrentCUDAStream(); }
#define LIGHTNING_PEFT_GROUPED_GUARD(t) const c10::cuda::CUDAGuard grouped_device_guard((t).device())
#else
cudaStream_t grouped_stream() { return nullptr; }
#define LIGHTNING_PEFT_GROUPED_GUARD(t) (void)(t)
#endif

constexpr int kGroupedDropLevels = 1 << 16;

/// round(p * 65536), capped at 65535: dropout_mask.drop_threshold() and lora_ops.cpp's rule.
uint32_t grouped_drop_threshold(double p) {
  return std::min(static_cast<uint32_t>(std::nearbyint(p * kGroupedDropLevels)), static_cast<uint32_t>(kGroupedDropLevels - 1));
}

double grouped_keep_scale(uint32_t p16) { return 1.0 / (1.0 - static_cast<double>(p16) / kGroupedDropLevels); }

ElementType grouped_element_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "lightning_peft_cuda: grouped kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

/// t viewed as [rows, cols] with unit column stride (a copy only when no such view exists).
Tensor grouped_rows_of(const Tensor& t, int64_t cols) {
  Tensor t2 = t.reshape({-1, cols});
  if (cols > 1 && t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}

/// The factors stacked and zero-padded: out[g, :a, :b] = f_g (or f_gᵀ), out [n, rows, cols].
Tensor stack_padded(at::TensorList factors, int64_t rows, int64_t cols, bool transpose, const at::TensorOptions& options) {
  Tensor out = at::zeros({static_cast<int64_t>(factors.size()), rows, cols}, options);
  for (size_t g = 0; g < factors.size(); ++g) {
    const Tensor f = transpose ? factors[g].t() : factors[g];
    out[static_cast<int64_t>(g)].narrow(0, 0, f.size(0)).narrow(1, 0, f.size(1)).copy_(f);
  }
  return out;
}

struct Problem {
  int n;
  int64_t R;  // max rank
  std::vector<int64_t> ranks;
};

Problem check_problem(const Tensor& x, at::TensorList lora_as, at::TensorList lora_bs, const Tensor& order, const Tensor& offsets,
                      int64_t tokens_per_unit, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_ps) {
  const int64_t n = static_cast<int64_t>(lora_as.size());
  TORCH_CHECK(n >= 1 && n <= kMaxGroups, "lightning_peft_cuda: grouped kernels take 1..", kMaxGroups, " adapters, got ", n);
  TORCH_CHECK(static_cast<int64_t>(lora_bs.size()) == n && static_cast<int64_t>(scalings.size()) == n &&
                  static_cast<int64_t>(dropout_ps.size()) == n,
              "lightning_peft_cuda: one factor pair, scaling and dropout_p per adapter");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.is_contiguous() && order.device() == x.device(),
              "lightning_peft_cuda: order must be a contiguous int64 [U] tensor on x's device");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() == n + 1 && offsets.is_contiguous() &&
                  offsets.device() == x.device(),
              "lightning_peft_cuda: offsets must be a contiguous int64 [n + 1] tensor on x's device");
  TORCH_CHECK(tokens_per_unit >= 1 && order.numel() * tokens_per_unit == x.numel() / std::max<int64_t>(x.size(-1), 1),
              "lightning_peft_cuda: order * tokens_per_unit must cover x's tokens");
  Problem p{static_cast<int>(n), 0, {}};
  for (int64_t g = 0; g < n; ++g) {
    TORCH_CHECK(lora_as[g].scalar_type() == x.scalar_type() && lora_bs[g].scalar_type() == x.scalar_type(),
                "lightning_peft_cuda: adapter ", g, "'s factors must have x's dtype ", x.scalar_type());
    TORCH_CHECK(lora_as[g].device() == x.device() && lora_bs[g].device() == x.device(), "lightning_peft_cuda: adapter ", g,
                "'s factors must be on x's device");
    const int64_t r = lora_as[g].size(0);
    TORCH_CHECK(r >= 1 && r <= kMaxRank, "lightning_peft_cuda: grouped kernels take ranks 1..", kMaxRank, ", adapter ", g, " has ", r);
    p.ranks.push_back(r);
    p.R = std::max(p.R, r);
  }
  return p;
}

GroupTable make_table(const Problem& p, const std::vector<double>& scales, const std::vector<uint32_t>& p16s) {
  GroupTable t{};
  t.n = p.n;
  for (int g = 0; g < p.n; ++g) {
    t.rank[g] = static_cast<int>(p.ranks[g]);
    t.scale[g] = static_cast<float>(scales[g]);
    t.p16[g] = p16s[g];
  }
  return t;
}

Segments make_segments(const Tensor& order, const Tensor& offsets, int64_t tokens_per_unit, int64_t N) {
  return Segments{order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), tokens_per_unit, N};
}

std::vector<int64_t> grouped_with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

std::tuple<Tensor, Tensor, Tensor> lora_grouped_forward(const Tensor& x, const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, at::TensorList lora_as,
                                                        at::TensorList lora_bs, at::TensorList rngs, const Tensor& order,
                                                        const Tensor& offsets, int64_t tokens_per_unit,
                                                        at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_ps, bool training) {
  const Problem p = check_problem(x, lora_as, lora_bs, order, offsets, tokens_per_unit, scalings, dropout_ps);
  LIGHTNING_PEFT_GROUPED_GUARD(x);
  const int64_t K = x.size(-1);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t D = has_weight ? weight->size(0) : lora_bs[0].size(0);
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == D, "lightning_peft_cuda: bias must be [D] in x's dtype");
  }
  const Tensor x2 = grouped_rows_of(x, K);
  const int64_t N = x2.size(0);
  const Segments seg = make_segments(order, offsets, tokens_per_unit, N);
  const ElementType type = grouped_element_type(x);

  std::vector<double> hidden_scale(p.n, 1.0);
  std::vector<uint32_t> p16(p.n, 0);
  bool any_drop = false;
  for (int g = 0; g < p.n; ++g) {
    TORCH_CHECK(dropout_ps[g] >= 0.0 && dropout_ps[g] < 1.0, "lightning_peft_cuda: dropout_p must be in [0, 1)");
    if (training && dropout_ps[g] > 0.0) {
      p16[g] = grouped_drop_threshold(dropout_ps[g]);
      hidden_scale[g] = grouped_keep_scale(p16[g]);
      any_drop = any_drop || p16[g] > 0;
    }
  }
  Tensor rng_stack;
  if (any_drop) {
    TORCH_CHECK(static_cast<int>(rngs.size()) == p.n, "lightning_peft_cuda: one rng per adapter");
    for (const Tensor& rng : rngs) {
      TORCH_CHECK(rng.scalar_type() == at::kLong && rng.numel() == 2, "lightning_peft_cuda: rng must be int64 [2]");
      TORCH_CHECK(rng.device() == x.device(), "lightning_peft_cuda: rng is on ", rng.device(), " but x is on ", x.device(),
                  ": keep the (seed, offset) tensors on the device (the kernels read them there)");
    }
    rng_stack = at::stack(rngs).contiguous();  // [n, 2]
  }

  // hidden and mask start as zeros: the base rows (and the mask of adapters without dropout) stay so.
  Tensor hidden = at::zeros({N, p.R}, x.options());
  Tensor mask = any_drop ? at::zeros({N, (K + 7) / 8}, x.options().dtype(at::kByte)) : at::empty({0}, x.options().dtype(at::kByte));
  const Tensor a_stack = stack_padded(lora_as, p.R, K, false, x.options());  // [n, R, K]
  launch_grouped_shrink(type, seg, make_table(p, hidden_scale, p16),
                        ShrinkArgs{x2.data_ptr(), x2.stride(0), K, a_stack.data_ptr(), p.R,
                                   any_drop ? rng_stack.data_ptr<int64_t>() : nullptr,
                                   any_drop ? mask.data_ptr<uint8_t>() : nullptr, hidden.data_ptr()},
                        grouped_stream());

  const Tensor b_stack = stack_padded(lora_bs, D, p.R, false, x.options());  // [n, D, R]
  std::vector<double> scales(scalings.begin(), scalings.end());
  Tensor y = at::empty({N, D}, x.options());
  launch_grouped_expand(type, seg, make_table(p, scales, std::vector<uint32_t>(p.n, 0)),
                        ExpandArgs{hidden.data_ptr(), p.R, b_stack.data_ptr(), D, has_bias ? bias->contiguous().data_ptr() : nullptr,
                                   nullptr, y.data_ptr()},
                        grouped_stream());
  if (has_weight) y.addmm_(x2, weight->t());  // beta = 1: the base GEMM accumulates onto the LoRA term
  return {y.view(grouped_with_last(x.sizes(), D)), hidden, mask};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> lora_grouped_backward(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& weight, at::TensorList lora_as, at::TensorList lora_bs,
    const Tensor& hidden, const Tensor& order, const Tensor& offsets, int64_t tokens_per_unit, const Tensor& mask,
    at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_ps, bool compute_grad_x) {
  const Problem p = check_problem(x, lora_as, lora_bs, order, offsets, tokens_per_unit, scalings, dropout_ps);
  LIGHTNING_PEFT_GROUPED_GUARD(x);
  const int64_t K = x.size(-1);
  const int64_t D = grad_y.size(-1);
  const Tensor x2 = grouped_rows_of(x, K);
  const Tensor g2 = grouped_rows_of(grad_y, D);
  const int64_t N = x2.size(0);
  TORCH_CHECK(g2.size(0) == N, "lightning_peft_cuda: grad_y and x disagree on the number of rows");
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == N && hidden.size(1) == p.R && hidden.scalar_type() == x.scalar_type(),
              "lightning_peft_cuda: hidden must be [N, max rank] in x's dtype");
  const Tensor h = hidden.contiguous();
  const Segments seg = make_segments(order, offsets, tokens_per_unit, N);
  const ElementType type = grouped_element_type(x);

  std::vector<uint32_t> p16(p.n, 0), none(p.n, 0);
  std::vector<double> dh_scale(p.n), scales(scalings.begin(), scalings.end()), ones(p.n, 1.0);
  bool any_drop = false;
  for (int g = 0; g < p.n; ++g) {
    p16[g] = dropout_ps[g] > 0.0 ? grouped_drop_threshold(dropout_ps[g]) : 0;
    any_drop = any_drop || p16[g] > 0;
    dh_scale[g] = scalings[g] * (p16[g] > 0 ? grouped_keep_scale(p16[g]) : 1.0);
  }
  if (any_drop) {
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == N && mask.size(1) == (K + 7) / 8 &&
                    mask.device() == x.device(),
                "lightning_peft_cuda: mask must be uint8 [N, ceil(K/8)] on x's device when a dropout_p > 0");
  }
  const Tensor m = any_drop ? mask.contiguous() : Tensor();
  const uint8_t* mask_ptr = any_drop ? m.data_ptr<uint8_t>() : nullptr;

  // d_h = s·ks·dy·B [N, R], sorted order: a shrink of dy with the stacked Bᵀ [n, R, D].
  const Tensor bt_stack = stack_padded(lora_bs, p.R, D, true, x.options());
  Tensor d_h = at::zeros({N, p.R}, x.options());
  launch_grouped_shrink(type, seg, make_table(p, dh_scale, none),
                        ShrinkArgs{g2.data_ptr(), g2.stride(0), D, bt_stack.data_ptr(), p.R, nullptr, nullptr, d_h.data_ptr()},
                        grouped_stream());

  // grad_b[g]ᵀ = s·hᵀ·dy over g's rows and grad_a[g] = d_hᵀ·(x ∘ keep): fp32 [n, R, C].
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor ws_b = at::empty({p.n, p.R, D}, f32);
  launch_grouped_segment_grad(type, seg, make_table(p, scales, none),
                              SegmentGradArgs{h.data_ptr(), p.R, g2.data_ptr(), g2.stride(0), D, nullptr, ws_b.data_ptr<float>()},
                              grouped_stream());
  Tensor ws_a = at::empty({p.n, p.R, K}, f32);
  launch_grouped_segment_grad(type, seg, make_table(p, ones, p16),
                              SegmentGradArgs{d_h.data_ptr(), p.R, x2.data_ptr(), x2.stride(0), K, mask_ptr, ws_a.data_ptr<float>()},
                              grouped_stream());
  std::vector<Tensor> grad_as, grad_bs;
  for (int g = 0; g < p.n; ++g) {
    grad_as.push_back(ws_a[g].narrow(0, 0, p.ranks[g]).to(x.scalar_type()).contiguous());
    grad_bs.push_back(ws_b[g].narrow(0, 0, p.ranks[g]).t().to(x.scalar_type()).contiguous());
  }

  Tensor grad_x = at::empty({0}, x.options());
  if (compute_grad_x) {
    // (d_h·A) ∘ keep for every row (base rows 0), then the base GEMM accumulates onto it (beta = 1).
    const Tensor at_stack = stack_padded(lora_as, K, p.R, true, x.options());  // [n, K, R]
    Tensor gx = at::empty({N, K}, x.options());
    launch_grouped_expand(type, seg, make_table(p, ones, p16),
                          ExpandArgs{d_h.data_ptr(), p.R, at_stack.data_ptr(), K, nullptr, mask_ptr, gx.data_ptr()}, grouped_stream());
    if (weight.has_value() && weight->defined()) gx.addmm_(g2, *weight);
    grad_x = gx.view(x.sizes());
  }
  return {grad_x, grad_as, grad_bs};
}

}  // namespace
}  // namespace lightning_peft_cuda

// The CPU emulation build (tests only) registers the same ops for CPU tensors in its own namespace.
#ifndef LIGHTNING_PEFT_EMULATE
#define LIGHTNING_PEFT_GROUPED_NAMESPACE lightning_peft_cuda
#define LIGHTNING_PEFT_GROUPED_KEY CUDA
#else
#ifndef LIGHTNING_PEFT_GROUPED_EMU_NAMESPACE
#define LIGHTNING_PEFT_GROUPED_EMU_NAMESPACE lightning_peft_grouped_emu
#endif
#define LIGHTNING_PEFT_GROUPED_NAMESPACE LIGHTNING_PEFT_GROUPED_EMU_NAMESPACE
#define LIGHTNING_PEFT_GROUPED_KEY CPU
#endif
// One more macro level, so that the namespace macro expands before TORCH_LIBRARY pastes it.
#define LIGHTNING_PEFT_GROUPED_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LIGHTNING_PEFT_GROUPED_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

LIGHTNING_PEFT_GROUPED_FRAGMENT(LIGHTNING_PEFT_GROUPED_NAMESPACE, m) {
  m.def(
      "lora_grouped_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor[] lora_as, Tensor[] lora_bs, Tensor[] rngs, "
      "Tensor order, Tensor offsets, int tokens_per_unit, float[] scalings, float[] dropout_ps, bool training) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "lora_grouped_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor[] lora_as, Tensor[] lora_bs, Tensor hidden, "
      "Tensor order, Tensor offsets, int tokens_per_unit, Tensor mask, float[] scalings, float[] dropout_ps, "
      "bool compute_grad_x) -> (Tensor, Tensor[], Tensor[])");
}

LIGHTNING_PEFT_GROUPED_IMPL(LIGHTNING_PEFT_GROUPED_NAMESPACE, LIGHTNING_PEFT_GROUPED_KEY, m) {
  m.impl("lora_grouped_forward", &lightning_peft_cuda::lora_grouped_forward);
  m.impl("lora_grouped_backward", &lightning_peft_cuda::lora_grouped_backward);
}

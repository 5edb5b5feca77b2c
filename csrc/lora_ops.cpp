// CUDA implementation of the LoRA linear op pair, registered as private ops
//   lightning_peft_cuda::lora_forward / lora_backward
// that lightning_peft/ops/cuda_backend.py calls from the CUDA kernel of the public
// lightning_peft::lora_linear_forward / lora_linear_backward ops (same schemas and shapes: see
// lightning_peft/ops/lora_linear.py), plus lightning_peft_cuda::set_debug_options, which only the
// tests and the GPU check call (poisoned outputs with guard checks, a forced split plan).
//
// Work split: the big GEMMs (x·Wᵀ, dy·W) and the skinny ones of the rank-r factors run on cuBLAS
// through ATen; the passes over x that need the dropout mask are the fused kernels in the .cu files.
// The LoRA term is written first and the base GEMM accumulates onto it with beta = 1, so the
// [N, D] output is written by one GEMM and never read back by a separate pass.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef LIGHTNING_PEFT_EMULATE
#include <Python.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "lora_kernels.h"

namespace lightning_peft_cuda {
namespace {

using at::Tensor;

/// Test-only switches (set_debug_options); all off in normal use.
struct DebugOptions {
  std::atomic<bool> poison{false};       // outputs / workspaces start as NaN (0xFF bytes) + checked guard tails
  std::atomic<int64_t> splits{0};        // > 0: force this many splits (1 = every block walks all chunks / row tiles)
  std::atomic<int64_t> sm_count{0};      // > 0: plan for this many SMs instead of the device's
};

DebugOptions& debug() {
  static DebugOptions options;
  return options;
}

constexpr int kDropLevels = 1 << 16;

/// round(p * 65536) with round-half-to-even, capped at 65535, exactly like drop_threshold() in
/// lightning_peft/ops/dropout_mask.py (the cap keeps the keep scale finite for p within 2^-17 of 1).
uint32_t drop_threshold(double p) {
  return std::min(static_cast<uint32_t>(std::nearbyint(p * kDropLevels)), static_cast<uint32_t>(kDropLevels - 1));
}

double keep_scale(uint32_t p16) { return 1.0 / (1.0 - static_cast<double>(p16) / kDropLevels); }

/// x viewed as [N, K] with unit column stride; any row stride is fine (the kernels only read x),
/// so a copy happens only when no such view exists (e.g. a transposed activation).
Tensor rows_of(const Tensor& x, int64_t K) {
  Tensor x2 = x.reshape({-1, K});
  if (K > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

constexpr int64_t kGuard = 256;  // elements of NaN / 0xFF after each poisoned allocation

/// Allocations of one op call. With poisoning on, each is the head of a buffer filled with NaN
/// (0xFF for bytes) that runs kGuard elements past its end; check() then proves no kernel wrote
/// past an output and every element of it was written (the callers check the values).
class Allocator {
 public:
  explicit Allocator(bool poison) : poison_(poison) {}

  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    if (!poison_) return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
    const int64_t numel = c10::multiply_integers(sizes);
    Tensor buffer = at::empty({numel + kGuard}, options);
    if (buffer.scalar_type() == at::kByte) {
      buffer.fill_(0xFF);
    } else {
      buffer.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    buffers_.emplace_back(buffer, numel);
    return buffer.narrow(0, 0, numel).view(sizes);
  }

  void check() const {
    for (const auto& [buffer, numel] : buffers_) {
      const Tensor guard = buffer.narrow(0, numel, kGuard);
      const bool intact = buffer.scalar_type() == at::kByte ? guard.eq(0xFF).all().item<bool>() : guard.isnan().all().item<bool>();
      TORCH_CHECK(intact, "lightning_peft_cuda: a kernel wrote past the end of a ", buffer.scalar_type(), " buffer of ", numel,
                  " elements (guard overwritten)");
    }
  }

 private:
  bool poison_;
  std::vector<std::pair<Tensor, int64_t>> buffers_;
};

ElementType element_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "lightning_peft_cuda: kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The CPU emulation build (csrc/emulation/, tests only) runs this file on CPU tensors: no device
// guard, no stream, a pretend 4-SM device with 2 blocks per SM (small waves, so the split paths
// are exercised) unless set_debug_options asks for another plan.
#ifndef LIGHTNING_PEFT_EMULATE
int device_sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#define LIGHTNING_PEFT_DEVICE_GUARD(t) const c10::cuda::CUDAGuard device_guard((t).device())
#else
int device_sm_count() { return 4; }
cudaStream_t current_stream() { return nullptr; }
#define LIGHTNING_PEFT_DEVICE_GUARD(t) (void)(t)
#endif

int sm_count() {
  const int64_t forced = debug().sm_count.load();
  return forced > 0 ? static_cast<int>(forced) : device_sm_count();
}

/// hidden = keep_scale * (x ∘ keep) · Aᵀ and the packed keep bits, in one pass over x.
void dropout_hidden(const Tensor& x2, const Tensor& a, const Tensor& rng, uint32_t p16, Tensor& mask, Tensor& hidden, Allocator& alloc) {
  const int64_t N = x2.size(0), K = x2.size(1), r = a.size(0);
  if (N == 0) return;
  if (K == 0) {
    hidden.zero_();
    return;
  }
  const SplitPlan plan = plan_dropout_hidden(element_type(x2), N, K, r, sm_count(), debug().splits.load());
  Tensor ws = alloc.empty({plan.splits, plan.ws_rows, plan.ws_cols}, x2.options().dtype(at::kFloat));
  const DropoutHiddenArgs args{x2.data_ptr(), x2.stride(0), N, K, a.data_ptr(), static_cast<int>(r), rng.data_ptr<int64_t>(),
                               p16, mask.data_ptr<uint8_t>(), ws.data_ptr<float>()};
  const cudaStream_t stream = current_stream();
  launch_dropout_hidden(element_type(x2), args, plan, stream);
  launch_reduce_splits(element_type(x2), ws.data_ptr<float>(), plan.splits, ws.stride(0), plan.ws_cols, N, r,
                       static_cast<float>(keep_scale(p16)), hidden.data_ptr(), stream);
}

/// grad_a = d_hiddenᵀ · (x ∘ keep) and grad_x_lora (+)= (d_hidden · A) ∘ keep, in one pass over x.
void dropout_grad(const Tensor& x2, const Tensor& mask, const Tensor& d_hidden, const Tensor& a, Tensor& grad_x_lora,
                  Tensor& grad_a, Allocator& alloc) {
  const int64_t N = x2.size(0), K = x2.size(1), r = a.size(0);
  if (K == 0) return;
  if (N == 0) {
    grad_a.zero_();
    return;
  }
  const SplitPlan plan = plan_dropout_grad(element_type(x2), N, K, r, sm_count(), debug().splits.load());
  Tensor ws = alloc.empty({plan.splits, plan.ws_rows, plan.ws_cols}, x2.options().dtype(at::kFloat));
  const DropoutGradArgs args{x2.data_ptr(), x2.stride(0), N, K, mask.data_ptr<uint8_t>(), d_hidden.data_ptr(), static_cast<int>(r),
                             a.data_ptr(), grad_x_lora.defined() ? grad_x_lora.data_ptr() : nullptr, ws.data_ptr<float>()};
  const cudaStream_t stream = current_stream();
  launch_dropout_grad(element_type(x2), args, plan, stream);
  launch_reduce_splits(element_type(x2), ws.data_ptr<float>(), plan.splits, ws.stride(0), plan.ws_cols, r, K, 1.0f,
                       grad_a.data_ptr(), stream);
}

void check_same(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "lightning_peft_cuda: ", name, " is on ", t.device(), " but x is on ", x.device(),
              " (move the module and its inputs to one device)");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lightning_peft_cuda: dtype mismatch: x is ", x.scalar_type(), " but ", name,
              " is ", t.scalar_type(), " (use autocast or cast the module)");
}

/// An optional tensor argument (weight, scale) as a possibly undefined tensor: undefined when None.
Tensor or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

void check_common(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_a,
                  const Tensor& lora_b) {
#ifndef LIGHTNING_PEFT_EMULATE
  TORCH_CHECK(x.is_cuda(), "lightning_peft_cuda: x must be a CUDA tensor");
#endif
  TORCH_CHECK(x.dim() >= 1, "lightning_peft_cuda: x must have at least one dimension");
  const int64_t K = x.size(-1);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K, "lightning_peft_cuda: lora_a must be [r, K]");
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(1) == lora_a.size(0), "lightning_peft_cuda: lora_b must be [D, r]");
  const int64_t D = lora_b.size(0);  // the weight's rows when there is one (checked next)
  if (weight.defined()) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "lightning_peft_cuda: weight must be [D, K]");
    TORCH_CHECK(weight.size(0) == D, "lightning_peft_cuda: lora_b must be [D, r] with D = weight's rows");
    check_same(weight, "weight", x);
  }
  check_same(lora_a, "lora_a", x);
  check_same(lora_b, "lora_b", x);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == D, "lightning_peft_cuda: bias must be [D] = [", D, "], got ", bias->sizes());
    check_same(*bias, "bias", x);
  }
}

/// The optional per-output scale (DoRA): [D], on x's device and in its dtype.
void check_scale(const std::optional<Tensor>& scale, int64_t D, const Tensor& x) {
  if (!scale.has_value() || !scale->defined()) return;
  TORCH_CHECK(scale->dim() == 1 && scale->size(0) == D, "lightning_peft_cuda: scale must be [D] = [", D, "], got ", scale->sizes());
  check_same(*scale, "scale", x);
}

/// Whether the scale is folded into W's and B's rows (D x K elements scaled) rather than applied to
/// the N x D output / output gradient: whichever touches fewer elements (as ops/lora_linear.py).
bool folds_scale(int64_t N, int64_t K) { return K <= N; }

/// scale[:, None] * t for a [D, *] tensor (undefined stays undefined).
Tensor scaled_rows(const Tensor& t, const Tensor& scale) { return t.defined() ? t * scale.unsqueeze(1) : t; }

std::tuple<Tensor, Tensor, Tensor> lora_forward(const Tensor& x, const std::optional<Tensor>& weight_opt, const std::optional<Tensor>& bias,
                                                 const Tensor& lora_a, const Tensor& lora_b, const Tensor& rng,
                                                 double scaling, double dropout_p, bool training,
                                                 const std::optional<Tensor>& scale_opt) {
  Tensor weight = or_undefined(weight_opt);  // undefined: the LoRA branch alone, no base GEMM
  check_common(x, weight, bias, lora_a, lora_b);
  check_scale(scale_opt, lora_b.size(0), x);
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.numel() == 2, "lightning_peft_cuda: rng must be int64 [2]");
  TORCH_CHECK(rng.device() == x.device(), "lightning_peft_cuda: rng is on ", rng.device(), " but x is on ", x.device(),
              ": keep the (seed, offset) tensor on the device (a module buffer moves with .to(device)); "
              "the kernels read it there, so CUDA graphs replay with its current value");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lightning_peft_cuda: dropout_p must be in [0, 1)");
  LIGHTNING_PEFT_DEVICE_GUARD(x);
  Allocator alloc(debug().poison.load());
  const int64_t K = x.size(-1), D = lora_b.size(0), r = lora_a.size(0);
  const Tensor x2 = rows_of(x, K);  // [N, K]
  const int64_t N = x2.size(0);
  const Tensor a = lora_a.contiguous();
  const Tensor scale = or_undefined(scale_opt);  // undefined: no scale
  const bool scale_output = scale.defined() && !folds_scale(N, K);
  Tensor b_mat = lora_b;
  if (scale.defined() && !scale_output) {  // scale ⊙ (x Wᵀ + s h Bᵀ) = x (scale ⊙ W)ᵀ + s h (scale ⊙ B)ᵀ
    weight = scaled_rows(weight, scale);
    b_mat = scaled_rows(lora_b, scale);
  }

  Tensor hidden = alloc.empty({N, r}, x.options());
  Tensor mask;
  if (training && dropout_p > 0.0) {
    mask = alloc.empty({N, (K + 7) / 8}, x.options().dtype(at::kByte));
    dropout_hidden(x2, a, rng.contiguous(), drop_threshold(dropout_p), mask, hidden, alloc);
  } else {
    mask = at::empty({0}, x.options().dtype(at::kByte));
    at::mm_out(hidden, x2, a.t());  // eval / p == 0: no mask work at all
  }

  Tensor y = alloc.empty({N, D}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias && !scale_output) {
    at::addmm_out(y, *bias, hidden, b_mat.t(), 1.0, scaling);
  } else {
    at::addmm_out(y, y, hidden, b_mat.t(), 0.0, scaling);  // beta = 0: y's old contents are ignored
  }
  if (weight.defined()) y.addmm_(x2, weight.t());  // beta = 1: the base GEMM accumulates onto the LoRA term
  if (scale_output) {
    y.mul_(scale);
    if (has_bias) y.add_(*bias);
  }
  alloc.check();
  return {y.view(with_last(x.sizes(), D)), hidden, mask};
}

std::tuple<Tensor, Tensor, Tensor> lora_backward(const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& weight_opt,
                                                 const Tensor& lora_a, const Tensor& lora_b, const Tensor& lora_hidden,
                                                 const Tensor& mask, double scaling, double dropout_p, bool compute_grad_x,
                                                 const std::optional<Tensor>& scale_opt) {
  Tensor weight = or_undefined(weight_opt);  // undefined: grad_x is the LoRA branch's alone
  check_common(x, weight, std::nullopt, lora_a, lora_b);
  check_scale(scale_opt, lora_b.size(0), x);
  LIGHTNING_PEFT_DEVICE_GUARD(x);
  Allocator alloc(debug().poison.load());
  const int64_t K = x.size(-1), D = lora_b.size(0), r = lora_a.size(0);
  const Tensor x2 = rows_of(x, K);                 // [N, K]
  Tensor g2 = rows_of(grad_y, D);                  // [N, D]
  const int64_t N = x2.size(0);
  const Tensor scale = or_undefined(scale_opt);
  Tensor b_mat = lora_b, b_scale;  // b_scale: what grad_b's rows still need multiplying by
  if (scale.defined() && folds_scale(N, K)) {  // as in forward: scale ⊙ W, scale ⊙ B
    weight = scaled_rows(weight, scale);
    b_mat = scaled_rows(lora_b, scale);
    b_scale = scale;
  } else if (scale.defined()) {  // the scaled output gradient carries the scale into every product
    g2 = g2 * scale;
  }
  TORCH_CHECK(g2.size(0) == N, "lightning_peft_cuda: grad_y and x disagree on the number of rows");
  TORCH_CHECK(lora_hidden.dim() == 2 && lora_hidden.size(0) == N && lora_hidden.size(1) == r,
              "lightning_peft_cuda: lora_hidden must be [N, r]");
  const Tensor a = lora_a.contiguous();
  const bool dropout = dropout_p > 0.0;
  const uint32_t p16 = dropout ? drop_threshold(dropout_p) : 0;
  const double dh_scale = dropout ? scaling * keep_scale(p16) : scaling;

  // The two skinny GEMMs over dy: grad_b = s dyᵀ h [D, r] and d_hidden = s ks dy B [N, r].
  // beta = 0 ignores the outputs' old contents; the scales ride on cuBLAS's alpha.
  Tensor grad_b = alloc.empty({D, r}, x.options());
  at::addmm_out(grad_b, grad_b, g2.t(), lora_hidden, 0.0, scaling);
  if (b_scale.defined()) grad_b.mul_(b_scale.unsqueeze(1));
  Tensor d_hidden = alloc.empty({N, r}, x.options());
  at::addmm_out(d_hidden, d_hidden, g2, b_mat, 0.0, dh_scale);

  Tensor grad_a = alloc.empty({r, K}, x.options());  // [r, K]
  Tensor gx;                                         // [N, K]
  if (compute_grad_x) gx = alloc.empty({N, K}, x.options());
  if (dropout) {
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == N && mask.size(1) == (K + 7) / 8,
                "lightning_peft_cuda: mask must be uint8 [N, ceil(K/8)] when dropout_p > 0");
    TORCH_CHECK(mask.device() == x.device(), "lightning_peft_cuda: mask is on ", mask.device(), " but x is on ", x.device());
    dropout_grad(x2, mask.contiguous(), d_hidden, a, gx, grad_a, alloc);
    if (compute_grad_x && weight.defined()) gx.addmm_(g2, weight);  // beta = 1 onto the masked LoRA term
  } else {
    at::mm_out(grad_a, d_hidden.t(), x2);
    if (compute_grad_x) {
      at::mm_out(gx, d_hidden, a);
      if (weight.defined()) gx.addmm_(g2, weight);
    }
  }
  alloc.check();
  Tensor grad_x = compute_grad_x ? gx.view(x.sizes()) : at::empty({0}, x.options());
  return {grad_x, grad_a, grad_b};
}

/// Set the test-only switches (see DebugOptions; negative values leave one unchanged) and return
/// the previous values [poison, splits, sm_count], so that callers can restore them. In the
/// emulation build, `schedule` = [thread order, block order, seed] of the CPU scheduler.
std::vector<int64_t> set_debug_options(int64_t poison, int64_t splits, int64_t sm_count, at::IntArrayRef schedule) {
  DebugOptions& d = debug();
  std::vector<int64_t> previous{d.poison.load(), d.splits.load(), d.sm_count.load()};
  if (poison >= 0) d.poison = poison != 0;
  if (splits >= 0) d.splits = splits;
  if (sm_count >= 0) d.sm_count = sm_count;
#ifdef LIGHTNING_PEFT_EMULATE
  emu::Schedule& s = emu::schedule();
  previous.insert(previous.end(), {s.threads, s.blocks, static_cast<int64_t>(s.seed)});
  if (schedule.size() >= 1 && schedule[0] >= 0) s.threads = schedule[0];
  if (schedule.size() >= 2 && schedule[1] >= 0) s.blocks = schedule[1];
  if (schedule.size() >= 3 && schedule[2] >= 0) s.seed = static_cast<uint64_t>(schedule[2]);
#else
  TORCH_CHECK(schedule.empty(), "lightning_peft_cuda: a schedule exists only in the CPU emulation");
#endif
  return previous;
}

}  // namespace
}  // namespace lightning_peft_cuda

// The CPU emulation build registers the same ops for CPU tensors in another namespace
// (LIGHTNING_PEFT_EMU_NAMESPACE, so that a test can load a second, mutated build beside it).
#ifndef LIGHTNING_PEFT_EMULATE
#define LIGHTNING_PEFT_NAMESPACE lightning_peft_cuda
#define LIGHTNING_PEFT_DISPATCH_KEY CUDA
#else
#ifndef LIGHTNING_PEFT_EMU_NAMESPACE
#define LIGHTNING_PEFT_EMU_NAMESPACE lightning_peft_cuda_emu
#endif
#define LIGHTNING_PEFT_NAMESPACE LIGHTNING_PEFT_EMU_NAMESPACE
#define LIGHTNING_PEFT_DISPATCH_KEY CPU
#endif
// One more macro level, so that the namespace macro expands before TORCH_LIBRARY pastes it.
#define LIGHTNING_PEFT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LIGHTNING_PEFT_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

LIGHTNING_PEFT_LIBRARY(LIGHTNING_PEFT_NAMESPACE, m) {
  m.def(
      "lora_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor rng, float scaling, "
      "float dropout_p, bool training, Tensor? scale=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor lora_a, Tensor lora_b, Tensor lora_hidden, "
      "Tensor mask, float scaling, float dropout_p, bool compute_grad_x, Tensor? scale=None) -> (Tensor, Tensor, Tensor)");
  m.def("set_debug_options(int poison, int splits, int sm_count, int[] schedule=[]) -> int[]",
        &lightning_peft_cuda::set_debug_options);
}

LIGHTNING_PEFT_LIBRARY_IMPL(LIGHTNING_PEFT_NAMESPACE, LIGHTNING_PEFT_DISPATCH_KEY, m) {
  m.impl("lora_forward", &lightning_peft_cuda::lora_forward);
  m.impl("lora_backward", &lightning_peft_cuda::lora_backward);
}

#ifndef LIGHTNING_PEFT_EMULATE
// `import lightning_peft._C` loads this library (running the registrations above); the module
// itself is empty. The JIT build loads the same sources with torch.ops.load_library instead.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lightning_peft CUDA kernels (ops in torch.ops.lightning_peft_cuda)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif

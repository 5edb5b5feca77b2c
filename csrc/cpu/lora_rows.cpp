// CPU kernels of the LoRA op (lightning_peft/ops/cpu_backend.py builds and loads this file).
//
// The base GEMMs stay with ATen (x W^T in forward, g W in backward). Everything LoRA adds is one
// pass over the rows each way, so every large matrix is read once, and the dropped-out copy of x
// never exists outside a per-thread row buffer:
//
//   forward (y holds x W^T + b):   hidden[n] = ks * mask_n(x[n]) A^T;   y[n] += s * hidden[n] B^T
//   backward (grad_x holds g W):   d_h[n] = s * ks * g[n] B;   grad_b^T += s * hidden[n]^T g[n]
//                                  grad_a += d_h[n]^T mask_n(x[n]);   grad_x[n] += mask_n(d_h[n] A)
//
// (s: scaling, ks: 1 / keep probability.) The dropout mask is not stored: both passes draw it from
// the key (seed, offset) with a counter-based hash, element by element:
//
//   key  = mix64(seed + mix64(offset + GAMMA))                  (as uint64, wrapping)
//   word = mix64(key + (e / 4 + 1) * GAMMA) for flat element e = n * K + k
//   draw = bits 16 (e % 4) .. 16 (e % 4) + 15 of word;  element dropped iff draw < T = round(p * 65536)
//
// mix64 is SplitMix64's finaliser (Steele et al., "Fast splittable pseudorandom number generators",
// OOPSLA 2014). lightning_peft/ops/dropout_mask.py::hashed_keep_mask is the same draw in numpy, the
// reference the tests compare against.
//
// Partial sums of grad_a / grad_b are kept per chunk of rows, and the chunks depend on N only, so
// results are the same bits whatever the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "lora_rows.cpp reads 16-bit lanes of 64-bit words in little-endian order"
#endif

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
constexpr int64_t kRowsPerChunk = 128;  // rows per partial sum in backward
constexpr int64_t kMaxChunks = 64;      // bounds the partial sums' memory for huge N

// A uint16 view of the hash words (reading a uint64 buffer through it is allowed by may_alias).
typedef uint16_t __attribute__((may_alias)) lane_t;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t key_of(int64_t seed, int64_t offset) {
  return mix64(static_cast<uint64_t>(seed) + mix64(static_cast<uint64_t>(offset) + kGamma));
}

uint16_t threshold_of(double p) {  // dropout_mask.drop_threshold
  return static_cast<uint16_t>(std::min(std::nearbyint(p * 65536.0), 65535.0));
}

// Draws of the `count` elements from flat element `first` on: returns a pointer to the first one's
// 16-bit draw inside `words` (which must hold count / 4 + 2 words).
inline const lane_t* draw_lanes(uint64_t key, int64_t first, int64_t count, uint64_t* words) {
  const int64_t w0 = first >> 2;
  const int64_t w1 = (first + count + 3) >> 2;
#pragma omp simd
  for (int64_t w = w0; w < w1; ++w) {
    words[w - w0] = mix64(key + static_cast<uint64_t>(w + 1) * kGamma);
  }
  return reinterpret_cast<const lane_t*>(words) + (first - (w0 << 2));
}

// out[i] = x[i] where kept, else 0 (a dropped NaN or inf becomes exactly 0).
template <typename T>
inline void mask_row(const T* x, const lane_t* draws, uint16_t threshold, int64_t k, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) out[i] = draws[i] >= threshold ? x[i] : T(0);
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

struct Shape {
  int64_t n, k, d, r;
};

struct Dropout {
  uint64_t key;
  uint16_t threshold;  // 0: no dropout
};

// Where the kernels' rows live in x, y, grad_y and grad_x. Row i of the pass (of hidden, and of the
// masked sub-batch: the mask is drawn over the pass's rows) is row i of those tensors, or, for the
// grouped op, row i % T of unit units[i / T] (T rows each): one adapter's rows of a mixed batch in
// place, without gathering them.
struct RowMap {
  const int64_t* units = nullptr;
  int64_t rows_per_unit = 1;
  int64_t operator()(int64_t i) const { return units ? units[i / rows_per_unit] * rows_per_unit + i % rows_per_unit : i; }
};

// Rows go through the kernels 4 at a time: each value of A, B or an accumulator loaded from L1
// serves 4 rows' FMAs (the unblocked loops were load-bound: ~1.8x slower in the backward pass).
// A block past the last row is filled with a zero row (inputs) and a scratch row (outputs), so
// one code path serves every block and the padding adds exact zeros.
constexpr int kBlock = 4;

// One thread's buffers: per block row the hash words and the masked row, plus a zero row.
template <typename T>
struct Scratch {
  std::vector<uint64_t> words;
  std::vector<T> masked;
  std::vector<T> zeros;  // [max(K, D, r)]: the padding's input rows, and all-zero draws (keep at threshold 0)
  std::vector<T> sink;   // [max(K, D, r)]: the padding's output rows
  int64_t words_per_row;
  Scratch(const Shape& s, bool dropout)
      : words(dropout ? kBlock * (s.k / 4 + 2) : 0),
        masked(dropout ? kBlock * s.k : 0),
        zeros(std::max({s.k, s.d, s.r}), T(0)),
        sink(std::max({s.k, s.d, s.r})),
        words_per_row(s.k / 4 + 2) {}
  const lane_t* zero_draws() const { return reinterpret_cast<const lane_t*>(zeros.data()); }
};

// The block's rows as the LoRA branch sees them (x's row, its masked copy, or zeros past the last
// row) and their draws (all zero without dropout: threshold 0 keeps them; zero past the last row).
template <typename T>
void block_inputs(const T* x, int64_t row0, const Shape& s, const Dropout& drop, const RowMap& map, Scratch<T>& sc,
                  const T* xs[kBlock], const lane_t* draws[kBlock]) {
  for (int b = 0; b < kBlock; ++b) {
    const int64_t row = row0 + b;
    if (row >= s.n || drop.threshold == 0) {
      xs[b] = row >= s.n ? sc.zeros.data() : x + map(row) * s.k;
      draws[b] = sc.zero_draws();
      continue;
    }
    draws[b] = draw_lanes(drop.key, row * s.k, s.k, sc.words.data() + b * sc.words_per_row);
    T* out = sc.masked.data() + b * s.k;
    mask_row(x + map(row) * s.k, draws[b], drop.threshold, s.k, out);
    xs[b] = out;
  }
}

// out[b][i] += sum_j c[b * R + j] * m[j * len + i] for the 4 rows of a block (where draws[b][i] >=
// threshold when Masked): the rank-R combination of m's rows, B^T in forward and A in backward.
// The rank R is a template argument so that the loop over it unrolls and the loop over i
// vectorizes (with a run-time rank GCC vectorized the short rank loop instead: 2-4x slower).
template <typename T, int R, bool Masked>
inline void add_combination(const T* c, const T* m, int64_t len, T* const out[kBlock], const lane_t* const draws[kBlock],
                            uint16_t threshold) {
  T *o0 = out[0], *o1 = out[1], *o2 = out[2], *o3 = out[3];
  const T *c0 = c, *c1 = c + R, *c2 = c + 2 * R, *c3 = c + 3 * R;
  const lane_t* const* d = Masked ? draws : nullptr;
  const lane_t *m0 = d ? d[0] : nullptr, *m1 = d ? d[1] : nullptr, *m2 = d ? d[2] : nullptr, *m3 = d ? d[3] : nullptr;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    T t0 = 0, t1 = 0, t2 = 0, t3 = 0;
#pragma GCC unroll 64
    for (int j = 0; j < R; ++j) {
      const T mv = m[j * len + i];
      t0 += c0[j] * mv;
      t1 += c1[j] * mv;
      t2 += c2[j] * mv;
      t3 += c3[j] * mv;
    }
    if constexpr (Masked) {
      o0[i] += m0[i] >= threshold ? t0 : T(0);
      o1[i] += m1[i] >= threshold ? t1 : T(0);
      o2[i] += m2[i] >= threshold ? t2 : T(0);
      o3[i] += m3[i] >= threshold ? t3 : T(0);
    } else {
      o0[i] += t0;
      o1[i] += t1;
      o2[i] += t2;
      o3[i] += t3;
    }
  }
}

// hidden[row] = ks * xs[b] A^T and y[row] += s * hidden[row] B^T for the 4 rows of a block.
template <typename T, int R>
void forward_block(const T* const xs[kBlock], T* const ys[kBlock], T* const hs[kBlock], const T* a, const T* bt,
                   const Shape& s, T keep_scale, T scaling) {
  T sh[kBlock * R];
  for (int64_t j = 0; j < R; ++j) {
    const T* aj = a + j * s.k;
    const T *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < s.k; ++i) {
      const T av = aj[i];
      s0 += x0[i] * av;
      s1 += x1[i] * av;
      s2 += x2[i] * av;
      s3 += x3[i] * av;
    }
    const T h[kBlock] = {keep_scale * s0, keep_scale * s1, keep_scale * s2, keep_scale * s3};
    for (int b = 0; b < kBlock; ++b) {
      hs[b][j] = h[b];
      sh[b * R + j] = scaling * h[b];
    }
  }
  add_combination<T, R, false>(sh, bt, s.d, ys, nullptr, 0);
}

template <typename T, int R>
void forward_rows(const T* x, const T* a, const T* bt, T* y, T* hidden, Shape s, Dropout drop, RowMap map, T keep_scale,
                  T scaling) {
  const int64_t blocks = (s.n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 4, [&](int64_t block_begin, int64_t block_end) {
    Scratch<T> sc(s, drop.threshold > 0);
    const T* xs[kBlock];
    const lane_t* draws[kBlock];
    T* ys[kBlock];
    T* hs[kBlock];
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t row0 = blk * kBlock;
      block_inputs(x, row0, s, drop, map, sc, xs, draws);
      for (int b = 0; b < kBlock; ++b) {
        const bool real = row0 + b < s.n;
        ys[b] = real ? y + map(row0 + b) * s.d : sc.sink.data();
        hs[b] = real ? hidden + (row0 + b) * s.r : sc.sink.data();
      }
      forward_block<T, R>(xs, ys, hs, a, bt, s, keep_scale, scaling);
    }
  });
}

// Backward of one block: d_h = alpha g B, grad_b^T += s h^T g, grad_a += d_h^T xs, grad_x += mask(d_h A).
template <typename T, int R>
void backward_block(const T* const gs[kBlock], const T* const hs[kBlock], const T* const xs[kBlock],
                    const lane_t* const draws[kBlock], T* const gxs[kBlock], const T* a, const T* bt, const Shape& s,
                    uint16_t threshold, T alpha, T scaling, T* acc_a, T* acc_bt) {
  T dh[kBlock * R];
  const T *g0 = gs[0], *g1 = gs[1], *g2 = gs[2], *g3 = gs[3];
  for (int64_t j = 0; j < R; ++j) {
    const T* bj = bt + j * s.d;
    T* accj = acc_bt + j * s.d;
    const T c0 = scaling * hs[0][j], c1 = scaling * hs[1][j], c2 = scaling * hs[2][j], c3 = scaling * hs[3][j];
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < s.d; ++i) {
      const T v0 = g0[i], v1 = g1[i], v2 = g2[i], v3 = g3[i], bv = bj[i];
      s0 += v0 * bv;
      s1 += v1 * bv;
      s2 += v2 * bv;
      s3 += v3 * bv;
      accj[i] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3;
    }
    dh[j] = alpha * s0;
    dh[R + j] = alpha * s1;
    dh[2 * R + j] = alpha * s2;
    dh[3 * R + j] = alpha * s3;
  }
  const T *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
  const T *d0 = dh, *d1 = dh + R, *d2 = dh + 2 * R, *d3 = dh + 3 * R;
  for (int64_t j = 0; j < R; ++j) {
    T* accj = acc_a + j * s.k;
    const T e0 = d0[j], e1 = d1[j], e2 = d2[j], e3 = d3[j];
#pragma omp simd
    for (int64_t i = 0; i < s.k; ++i) accj[i] += e0 * x0[i] + e1 * x1[i] + e2 * x2[i] + e3 * x3[i];
  }
  if (gxs[0] == nullptr) return;
  add_combination<T, R, true>(dh, a, s.k, gxs, draws, threshold);
}

template <typename T, int R>
void backward_rows(const T* g, const T* x, const T* a, const T* bt, const T* hidden, T* grad_x, T* grad_a, T* grad_bt,
                   Shape s, Dropout drop, RowMap map, T alpha, T scaling) {
  const int64_t blocks = (s.n + kBlock - 1) / kBlock;
  const int64_t chunks = std::clamp<int64_t>((s.n + kRowsPerChunk - 1) / kRowsPerChunk, 1, kMaxChunks);
  const int64_t per_chunk = s.r * (s.k + s.d);
  std::vector<T> partials(static_cast<size_t>(chunks * per_chunk), T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    Scratch<T> sc(s, drop.threshold > 0);
    const T* xs[kBlock];
    const lane_t* draws[kBlock];
    const T* gs[kBlock];
    const T* hs[kBlock];
    T* gxs[kBlock];
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      T* acc_a = partials.data() + c * per_chunk;  // [r, K]
      T* acc_bt = acc_a + s.r * s.k;               // [r, D]
      for (int64_t blk = c * blocks / chunks; blk < (c + 1) * blocks / chunks; ++blk) {
        const int64_t row0 = blk * kBlock;
        block_inputs(x, row0, s, drop, map, sc, xs, draws);
        for (int b = 0; b < kBlock; ++b) {
          const int64_t row = row0 + b;
          const bool real = row < s.n;
          gs[b] = real ? g + map(row) * s.d : sc.zeros.data();
          hs[b] = real ? hidden + row * s.r : sc.zeros.data();
          gxs[b] = grad_x == nullptr ? nullptr : real ? grad_x + map(row) * s.k : sc.sink.data();
        }
        backward_block<T, R>(gs, hs, xs, draws, gxs, a, bt, s, drop.threshold, alpha, scaling, acc_a, acc_bt);
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {  // in chunk order: the same sums whatever the thread count
    const T* acc_a = partials.data() + c * per_chunk;
    axpy(T(1), acc_a, grad_a, s.r * s.k);
    axpy(T(1), acc_a + s.r * s.k, grad_bt, s.r * s.d);
  }
}

void check_rows_inputs(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "lora_rows: x must be a contiguous CPU [N, K] tensor");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == x.size(1), "lora_rows: lora_a must be [r, K]");
  TORCH_CHECK(b.dim() == 2 && b.size(1) == a.size(0), "lora_rows: lora_b must be [D, r]");
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(), "lora_rows: dtypes differ");
}

double keep_scale_of(uint16_t threshold) { return 65536.0 / (65536.0 - threshold); }

constexpr int64_t kMaxRank = 64;  // lightning_peft/ops/cpu_backend.py: MAX_RANK

// The rank the kernels run at: the smallest instantiated R >= r (the rows past r are zeros).
int64_t padded_rank(int64_t r) {
  for (int64_t rank : {4, 8, 16, 32, 64}) {
    if (r <= rank) return rank;
  }
  TORCH_CHECK(false, "lora_rows: rank ", r, " is above the kernels' maximum ", kMaxRank);
}

template <typename F>
void with_rank(int64_t rank, F&& f) {
  switch (rank) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: return f(std::integral_constant<int, 64>{});
  }
}

// t [r, C] with zero rows appended up to [rank, C] (t itself when r == rank).
at::Tensor pad_rows(const at::Tensor& t, int64_t rank) {
  if (t.size(0) == rank) return t.contiguous();
  at::Tensor padded = at::zeros({rank, t.size(1)}, t.options());
  padded.narrow(0, 0, t.size(0)).copy_(t);
  return padded;
}

// The pass's rows (all of x's, or the units' T rows each) and their map; checks the unit ids.
std::pair<int64_t, RowMap> rows_of(const at::Tensor& x, const c10::optional<at::Tensor>& units, int64_t rows_per_unit) {
  if (!units.has_value()) return {x.size(0), RowMap{}};
  const at::Tensor& u = *units;
  TORCH_CHECK(u.scalar_type() == at::kLong && u.dim() == 1 && u.is_contiguous() && u.device().is_cpu(),
              "lora_rows: units must be a contiguous int64 CPU vector");
  TORCH_CHECK(rows_per_unit > 0 && x.size(0) % rows_per_unit == 0, "lora_rows: rows_per_unit must divide x's rows");
  const int64_t count = x.size(0) / rows_per_unit;
  const int64_t* ids = u.data_ptr<int64_t>();
  for (int64_t i = 0; i < u.numel(); ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < count, "lora_rows: unit id out of range");
  return {u.numel() * rows_per_unit, RowMap{ids, rows_per_unit}};
}

// What both passes start from: the checked shape (rank padded), the row map, the factors at the
// padded rank (A [R, K], B^T [R, D]) and the dropout key.
struct Pass {
  Shape s;
  RowMap map;
  at::Tensor a, bt;
  Dropout drop;
};

Pass prepare_pass(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& units,
                  int64_t rows_per_unit, int64_t seed, int64_t offset, double dropout_p) {
  check_rows_inputs(x, lora_a, lora_b);
  const auto [n, map] = rows_of(x, units, rows_per_unit);
  const Shape s{n, x.size(1), lora_b.size(0), padded_rank(lora_a.size(0))};
  return {s, map, pad_rows(lora_a, s.r), pad_rows(lora_b.t(), s.r), Dropout{key_of(seed, offset), threshold_of(dropout_p)}};
}

// y [N, D] (x W^T + b on entry) gets the LoRA term added in place; returns hidden [n, r] for the
// pass's n rows (N, or the units' rows in unit order).
at::Tensor lora_rows_forward(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b, at::Tensor y,
                             int64_t seed, int64_t offset, double dropout_p, double scaling,
                             const c10::optional<at::Tensor>& units, int64_t rows_per_unit) {
  const Pass pass = prepare_pass(x, lora_a, lora_b, units, rows_per_unit, seed, offset, dropout_p);
  const Shape& s = pass.s;
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(y.is_contiguous() && y.size(0) == x.size(0) && y.size(1) == s.d && y.scalar_type() == x.scalar_type(),
              "lora_rows_forward: y must be a contiguous [N, D] tensor");
  at::Tensor hidden = at::empty({s.n, s.r}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_rows_forward", [&] {
    with_rank(s.r, [&](auto rank) {
      forward_rows<scalar_t, decltype(rank)::value>(
          x.data_ptr<scalar_t>(), pass.a.data_ptr<scalar_t>(), pass.bt.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          hidden.data_ptr<scalar_t>(), s, pass.drop, pass.map, static_cast<scalar_t>(keep_scale_of(pass.drop.threshold)),
          static_cast<scalar_t>(scaling));
    });
  });
  return r == s.r ? hidden : hidden.narrow(1, 0, r).contiguous();
}

// grad_x [N, K] (g W on entry) gets the LoRA part added in place, unless it is empty (no grad_x
// wanted); hidden is the forward's [n, r]; returns (grad_a [r, K], grad_b [D, r]).
std::tuple<at::Tensor, at::Tensor> lora_rows_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, const at::Tensor& hidden, at::Tensor grad_x,
                                                      int64_t seed, int64_t offset, double dropout_p, double scaling,
                                                      const c10::optional<at::Tensor>& units, int64_t rows_per_unit) {
  const Pass pass = prepare_pass(x, lora_a, lora_b, units, rows_per_unit, seed, offset, dropout_p);
  const Shape& s = pass.s;
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.size(0) == x.size(0) && grad_y.size(1) == s.d, "lora_rows_backward: grad_y must be contiguous [N, D]");
  TORCH_CHECK(hidden.size(0) == s.n && hidden.size(1) == r, "lora_rows_backward: hidden must be [n, r]");
  const bool with_grad_x = grad_x.numel() > 0;
  TORCH_CHECK(!with_grad_x || (grad_x.is_contiguous() && grad_x.size(0) == x.size(0) && grad_x.size(1) == s.k),
              "lora_rows_backward: grad_x must be contiguous [N, K] or empty");
  const at::Tensor hidden_padded = pad_rows(hidden.t(), s.r).t().contiguous();  // [N, R]
  at::Tensor grad_a = at::zeros({s.r, s.k}, x.options());
  at::Tensor grad_bt = at::zeros({s.r, s.d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_rows_backward", [&] {
    with_rank(s.r, [&](auto rank) {
      backward_rows<scalar_t, decltype(rank)::value>(
          grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), pass.a.data_ptr<scalar_t>(), pass.bt.data_ptr<scalar_t>(),
          hidden_padded.data_ptr<scalar_t>(), with_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr, grad_a.data_ptr<scalar_t>(),
          grad_bt.data_ptr<scalar_t>(), s, pass.drop, pass.map, static_cast<scalar_t>(scaling * keep_scale_of(pass.drop.threshold)),
          static_cast<scalar_t>(scaling));
    });
  });
  return {grad_a.narrow(0, 0, r), grad_bt.narrow(0, 0, r).t().contiguous()};
}

// The keep mask bool [rows, cols] the kernels draw for key (seed, offset): for tests and inspection.
at::Tensor lora_rows_keep_mask(int64_t seed, int64_t offset, int64_t rows, int64_t cols, double dropout_p) {
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  const Dropout drop{key_of(seed, offset), threshold_of(dropout_p)};
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> words(cols / 4 + 2);
    for (int64_t row = begin; row < end; ++row) {
      const lane_t* draws = draw_lanes(drop.key, row * cols, cols, words.data());
      for (int64_t i = 0; i < cols; ++i) out[row * cols + i] = draws[i] >= drop.threshold;
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY(lightning_peft_cpu, m) {
  // units / rows_per_unit: the pass covers only those units of x (T rows each, in that order; the
  // grouped op's rows of one adapter), the mask drawn over them as one sub-batch. None: all of x.
  m.def("lora_rows_forward(Tensor x, Tensor lora_a, Tensor lora_b, Tensor(a!) y, int seed, int offset, float dropout_p, float scaling, Tensor? units=None, int rows_per_unit=1) -> Tensor");
  m.def("lora_rows_backward(Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor hidden, Tensor(a!) grad_x, int seed, int offset, float dropout_p, float scaling, Tensor? units=None, int rows_per_unit=1) -> (Tensor, Tensor)");
  m.def("lora_rows_keep_mask(int seed, int offset, int rows, int cols, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightning_peft_cpu, CPU, m) {
  m.impl("lora_rows_forward", &lora_rows_forward);
  m.impl("lora_rows_backward", &lora_rows_backward);
}

TORCH_LIBRARY_IMPL(lightning_peft_cpu, CompositeExplicitAutograd, m) {
  m.impl("lora_rows_keep_mask", &lora_rows_keep_mask);
}

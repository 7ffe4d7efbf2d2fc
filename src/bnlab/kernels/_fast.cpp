// bnlab's small-call path: batch norm on CPU float32/float64 (and bfloat16/float16 inputs with
// float32 parameters and buffers) as one C++ call and a C++ autograd node (bnlab.kernels.fast).
// Same math as the numba kernels (bnlab.kernels.cols / rows): the statistics from float64 sums of
// ``x - shift`` (shift: each channel's first value), the output and the gradients formed in
// float64 and rounded once (a half-precision output: float32 with a two-part mean, see
// HalfOperands), the running update in float64 with the non-finite policy's check before any
// buffer is written.
//
// Every entry point returns None for a call it does not serve (a layout, dtype, shape or buffer it
// does not take); the Python caller then takes the general path, which also raises the errors.
//
// Training forward, per channel c over the M = N * S values x_i:
//   shift = x_0, d_i = x_i - shift, s1 = sum d_i, s2 = sum d_i^2           (float64)
//   mean = shift + s1 / M, var = max(s2 / M - (s1 / M)^2, 0), invstd = 1 / sqrt(var + eps)
//   y_i = (x_i - mean) * (invstd * w) + b
// Backward (training), with xhat_i = (x_i - mean) * invstd:
//   db = sum dy_i, dw = invstd * sum dy_i (x_i - mean)
//   dx_i = k ((dy_i - db / M) - (x_i - mean) kx),  k = invstd * w,  kx = invstd^2 sum dy_i (x_i - mean) / M
// (the derivative of y through mean and var: the term in db / M from d mean, the term in kx from
// d var). When a graph of the backward is asked for (create_graph=True) the backward runs the same
// formula in differentiable ATen ops with the statistics recomputed from x.
//
// Layouts: (M, C) and channels_last (the (N * spatial, C) matrix; few channels read as wide rows of
// several consecutive rows), and contiguous (N, C, *) (a channel's N runs summed, then normalized
// from cache). Loops run on torch's intra-op threads (at::parallel_for: the extension is built with
// OpenMP against torch's own runtime) from 2^15 values. The norm-act layers' epilogue, y =
// relu(BN(x) + res), runs inside the same passes (see Epilogue).

// What the file uses, not <torch/extension.h>: that one also parses torch's whole C++ frontend
// (torch/all.h), about a third of the build's time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
#include <torch/python.h>
#include <torch/types.h>

#include <pthread.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace bnlab {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// elements: below this, loops run on the calling thread (measured fwd+bwd on (M, C): 256x512 101 us
// serial, 75 us on two threads, torch 83; 64x128 the same either way)
int64_t kSerialBelow = 1 << 15;

// half-precision values (bfloat16, float16) as float32, and back: bfloat16 by its bits (so that the
// loops vectorize), rounding to nearest even as torch does; the others by conversion
template <typename T>
inline float ldf(T v) {
  return static_cast<float>(v);
}

template <>
inline float ldf<c10::BFloat16>(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T cvtf(float f) {
  return static_cast<T>(f);
}

template <>
inline c10::BFloat16 cvtf<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r), c10::BFloat16::from_bits());
}

// loads and stores in float64: a store rounds once from float64 (bfloat16: to float32, then to
// nearest even, as torch does)
template <typename T>
inline double ld(T v) {
  return static_cast<double>(v);
}

template <>
inline double ld<c10::BFloat16>(c10::BFloat16 v) {
  return static_cast<double>(ldf(v));
}

template <typename T>
inline T cvt(double d) {
  return static_cast<T>(d);
}

template <>
inline c10::BFloat16 cvt<c10::BFloat16>(double d) {
  return cvtf<c10::BFloat16>(static_cast<float>(d));
}

template <typename T>
constexpr bool is_half() {
  return std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
}

// A half-precision output's elementwise passes run in float32: x - mean with the mean in two parts
// (hi + lo, float32 each), so the difference keeps float32's 24 bits however large the mean is,
// then the affine (or the gradient formula) in float32: 24 bits against the output's 8
// (bfloat16) or 11 (float16), so the output is the float64 formula's rounded once, but for rare
// double-rounding ties. The statistics' sums stay float64.
struct HalfOperands {
  std::vector<float> buf;
  float *hi, *lo, *a, *b, *c;
  // a, b, c: per-channel float32 copies of three float64 operands
  HalfOperands(int64_t n, const double* mean, const double* a64, const double* b64, const double* c64)
      : buf(5 * n) {
    hi = buf.data();
    lo = hi + n;
    a = lo + n;
    b = a + n;
    c = b + n;
    for (int64_t j = 0; j < n; ++j) {
      hi[j] = static_cast<float>(mean[j]);
      lo[j] = static_cast<float>(mean[j] - static_cast<double>(hi[j]));
      a[j] = static_cast<float>(a64[j]);
      b[j] = b64 ? static_cast<float>(b64[j]) : 0.0f;
      c[j] = c64 ? static_cast<float>(c64[j]) : 0.0f;
    }
  }
};

// y = ((x - hi) - lo) * scale + beta over (M, C), float32
template <typename T>
__attribute__((noinline)) void cols_affine_f(const T* __restrict__ x, T* __restrict__ y, int64_t m, int64_t c,
                                             const float* __restrict__ hi, const float* __restrict__ lo,
                                             const float* __restrict__ scale, const float* __restrict__ beta) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = x + i * c;
    T* out = y + i * c;
    for (int64_t j = 0; j < c; ++j) out[j] = cvtf<T>(((ldf(row[j]) - hi[j]) - lo[j]) * scale[j] + beta[j]);
  }
}

// the same over (N, C, S) runs r0..r1 (eval)
template <typename T>
__attribute__((noinline)) void rows_affine_f(const T* __restrict__ x, T* __restrict__ y, int64_t c, int64_t s,
                                             int64_t r0, int64_t r1, const float* __restrict__ hi,
                                             const float* __restrict__ lo, const float* __restrict__ scale,
                                             const float* __restrict__ beta) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t j = r % c;
    const float h = hi[j], l = lo[j], sc = scale[j], be = beta[j];
    const T* in = x + r * s;
    T* out = y + r * s;
    for (int64_t q = 0; q < s; ++q) out[q] = cvtf<T>(((ldf(in[q]) - h) - l) * sc + be);
  }
}

// dx = k ((dy - mdy) - ((x - hi) - lo) kx) over (M, C), float32
template <typename T>
__attribute__((noinline)) void cols_dx_f(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                         int64_t m, int64_t c, const float* __restrict__ hi,
                                         const float* __restrict__ lo, const float* __restrict__ k,
                                         const float* __restrict__ mdy, const float* __restrict__ kx) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = x + i * c;
    const T* g = dy + i * c;
    T* out = dx + i * c;
    for (int64_t j = 0; j < c; ++j)
      out[j] = cvtf<T>(k[j] * ((ldf(g[j]) - mdy[j]) - ((ldf(row[j]) - hi[j]) - lo[j]) * kx[j]));
  }
}

template <typename T>
double limit_of() {
  return ld(std::numeric_limits<T>::max());
}

bool is_vec(const Tensor& t, int64_t c, at::ScalarType dt) {
  return !t.defined() || (t.device().is_cpu() && t.scalar_type() == dt && t.dim() == 1 && t.numel() == c &&
                          t.is_contiguous() && !t.requires_grad());
}

bool is_param(const Tensor& t, int64_t c, at::ScalarType dt) {
  return !t.defined() || (t.device().is_cpu() && t.scalar_type() == dt && t.dim() == 1 && t.numel() == c &&
                          t.is_contiguous());
}

// (M, C) sums of x - shift and its square, float64, channels [c0, c1)
template <typename T>
__attribute__((noinline)) void cols_sums(const T* __restrict__ x, int64_t m, int64_t c, int64_t c0, int64_t c1,
                                         const double* __restrict__ shift, double* __restrict__ s1,
                                         double* __restrict__ s2) {
  // four rows a step (one accumulator update per four values)
  for (int64_t j = c0; j < c1; ++j) {
    s1[j] = 0.0;
    s2[j] = 0.0;
  }
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* r0 = x + i * c;
    const T* r1 = r0 + c;
    const T* r2 = r1 + c;
    const T* r3 = r2 + c;
    for (int64_t j = c0; j < c1; ++j) {
      const double k = shift[j];
      double d0 = ld(r0[j]) - k, d1 = ld(r1[j]) - k;
      double d2 = ld(r2[j]) - k, d3 = ld(r3[j]) - k;
      s1[j] += (d0 + d1) + (d2 + d3);
      s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; i < m; ++i) {
    const T* row = x + i * c;
    for (int64_t j = c0; j < c1; ++j) {
      double d = ld(row[j]) - shift[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
}

template <typename T>
__attribute__((noinline)) void cols_affine(const T* __restrict__ x, T* __restrict__ y, int64_t m, int64_t c, int64_t c0, int64_t c1, const double* __restrict__ mean,
                 const double* __restrict__ scale, const double* __restrict__ beta) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = x + i * c;
    T* out = y + i * c;
    for (int64_t j = c0; j < c1; ++j) {
      out[j] = cvt<T>((ld(row[j]) - mean[j]) * scale[j] + beta[j]);
    }
  }
}

// per-(n, c) runs of S values (the NC* layout, contiguous)
template <typename T>
__attribute__((noinline)) void rows_affine(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t c, int64_t s, int64_t r0, int64_t r1, const double* __restrict__ mean,
                 const double* __restrict__ scale, const double* __restrict__ beta) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = r % c;
    const double mu = mean[j], sc = scale[j], be = beta[j];
    const T* in = x + r * s;
    T* out = y + r * s;
    #pragma GCC ivdep
    for (int64_t q = 0; q < s; ++q) out[q] = cvt<T>((ld(in[q]) - mu) * sc + be);
  }
}

template <typename T>
__attribute__((noinline)) void cols_grad_sums(const T* __restrict__ x, const T* __restrict__ dy, int64_t m, int64_t c,
                                              int64_t c0, int64_t c1, const double* __restrict__ mean,
                                              double* __restrict__ s1, double* __restrict__ s2) {
  for (int64_t j = c0; j < c1; ++j) {
    s1[j] = 0.0;
    s2[j] = 0.0;
  }
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* x0 = x + i * c;
    const T* g0 = dy + i * c;
    for (int64_t j = c0; j < c1; ++j) {
      const double mu = mean[j];
      double g_0 = ld(g0[j]), g_1 = ld(g0[c + j]);
      double g_2 = ld(g0[2 * c + j]), g_3 = ld(g0[3 * c + j]);
      s1[j] += (g_0 + g_1) + (g_2 + g_3);
      s2[j] += (g_0 * (ld(x0[j]) - mu) + g_1 * (ld(x0[c + j]) - mu)) +
               (g_2 * (ld(x0[2 * c + j]) - mu) + g_3 * (ld(x0[3 * c + j]) - mu));
    }
  }
  for (; i < m; ++i) {
    const T* row = x + i * c;
    const T* g = dy + i * c;
    for (int64_t j = c0; j < c1; ++j) {
      double gv = ld(g[j]);
      s1[j] += gv;
      s2[j] += gv * (ld(row[j]) - mean[j]);
    }
  }
}

template <typename T>
__attribute__((noinline)) void cols_dx(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t m, int64_t c, int64_t c0, int64_t c1, const double* __restrict__ mean,
             const double* __restrict__ k, const double* __restrict__ mdy, const double* __restrict__ kx) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = x + i * c;
    const T* g = dy + i * c;
    T* out = dx + i * c;
    for (int64_t j = c0; j < c1; ++j) {
      out[j] = cvt<T>(k[j] * ((ld(g[j]) - mdy[j]) -
                                      (ld(row[j]) - mean[j]) * kx[j]));
    }
  }
}

// dx = a dy + (b x + e) over (M, C), float32 data, float64 operands: the backward's formula
// k ((dy - mdy) - (x - mean) kx) with its per-channel constants gathered (a = k, b = -k kx,
// e = k (kx mean - mdy)), two fused multiply-adds a value instead of five operations. Computed in
// float64, the cancellation between b x and e costs about mean / std units of float64 round-off,
// which stays far below a float32 unit for any mean / std a float32 tensor resolves
template <typename T>
__attribute__((noinline)) void cols_dx_affine(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                              int64_t m, int64_t c, const double* __restrict__ a,
                                              const double* __restrict__ b, const double* __restrict__ e) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = x + i * c;
    const T* g = dy + i * c;
    T* out = dx + i * c;
    for (int64_t j = 0; j < c; ++j) out[j] = cvt<T>(std::fma(a[j], ld(g[j]), std::fma(b[j], ld(row[j]), e[j])));
  }
}

// set in a child forked from this process: torch's OpenMP pool does not cross fork(), and a parallel
// region in such a child can hang (torch's own kernels too, unless the child runs one thread), so a
// forked child runs every loop here on its calling thread
std::atomic<bool> g_forked{false};

bool serial_only() {
  return g_forked.load(std::memory_order_relaxed) || at::get_num_threads() <= 1;
}

// the row blocks of an (M, C) tensor: one per thread (one when the tensor is small), so that a
// thread reads one contiguous range of memory; per-block sums are added in block order
int64_t row_blocks(int64_t m, int64_t c) {
  if (m * c < kSerialBelow || serial_only()) return 1;
  int64_t nt = at::get_num_threads();
  int64_t most = m / 16;  // at least 16 rows a block
  return std::max<int64_t>(1, std::min(nt, most));
}

// how many threads at::parallel_for runs a two-task loop on here (a build without OpenMP runs its
// parallel regions on the calling thread alone: a test checks it is 2 where torch has 2 threads)
int64_t parallel_width() {
  std::atomic<int64_t> mask{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    mask.fetch_or(int64_t{1} << (at::get_thread_num() & 63));
  });
  return __builtin_popcountll(static_cast<uint64_t>(mask.load()));
}

// run f(blk, r0, r1) over nb row blocks
template <typename F>
void over_rows(int64_t m, int64_t nb, F f) {
  if (nb == 1) {
    f(0, 0, m);
    return;
  }
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) f(blk, blk * m / nb, (blk + 1) * m / nb);
  });
}

// channel totals of per-block sums part (nb, 2, C), the blocks in order
void fold_blocks(const std::vector<double>& part, int64_t nb, int64_t c, double* s1, double* s2) {
  for (int64_t j = 0; j < c; ++j) {
    double a = 0.0, b = 0.0;
    for (int64_t blk = 0; blk < nb; ++blk) {
      a += part[(blk * 2) * c + j];
      b += part[(blk * 2 + 1) * c + j];
    }
    s1[j] = a;
    s2[j] = b;
  }
}

// the input's type T and the parameters' and buffers' type P: float/float, double/double, and float
// parameters and buffers for a bfloat16 or float16 input (torch's rule for reduced precision)
bool served_dtype(at::ScalarType xt) {
  return xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf;
}

at::ScalarType param_type(at::ScalarType xt) {
  return (xt == at::kBFloat16 || xt == at::kHalf) ? at::kFloat : xt;
}

template <typename F>
void dispatch(at::ScalarType xt, F f) {
  switch (xt) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case at::kHalf: f(c10::Half{}, float{}); break;
    default: TORCH_CHECK(false, "bnlab.kernels.fast: unexpected dtype ", xt);
  }
}

struct Stats {
  Tensor t;  // float64 (3, C): mean, biased variance, invstd
  int64_t nbad = 0;
};

// the fused epilogue of bnlab.nn.BatchNormAct*d: y = act(z + res), z the batch norm's output, act
// relu or none (float32/float64; silu, gelu and half precision stay on the numba / general path).
// As the numba kernels: z formed in float64, res added in float64, the activation, rounded once;
// the backward recomputes z from x (and res) and passes dy where z > 0 (a select, as torch's
// threshold_backward), dres = that gradient.

struct Epilogue {
  const void* res = nullptr;  // the residual (x's shape and layout) or none
  bool relu = false;
  void* dres = nullptr;  // backward: where the residual's gradient goes (relu; without it dres = dy)
  bool any() const { return res != nullptr || relu; }
};

template <bool RELU>
inline double act_of(double z) {
  if constexpr (RELU) return z < 0.0 ? 0.0 : z;  // NaN stays NaN
  return z;
}

// call f(std::bool_constant<RES>, std::bool_constant<RELU>) for the epilogue's case
template <typename F>
void with_epilogue(const Epilogue& e, F f) {
  if (e.res && e.relu) f(std::true_type{}, std::true_type{});
  else if (e.res) f(std::true_type{}, std::false_type{});
  else if (e.relu) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

// one run of s values of one channel: y = act((x - mu) * sc + be (+ res))
template <typename T, bool RES, bool RELU>
__attribute__((noinline)) void run_affine_act(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                                              int64_t s, double mu, double sc, double be) {
  for (int64_t q = 0; q < s; ++q) {
    double z = (ld(x[q]) - mu) * sc + be;
    if constexpr (RES) z += ld(res[q]);
    y[q] = cvt<T>(act_of<RELU>(z));
  }
}

// the gradient through the epilogue of one value: dy where z > 0 (relu), else dy
template <typename T, bool RES, bool RELU>
inline double dz_of(T x, T g, const T* res, int64_t q, double mu, double sc, double be) {
  if constexpr (RELU) {
    double z = (ld(x) - mu) * sc + be;
    if constexpr (RES) z += ld(res[q]);
    return z > 0.0 ? ld(g) : 0.0;
  }
  return ld(g);
}

// (M, C) rows: y = act((x - mean) * scale + beta (+ res)), per-column operands
template <typename T, bool RES, bool RELU>
__attribute__((noinline)) void cols_affine_act(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                                               int64_t m, int64_t c, const double* __restrict__ mean,
                                               const double* __restrict__ scale, const double* __restrict__ beta) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t o = i * c;
    for (int64_t j = 0; j < c; ++j) {
      double z = (ld(x[o + j]) - mean[j]) * scale[j] + beta[j];
      if constexpr (RES) z += ld(res[o + j]);
      y[o + j] = cvt<T>(act_of<RELU>(z));
    }
  }
}

// (M, C) rows: per-column sums of dz and dz * (x - mean)
template <typename T, bool RES, bool RELU>
__attribute__((noinline)) void cols_grad_sums_act(const T* __restrict__ x, const T* __restrict__ dy,
                                                  const T* __restrict__ res, int64_t m, int64_t c,
                                                  const double* __restrict__ mean, const double* __restrict__ scale,
                                                  const double* __restrict__ beta, double* __restrict__ s1,
                                                  double* __restrict__ s2) {
  for (int64_t j = 0; j < c; ++j) {
    s1[j] = 0.0;
    s2[j] = 0.0;
  }
  for (int64_t i = 0; i < m; ++i) {
    const int64_t o = i * c;
    for (int64_t j = 0; j < c; ++j) {
      const double g = dz_of<T, RES, RELU>(x[o + j], dy[o + j], res + o, j, mean[j], scale[j], beta[j]);
      s1[j] += g;
      s2[j] += g * (ld(x[o + j]) - mean[j]);
    }
  }
}

// (M, C) rows: dx = k ((dz - mdz) - (x - mean) kx), dres = dz (relu)
template <typename T, bool RES, bool RELU>
__attribute__((noinline)) void cols_dx_act(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ res,
                                           T* __restrict__ dx, T* __restrict__ dres, int64_t m, int64_t c,
                                           const double* __restrict__ mean, const double* __restrict__ k,
                                           const double* __restrict__ beta, const double* __restrict__ mdz,
                                           const double* __restrict__ kx) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t o = i * c;
    for (int64_t j = 0; j < c; ++j) {
      const double g = dz_of<T, RES, RELU>(x[o + j], dy[o + j], res + o, j, mean[j], k[j], beta[j]);
      if (dx) dx[o + j] = cvt<T>(k[j] * ((g - mdz[j]) - (ld(x[o + j]) - mean[j]) * kx[j]));
      if constexpr (RELU) {
        if (dres) dres[o + j] = cvt<T>(g);
      }
    }
  }
}

// the columns layout: (M, C) with C innermost: a 2-D tensor, or a channels_last (4-D) /
// channels_last_3d (5-D) one, whose memory is the (N * spatial, C) matrix (a tensor that is also
// contiguous, as with one channel or one spatial value, is read in the rows layout)
bool channels_last(const Tensor& x) {
  return !x.is_contiguous() && ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
}

// (for a tensor servable() took: a 2-D one is contiguous)
bool cols_layout(const Tensor& x) {
  return x.dim() == 2 || channels_last(x);
}

at::MemoryFormat cols_format(const Tensor& x) {
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                      : x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

// the memory format of a tensor servable() took (dy and the residual are read in it)
at::MemoryFormat format_of(const Tensor& x) {
  return channels_last(x) ? cols_format(x) : at::MemoryFormat::Contiguous;
}

// Few channels: k consecutive rows of C channels are read as one wide row of k * C >= 128 values
// (when k divides M), so that the per-row loops stay long (as the numba kernels do); the per-column
// sums are then added up per channel. Returns k (1: rows as they are).
int64_t widen(int64_t m, int64_t c) {
  if (c >= 128) return 1;
  const int64_t k = (128 + c - 1) / c;
  return m % k == 0 ? k : 1;
}

// a per-channel operand repeated k times (the wide rows' columns)
std::vector<double> tiled(const double* a, int64_t c, int64_t k) {
  std::vector<double> t(c * k);
  for (int64_t r = 0; r < k; ++r) std::memcpy(t.data() + r * c, a, c * sizeof(double));
  return t;
}

// per-channel totals of per-column sums of the wide rows (k * c columns)
void fold_wide(const std::vector<double>& w1, const std::vector<double>& w2, int64_t c, int64_t k, double* s1,
               double* s2) {
  for (int64_t j = 0; j < c; ++j) {
    double a = 0.0, b = 0.0;
    for (int64_t r = 0; r < k; ++r) {
      a += w1[r * c + j];
      b += w2[r * c + j];
    }
    s1[j] = a;
    s2[j] = b;
  }
}

template <typename T, typename P>
Stats forward_train_cols(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y,
                         const Epilogue& epi = Epilogue()) {
  const int64_t c = x.size(1), m = x.numel() / c;
  const int64_t k = widen(m, c), mw = m / k, cw = c * k;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  Stats st;
  st.t = torch::empty({3, c}, torch::dtype(torch::kFloat64));
  double* mean = st.t.mutable_data_ptr<double>();
  double* var = mean + c;
  double* invstd = var + c;
  std::vector<double> buf(5 * c);
  double *shift = buf.data(), *s1 = shift + c, *s2 = s1 + c, *scale = s2 + c, *beta = scale + c;
  for (int64_t j = 0; j < c; ++j) shift[j] = ld(xp[j]);
  const std::vector<double> shift_w = tiled(shift, c, k);
  const int64_t nb = row_blocks(mw, cw);
  std::vector<double> part(nb * 2 * cw), w1(cw), w2(cw);
  over_rows(mw, nb, [&](int64_t blk, int64_t r0, int64_t r1) {
    cols_sums<T>(xp + r0 * cw, r1 - r0, cw, 0, cw, shift_w.data(), part.data() + blk * 2 * cw,
                 part.data() + (blk * 2 + 1) * cw);
  });
  fold_blocks(part, nb, cw, w1.data(), w2.data());
  fold_wide(w1, w2, c, k, s1, s2);
  const P* wp = w.defined() ? w.const_data_ptr<P>() : nullptr;
  const P* bp = b.defined() ? b.const_data_ptr<P>() : nullptr;
  const double md = ld(m);
  for (int64_t j = 0; j < c; ++j) {
    double d = s1[j] / md;
    double v = s2[j] / md - d * d;
    if (v < 0.0) v = 0.0;
    mean[j] = shift[j] + d;
    var[j] = v;
    invstd[j] = 1.0 / std::sqrt(v + eps);
    if (!(std::isfinite(mean[j]) && std::isfinite(v))) ++st.nbad;
    scale[j] = invstd[j] * (wp ? ld(wp[j]) : 1.0);
    beta[j] = bp ? ld(bp[j]) : 0.0;
  }
  const std::vector<double> mean_w = tiled(mean, c, k), scale_w = tiled(scale, c, k), beta_w = tiled(beta, c, k);
  if (epi.any()) {  // (float32/float64 only: train() declines a half-precision epilogue)
    const T* rp = static_cast<const T*>(epi.res);
    with_epilogue(epi, [&](auto res_c, auto relu_c) {
      over_rows(mw, nb, [&](int64_t, int64_t r0, int64_t r1) {
        cols_affine_act<T, decltype(res_c)::value, decltype(relu_c)::value>(
            xp + r0 * cw, rp ? rp + r0 * cw : nullptr, yp + r0 * cw, r1 - r0, cw, mean_w.data(), scale_w.data(),
            beta_w.data());
      });
    });
  } else if constexpr (is_half<T>()) {
    HalfOperands h(cw, mean_w.data(), scale_w.data(), beta_w.data(), nullptr);
    over_rows(mw, nb, [&](int64_t, int64_t r0, int64_t r1) {
      cols_affine_f<T>(xp + r0 * cw, yp + r0 * cw, r1 - r0, cw, h.hi, h.lo, h.a, h.b);
    });
  } else {
    over_rows(mw, nb, [&](int64_t, int64_t r0, int64_t r1) {
      cols_affine<T>(xp + r0 * cw, yp + r0 * cw, r1 - r0, cw, 0, cw, mean_w.data(), scale_w.data(), beta_w.data());
    });
  }
  return st;
}


// ---------------------------------------------------------------------------------------------
// the (N, C, S) layout (NCHW and its 3-D / 5-D kin, contiguous): a channel is N runs of S values.
// A task is one channel: its sums over the N runs, then its output from the core's own cache (a
// channel of a 64x16x32x32 float32 tensor is 256 KB); channels are split over torch's threads.

constexpr int kLanes = 32;  // float64 partial sums per accumulator: the loop vectorizes over them

// float64 lane accumulators of one channel, carried over its N runs and added up once at the end
// (a sum per run would leave the lanes' reduction on every run of a short one)
struct Lanes {
  double p1[kLanes] = {}, p2[kLanes] = {};
  double t1 = 0.0, t2 = 0.0;  // the runs' tails (s not a multiple of kLanes)
  void total(double& a1, double& a2) const {
    double x1 = t1, x2 = t2;
    for (int l = 0; l < kLanes; ++l) {
      x1 += p1[l];
      x2 += p2[l];
    }
    a1 = x1;
    a2 = x2;
  }
};

// sums of x - shift and its square over one run of s values, into the lanes
template <typename T>
inline void run_sums(const T* __restrict__ x, int64_t s, double shift, Lanes& a) {
  int64_t q = 0;
  for (; q + kLanes <= s; q += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      double d = ld(x[q + l]) - shift;
      a.p1[l] += d;
      a.p2[l] += d * d;
    }
  }
  for (; q < s; ++q) {
    double d = ld(x[q]) - shift;
    a.t1 += d;
    a.t2 += d * d;
  }
}

// sums of dy and dy * (x - mean) over one run, into the lanes
template <typename T>
inline void run_grad_sums(const T* __restrict__ x, const T* __restrict__ dy, int64_t s, double mean, Lanes& a) {
  int64_t q = 0;
  for (; q + kLanes <= s; q += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      double g = ld(dy[q + l]);
      a.p1[l] += g;
      a.p2[l] += g * (ld(x[q + l]) - mean);
    }
  }
  for (; q < s; ++q) {
    double g = ld(dy[q]);
    a.t1 += g;
    a.t2 += g * (ld(x[q]) - mean);
  }
}

template <typename F>
void over_channels(int64_t n, int64_t c, int64_t s, F f) {
  if (n * c * s < kSerialBelow || c == 1 || serial_only()) {
    f(0, c);
    return;
  }
  at::parallel_for(0, c, 1, f);
}

template <typename T, typename P>
Stats forward_train_rows(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y,
                         const Epilogue& epi = Epilogue()) {
  const int64_t n = x.size(0), c = x.size(1), s = x.numel() / (n * c);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const P* wp = w.defined() ? w.const_data_ptr<P>() : nullptr;
  const P* bp = b.defined() ? b.const_data_ptr<P>() : nullptr;
  Stats st;
  st.t = torch::empty({3, c}, torch::dtype(torch::kFloat64));
  double* mean = st.t.mutable_data_ptr<double>();
  double* var = mean + c;
  double* invstd = var + c;
  const double cnt = ld(n * s);
  over_channels(n, c, s, [&](int64_t c0, int64_t c1) {
    for (int64_t j = c0; j < c1; ++j) {
      const double shift = ld(xp[j * s]);
      Lanes lanes;
      for (int64_t i = 0; i < n; ++i) run_sums<T>(xp + (i * c + j) * s, s, shift, lanes);
      double a1, a2;
      lanes.total(a1, a2);
      double d = a1 / cnt;
      double v = a2 / cnt - d * d;
      if (v < 0.0) v = 0.0;
      const double mu = shift + d;
      mean[j] = mu;
      var[j] = v;
      invstd[j] = 1.0 / std::sqrt(v + eps);
      const double sc = invstd[j] * (wp ? ld(wp[j]) : 1.0), be = bp ? ld(bp[j]) : 0.0;
      if (epi.any()) {
        const T* rp = static_cast<const T*>(epi.res);
        with_epilogue(epi, [&](auto res_c, auto relu_c) {
          for (int64_t i = 0; i < n; ++i) {
            const int64_t o = (i * c + j) * s;
            run_affine_act<T, decltype(res_c)::value, decltype(relu_c)::value>(xp + o, rp ? rp + o : nullptr,
                                                                               yp + o, s, mu, sc, be);
          }
        });
      } else {
        for (int64_t i = 0; i < n; ++i)
          rows_affine<T>(xp + (i * c + j) * s, yp + (i * c + j) * s, 1, 1, s, 0, 1, &mu, &sc, &be);
      }
    }
  });
  for (int64_t j = 0; j < c; ++j)
    if (!(std::isfinite(mean[j]) && std::isfinite(var[j]))) ++st.nbad;
  return st;
}

// one channel's backward through the relu epilogue (rows layout): sums of dz and dz * (x - mean)
// over its N runs, then dx and dres (dz)
template <typename T, typename P>
void epilogue_backward_rows(const T* xp, const T* gp, const T* rp, T* dxp, T* drp, int64_t n, int64_t c, int64_t s,
                            int64_t j, double mu, double k, double be, double inv, double cnt, P* dwp, P* dbp) {
  auto body = [&](auto res_c) {
    constexpr bool RES = decltype(res_c)::value;
    Lanes lanes;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t o = (i * c + j) * s;
      const T* xr = xp + o;
      const T* gr = gp + o;
      const T* rr = RES ? rp + o : nullptr;
      int64_t q = 0;
      for (; q + kLanes <= s; q += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double g = dz_of<T, RES, true>(xr[q + l], gr[q + l], rr, q + l, mu, k, be);
          lanes.p1[l] += g;
          lanes.p2[l] += g * (ld(xr[q + l]) - mu);
        }
      }
      for (; q < s; ++q) {
        const double g = dz_of<T, RES, true>(xr[q], gr[q], rr, q, mu, k, be);
        lanes.t1 += g;
        lanes.t2 += g * (ld(xr[q]) - mu);
      }
    }
    double a1, a2;
    lanes.total(a1, a2);
    if (dbp) dbp[j] = cvt<P>(a1);
    if (dwp) dwp[j] = cvt<P>(a2 * inv);
    if (!dxp && !drp) return;
    const double mdz = a1 / cnt, kx = inv * inv * a2 / cnt;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t o = (i * c + j) * s;
      const T* xr = xp + o;
      const T* gr = gp + o;
      const T* rr = RES ? rp + o : nullptr;
      for (int64_t q = 0; q < s; ++q) {
        const double g = dz_of<T, RES, true>(xr[q], gr[q], rr, q, mu, k, be);
        if (dxp) dxp[o + q] = cvt<T>(k * ((g - mdz) - (ld(xr[q]) - mu) * kx));
        if (drp) drp[o + q] = cvt<T>(g);
      }
    }
  };
  if (rp) body(std::true_type{});
  else body(std::false_type{});
}

template <typename T, typename P>
void backward_rows(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, bool need_dx,
                   Tensor& dx, Tensor& dw, Tensor& db, const Tensor& b = Tensor(),
                   const Epilogue& epi = Epilogue()) {
  const int64_t n = x.size(0), c = x.size(1), s = x.numel() / (n * c);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  T* dxp = need_dx ? dx.mutable_data_ptr<T>() : nullptr;
  const double* mean = stats.const_data_ptr<double>();
  const double* invstd = mean + 2 * c;
  const P* wp = w.defined() ? w.const_data_ptr<P>() : nullptr;
  P* dwp = dw.defined() ? dw.mutable_data_ptr<P>() : nullptr;
  P* dbp = db.defined() ? db.mutable_data_ptr<P>() : nullptr;
  const P* bp = b.defined() ? b.const_data_ptr<P>() : nullptr;
  const double cnt = ld(n * s);
  over_channels(n, c, s, [&](int64_t c0, int64_t c1) {
    for (int64_t j = c0; j < c1; ++j) {
      const double mu = mean[j];
      const double k = invstd[j] * (wp ? ld(wp[j]) : 1.0), be = bp ? ld(bp[j]) : 0.0;
      if (epi.relu) {
        epilogue_backward_rows<T, P>(xp, gp, static_cast<const T*>(epi.res), dxp, static_cast<T*>(epi.dres), n, c,
                                     s, j, mu, k, be, invstd[j], cnt, dwp, dbp);
        continue;
      }
      Lanes lanes;
      for (int64_t i = 0; i < n; ++i) run_grad_sums<T>(xp + (i * c + j) * s, gp + (i * c + j) * s, s, mu, lanes);
      double a1, a2;
      lanes.total(a1, a2);
      if (dbp) dbp[j] = cvt<P>(a1);
      if (dwp) dwp[j] = cvt<P>(a2 * invstd[j]);
      if (!need_dx) continue;
      const double mdy = a1 / cnt, kx = invstd[j] * invstd[j] * a2 / cnt;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t o = (i * c + j) * s;
        const T* xr = xp + o;
        const T* gr = gp + o;
        T* out = dxp + o;
        for (int64_t q = 0; q < s; ++q) out[q] = cvt<T>(k * ((ld(gr[q]) - mdy) - (ld(xr[q]) - mu) * kx));
      }
    }
  });
}

// the running update of bnlab.policy.update_buffers for a clean batch (float64, rounded once);
// returns false (nothing written) when a channel is non-finite or would overflow the buffers
template <typename T>
bool write_running(const Stats& st, int64_t count, const Tensor& rm, const Tensor& rv, const Tensor& nbt,
                   double momentum, bool cumulative) {
  if (st.nbad) return false;
  const int64_t c = st.t.size(1);
  const double* mean = st.t.const_data_ptr<double>();
  const double* var = mean + c;
  const double corr = count > 1 ? ld(count) / (ld(count) - 1.0) : 1.0;
  const double limit = limit_of<T>();
  for (int64_t j = 0; j < c; ++j) {
    if (!(var[j] * corr <= limit) || !(std::abs(mean[j]) <= limit)) return false;
  }
  double factor = momentum;
  if (cumulative) {  // momentum=None: the cumulative average, 1 / batches counting this one
    factor = 1.0 / ld(nbt.item<int64_t>() + 1);
  }
  T* rmp = rm.mutable_data_ptr<T>();
  T* rvp = rv.mutable_data_ptr<T>();
  for (int64_t j = 0; j < c; ++j) {
    rmp[j] = cvt<T>((1.0 - factor) * ld(rmp[j]) + factor * mean[j]);
    rvp[j] = cvt<T>((1.0 - factor) * ld(rvp[j]) + factor * (var[j] * corr));
  }
  if (nbt.defined()) nbt.add_(1);
  return true;
}


template <typename T, typename P>
void backward_cols(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, bool need_dx,
                   Tensor& dx, Tensor& dw, Tensor& db, const Tensor& b = Tensor(),
                   const Epilogue& epi = Epilogue()) {
  const int64_t c = x.size(1), m = x.numel() / c;
  const int64_t kw = widen(m, c), mw = m / kw, cw = c * kw;  // wide rows (see widen)
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  const double* mean = stats.const_data_ptr<double>();
  const double* invstd = mean + 2 * c;
  const P* wp = w.defined() ? w.const_data_ptr<P>() : nullptr;
  const P* bp = b.defined() ? b.const_data_ptr<P>() : nullptr;
  std::vector<double> buf(6 * c);
  double *s1 = buf.data(), *s2 = s1 + c, *k = s2 + c, *mdy = k + c, *kx = mdy + c, *beta = kx + c;
  for (int64_t j = 0; j < c; ++j) {
    k[j] = invstd[j] * (wp ? ld(wp[j]) : 1.0);
    beta[j] = bp ? ld(bp[j]) : 0.0;
  }
  const std::vector<double> mean_w = tiled(mean, c, kw), k_w = tiled(k, c, kw), beta_w = tiled(beta, c, kw);
  const T* rp = static_cast<const T*>(epi.res);
  const int64_t nb = row_blocks(mw, cw);
  std::vector<double> part(nb * 2 * cw), w1(cw), w2(cw);
  over_rows(mw, nb, [&](int64_t blk, int64_t r0, int64_t r1) {
    double* a1 = part.data() + blk * 2 * cw;
    double* a2 = part.data() + (blk * 2 + 1) * cw;
    if (epi.relu) {  // dz = dy where z > 0
      if (rp)
        cols_grad_sums_act<T, true, true>(xp + r0 * cw, gp + r0 * cw, rp + r0 * cw, r1 - r0, cw, mean_w.data(),
                                          k_w.data(), beta_w.data(), a1, a2);
      else
        cols_grad_sums_act<T, false, true>(xp + r0 * cw, gp + r0 * cw, nullptr, r1 - r0, cw, mean_w.data(),
                                           k_w.data(), beta_w.data(), a1, a2);
    } else {
      cols_grad_sums<T>(xp + r0 * cw, gp + r0 * cw, r1 - r0, cw, 0, cw, mean_w.data(), a1, a2);
    }
  });
  fold_blocks(part, nb, cw, w1.data(), w2.data());
  fold_wide(w1, w2, c, kw, s1, s2);
  P* dwp = dw.defined() ? dw.mutable_data_ptr<P>() : nullptr;
  P* dbp = db.defined() ? db.mutable_data_ptr<P>() : nullptr;
  const double md = ld(m);
  for (int64_t j = 0; j < c; ++j) {
    if (dbp) dbp[j] = cvt<P>(s1[j]);
    if (dwp) dwp[j] = cvt<P>(s2[j] * invstd[j]);
    mdy[j] = s1[j] / md;
    kx[j] = invstd[j] * invstd[j] * s2[j] / md;
  }
  T* drp = static_cast<T*>(epi.dres);
  if (!need_dx && !(epi.relu && drp)) return;
  T* dxp = need_dx ? dx.mutable_data_ptr<T>() : nullptr;
  const std::vector<double> mdy_w = tiled(mdy, c, kw), kx_w = tiled(kx, c, kw);
  if (epi.relu) {
    over_rows(mw, nb, [&](int64_t, int64_t r0, int64_t r1) {
      T* dxr = dxp ? dxp + r0 * cw : nullptr;
      T* drr = drp ? drp + r0 * cw : nullptr;
      if (rp)
        cols_dx_act<T, true, true>(xp + r0 * cw, gp + r0 * cw, rp + r0 * cw, dxr, drr, r1 - r0, cw, mean_w.data(),
                                   k_w.data(), beta_w.data(), mdy_w.data(), kx_w.data());
      else
        cols_dx_act<T, false, true>(xp + r0 * cw, gp + r0 * cw, nullptr, dxr, drr, r1 - r0, cw, mean_w.data(),
                                    k_w.data(), beta_w.data(), mdy_w.data(), kx_w.data());
    });
  } else if constexpr (is_half<T>()) {
    HalfOperands h(cw, mean_w.data(), k_w.data(), mdy_w.data(), kx_w.data());
    over_rows(mw, nb, [&](int64_t, int64_t r0, int64_t r1) {
      cols_dx_f<T>(xp + r0 * cw, gp + r0 * cw, dxp + r0 * cw, r1 - r0, cw, h.hi, h.lo, h.a, h.b, h.c);
    });
  } else if constexpr (std::is_same_v<T, float>) {
    std::vector<double> ops(3 * cw);
    double *oa = ops.data(), *ob = oa + cw, *oe = ob + cw;
    for (int64_t j = 0; j < cw; ++j) {
      oa[j] = k_w[j];
      ob[j] = -k_w[j] * kx_w[j];
      oe[j] = k_w[j] * (kx_w[j] * mean_w[j] - mdy_w[j]);
    }
    over_rows(mw, nb, [&](int64_t, int64_t r0, int64_t r1) {
      cols_dx_affine<T>(xp + r0 * cw, gp + r0 * cw, dxp + r0 * cw, r1 - r0, cw, oa, ob, oe);
    });
  } else {
    over_rows(mw, nb, [&](int64_t, int64_t r0, int64_t r1) {
      cols_dx<T>(xp + r0 * cw, gp + r0 * cw, dxp + r0 * cw, r1 - r0, cw, 0, cw, mean_w.data(), k_w.data(),
                 mdy_w.data(), kx_w.data());
    });
  }
}

// the training backward in differentiable ATen ops (create_graph=True): statistics from x
variable_list graph_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& res,
                             bool relu, double eps, at::ScalarType pt) {
  std::vector<int64_t> dims{0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  shape[1] = x.size(1);
  auto xd = x.to(at::kDouble);
  auto mean = xd.mean(dims, true);
  auto var = (xd - mean).pow(2).mean(dims, true);
  auto invstd = (var + eps).rsqrt();
  auto xhat = (xd - mean) * invstd;
  auto k = w.defined() ? invstd * w.to(at::kDouble).view(shape) : invstd;
  auto g = dy.to(at::kDouble);
  if (relu) {  // dz = dy where z = BN(x) (+ res) > 0 (z as the forward forms it)
    auto z = (xd - mean) * k;
    if (b.defined()) z = z + b.to(at::kDouble).view(shape);
    if (res.defined()) z = z + res.to(at::kDouble);
    g = at::where(z > 0, g, at::zeros_like(g));
  }
  auto db = g.sum(dims);
  auto dw = (g * xhat).sum(dims);
  auto dx = k * (g - g.mean(dims, true) - xhat * (g * xhat).mean(dims, true));
  return {dx.to(x.scalar_type()), w.defined() ? dw.to(w.scalar_type()) : Tensor(), db.to(pt),
          res.defined() ? g.to(res.scalar_type()) : Tensor()};
}

struct BatchNorm : public torch::autograd::Function<BatchNorm> {  // its node: CppNode<bnlab::BatchNorm>
  // returns (y, stats, status): status 0 = buffers written (or none given), 1 = not written (the
  // batch is non-finite or would overflow them: the caller applies the policy with ``stats``).
  // y = act(BN(x) + res) with the epilogue (res: an empty placeholder for none; relu or none).
  // (absent tensors come as empty placeholders: autograd's apply reads the device of every tensor)
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor w, Tensor b, Tensor rm, Tensor rv,
                               Tensor nbt, double momentum, bool cumulative, double eps, Tensor res, bool relu) {
    if (!w.numel()) w = Tensor();
    if (!b.numel()) b = Tensor();
    if (!rm.numel()) rm = rv = Tensor();
    if (nbt.dim() != 0) nbt = Tensor();
    if (res.numel() == 0) res = Tensor();
    Tensor y = torch::empty_like(x);
    Stats st;
    bool ok = true;
    Epilogue epi;
    epi.res = res.defined() ? res.const_data_ptr() : nullptr;
    epi.relu = relu;
    dispatch(x.scalar_type(), [&](auto t, auto p) {
      using T = decltype(t);
      using P = decltype(p);
      st = cols_layout(x) ? forward_train_cols<T, P>(x, w, b, eps, y, epi)
                          : forward_train_rows<T, P>(x, w, b, eps, y, epi);
      if (rm.defined()) ok = write_running<P>(st, x.numel() / x.size(1), rm, rv, nbt, momentum, cumulative);
    });
    ctx->save_for_backward({x, w, st.t, b, res});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    Tensor status = torch::full({}, ok ? 0 : 1, torch::dtype(torch::kInt64));
    ctx->mark_non_differentiable({st.t, status});
    return {y, st.t, status};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor x = saved[0], w = saved[1], stats = saved[2], b = saved[3], res = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    Tensor dy = grads[0];
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1), nb = ctx->needs_input_grad(2);
    // (needs_input_grad counts the tensor arguments only: res is the seventh)
    const bool nr = res.defined() && ctx->needs_input_grad(6);
    variable_list out(11);  // one per forward argument
    if (!dy.defined()) return out;
    // a graph of the backward asked for (create_graph=True), or a dy without storage of its own (a
    // batched tangent of torch.func / jacobian(vectorize=True)): the formula in ATen ops
    if (at::GradMode::is_enabled() || !dy.has_storage() || dy.layout() != at::kStrided ||
        dy.scalar_type() != x.scalar_type()) {
      auto g = graph_backward(dy, x, w, b, res, relu, ctx->saved_data["eps"].toDouble(), param_type(x.scalar_type()));
      if (nx) out[0] = g[0];
      if (nw) out[1] = g[1];
      if (nb) out[2] = g[2];
      if (nr) out[9] = g[3];
      return out;
    }
    dy = dy.contiguous(format_of(x));
    Tensor dx = nx ? torch::empty_like(x) : Tensor();
    Tensor dw = (nw && w.defined()) ? torch::empty_like(w) : Tensor();
    Tensor db = nb ? torch::empty({x.size(1)}, x.options().dtype(param_type(x.scalar_type()))) : Tensor();
    // the residual's gradient: dz, which is dy itself without an activation
    Tensor dres = nr ? (relu ? torch::empty_like(x) : dy) : Tensor();
    Epilogue epi;
    epi.res = res.defined() ? res.const_data_ptr() : nullptr;
    epi.relu = relu;
    epi.dres = (nr && relu) ? dres.mutable_data_ptr() : nullptr;
    dispatch(x.scalar_type(), [&](auto t, auto p) {
      if (cols_layout(x))
        backward_cols<decltype(t), decltype(p)>(dy, x, w, stats, nx, dx, dw, db, b, epi);
      else
        backward_rows<decltype(t), decltype(p)>(dy, x, w, stats, nx, dx, dw, db, b, epi);
    });
    out[0] = dx;
    out[1] = dw;
    out[2] = db;
    out[9] = dres;
    return out;
  }
};

// (N, C) or (N, C, *) up to 5 dims, contiguous or channels_last(_3d), at least 2 values per channel; a half-precision
// (N, C, *) input in any strided layout (it goes to torch's kernel, native_half: the (N, C, *)
// kernels above are instantiated for half types but never reached)
bool servable(const Tensor& x) {
  const bool half_nd = x.dim() > 2 && param_type(x.scalar_type()) != x.scalar_type();  // torch's kernel
  return x.device().is_cpu() && served_dtype(x.scalar_type()) && x.dim() >= 2 && x.dim() <= 5 &&
         (x.is_contiguous() || half_nd || channels_last(x)) && x.size(1) >= 1 && x.numel() / x.size(1) >= 2 && !x.is_neg() &&
         !x.is_conj() && x.layout() == at::kStrided;
}

// (N, C, *) bfloat16/float16 training: torch's kernel, bit for bit (its float32 statistics and
// output, its autograd node), with bnlab's float64 running update and non-finite check on the
// statistics it returns (the biased variance recovered as invstd^-2 - eps in float64), as
// bnlab.kernels._native_train does in Python
py::object native_half(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rm, const Tensor& rv,
                       const Tensor& nbt, double momentum, bool cumulative, double eps) {
  auto r = at::_native_batch_norm_legit(x, w.defined() ? c10::optional<Tensor>(w) : c10::nullopt,
                                        b.defined() ? c10::optional<Tensor>(b) : c10::nullopt, true, 0.0, eps);
  Tensor y = std::get<0>(r);
  const int64_t c = x.size(1);
  Stats st;
  st.t = torch::empty({3, c}, torch::dtype(torch::kFloat64));
  {
    at::NoGradGuard ng;
    Tensor mean = std::get<1>(r).detach().to(at::kDouble).contiguous();
    Tensor invstd = std::get<2>(r).detach().to(at::kDouble).contiguous();
    const double* mp = mean.const_data_ptr<double>();
    const double* ip = invstd.const_data_ptr<double>();
    double* out = st.t.mutable_data_ptr<double>();
    for (int64_t j = 0; j < c; ++j) {
      double v = 1.0 / (ip[j] * ip[j]) - eps;
      if (v < 0.0) v = 0.0;
      out[j] = mp[j];
      out[c + j] = v;
      out[2 * c + j] = ip[j];
      if (!(std::isfinite(mp[j]) && std::isfinite(v))) ++st.nbad;
    }
  }
  bool ok = true;
  if (rm.defined()) ok = write_running<float>(st, x.numel() / c, rm, rv, nbt, momentum, cumulative);
  py::gil_scoped_acquire gil;
  return py::make_tuple(y, st.t, ok ? 0 : 1);
}

// an epilogue the kernels take: float32/float64 (x's dtype is its parameters'), and a residual of
// x's shape, dtype and memory format
bool epilogue_servable(const Tensor& x, const Tensor& res) {
  if (param_type(x.scalar_type()) != x.scalar_type()) return false;
  return !res.defined() ||
         (res.device().is_cpu() && res.layout() == at::kStrided && res.scalar_type() == x.scalar_type() &&
          res.sizes() == x.sizes() && !res.is_neg() && !res.is_conj() && res.is_contiguous(format_of(x)));
}

// training batch norm of a contiguous (M, C) or (N, C, *) tensor (or any strided (N, C, *) half one). momentum None: the cumulative average
// (needs num_batches_tracked). Returns (y, stats, status: an int) or None
py::object train(const Tensor& x, const c10::optional<Tensor>& w_, const c10::optional<Tensor>& b_,
                 const c10::optional<Tensor>& rm_, const c10::optional<Tensor>& rv_,
                 const c10::optional<Tensor>& nbt_, c10::optional<double> momentum_, double eps,
                 const c10::optional<Tensor>& res_, bool relu) {
  if (!servable(x) || !(eps > 0.0)) return py::none();
  Tensor res = res_.value_or(Tensor());
  if ((res.defined() || relu) && !epilogue_servable(x, res)) return py::none();
  const int64_t c = x.size(1);
  const auto dt = param_type(x.scalar_type());
  Tensor w = w_.value_or(Tensor()), b = b_.value_or(Tensor());
  Tensor rm = rm_.value_or(Tensor()), rv = rv_.value_or(Tensor()), nbt = nbt_.value_or(Tensor());
  if (!is_param(w, c, dt) || !is_param(b, c, dt) || !is_vec(rm, c, dt) || !is_vec(rv, c, dt)) return py::none();
  if (rm.defined() != rv.defined()) return py::none();
  if (nbt.defined() && !(rm.defined() && nbt.device().is_cpu() && nbt.scalar_type() == at::kLong && nbt.dim() == 0))
    return py::none();
  const bool cumulative = !momentum_.has_value();  // momentum=None
  const double momentum = momentum_.value_or(0.0);
  if (cumulative && rm.defined() && !nbt.defined()) return py::none();
  if (rm.defined() && (rm.is_same(rv) || x.is_same(rm))) return py::none();
  if (x.dim() > 2 && param_type(x.scalar_type()) != x.scalar_type()) {
    py::gil_scoped_release nogil;
    return native_half(x, w, b, rm, rv, nbt, momentum, cumulative, eps);
  }
  variable_list r;
  {
    py::gil_scoped_release nogil;
    Tensor none = at::empty({0}, x.options().dtype(dt));
    Tensor no_count = at::empty({0}, torch::dtype(torch::kLong));
    r = BatchNorm::apply(x, w.defined() ? w : none, b.defined() ? b : none, rm.defined() ? rm : none,
                       rv.defined() ? rv : none, nbt.defined() ? nbt : no_count, momentum, cumulative, eps,
                       res.defined() ? res : none, relu);
  }
  return py::make_tuple(r[0], r[1], r[2].item<int64_t>());
}

// eval with the norm-act epilogue, y = act(BN(x) + res) (float32/float64): the columns layout
// (2-D, channels_last) as wide rows, the rows layout one (n, c) run at a time
template <typename T>
void eval_epilogue(const Tensor& x, const Tensor& res, bool relu, const T* xp, T* yp, const double* mean,
                   const double* scale, const double* beta) {
  Epilogue epi;
  epi.res = res.defined() ? res.const_data_ptr() : nullptr;
  epi.relu = relu;
  const T* rp = static_cast<const T*>(epi.res);
  const int64_t c = x.size(1);
  if (x.dim() == 2 || channels_last(x)) {
    const int64_t m = x.numel() / c, k = widen(m, c), mw = m / k, cw = c * k;
    const std::vector<double> mean_w = tiled(mean, c, k), scale_w = tiled(scale, c, k), beta_w = tiled(beta, c, k);
    with_epilogue(epi, [&](auto res_c, auto relu_c) {
      over_rows(mw, row_blocks(mw, cw), [&](int64_t, int64_t r0, int64_t r1) {
        cols_affine_act<T, decltype(res_c)::value, decltype(relu_c)::value>(
            xp + r0 * cw, rp ? rp + r0 * cw : nullptr, yp + r0 * cw, r1 - r0, cw, mean_w.data(), scale_w.data(),
            beta_w.data());
      });
    });
    return;
  }
  const int64_t nc = x.size(0) * c, s = x.numel() / nc;
  with_epilogue(epi, [&](auto res_c, auto relu_c) {
    auto runs = [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t j = r % c;
        run_affine_act<T, decltype(res_c)::value, decltype(relu_c)::value>(xp + r * s, rp ? rp + r * s : nullptr,
                                                                           yp + r * s, s, mean[j], scale[j], beta[j]);
      }
    };
    if (x.numel() < kSerialBelow || serial_only()) {
      runs(0, nc);
    } else {
      at::parallel_for(0, nc, std::max<int64_t>(1, 4096 / s), runs);
    }
  });
}

// eval forward with the running statistics, no autograd (a caller with grad takes the general
// path): (M, C), contiguous (N, C, *) or channels_last(_3d) tensors. Returns y or None
py::object eval(const Tensor& x, const c10::optional<Tensor>& w_, const c10::optional<Tensor>& b_,
                const Tensor& rm, const Tensor& rv, double eps, const c10::optional<Tensor>& res_, bool relu) {
  if (!(x.device().is_cpu() && served_dtype(x.scalar_type()) && x.dim() >= 2 &&
        x.dim() <= 5 && (x.is_contiguous() || channels_last(x)) && x.layout() == at::kStrided && !x.is_neg() &&
        !x.is_conj()) ||
      !(eps >= 0.0) || x.numel() == 0)
    return py::none();
  const int64_t n = x.size(0), c = x.size(1), s = x.numel() / (n * c);
  const auto dt = param_type(x.scalar_type());
  Tensor w = w_.value_or(Tensor()), b = b_.value_or(Tensor());
  if (!is_param(w, c, dt) || !is_param(b, c, dt) || !rm.defined() || !rv.defined() || !is_vec(rm, c, dt) ||
      !is_vec(rv, c, dt))
    return py::none();
  Tensor res = res_.value_or(Tensor());
  const bool epilogue = res.defined() || relu;
  if (epilogue && !epilogue_servable(x, res)) return py::none();
  Tensor y = torch::empty_like(x);
  {
    py::gil_scoped_release nogil;
    std::vector<double> buf(3 * c);
    double *mean = buf.data(), *scale = mean + c, *beta = scale + c;
    dispatch(x.scalar_type(), [&](auto t, auto p) {
      using scalar_t = decltype(t);
      using P = decltype(p);
      const P* rmp = rm.const_data_ptr<P>();
      const P* rvp = rv.const_data_ptr<P>();
      const P* wp = w.defined() ? w.const_data_ptr<P>() : nullptr;
      const P* bp = b.defined() ? b.const_data_ptr<P>() : nullptr;
      for (int64_t j = 0; j < c; ++j) {
        mean[j] = ld(rmp[j]);
        scale[j] = (1.0 / std::sqrt(ld(rvp[j]) + eps)) * (wp ? ld(wp[j]) : 1.0);
        beta[j] = bp ? ld(bp[j]) : 0.0;
      }
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      if (epilogue) {
        if constexpr (!is_half<scalar_t>()) {
          eval_epilogue<scalar_t>(x, res, relu, xp, yp, mean, scale, beta);
        }
      } else if (channels_last(x)) {  // the (N * spatial, C) matrix, few channels read as wide rows
        const int64_t m = x.numel() / c, k = widen(m, c), mw = m / k, cw = c * k;
        const std::vector<double> mean_w = tiled(mean, c, k), scale_w = tiled(scale, c, k), beta_w = tiled(beta, c, k);
        if constexpr (is_half<scalar_t>()) {
          HalfOperands h(cw, mean_w.data(), scale_w.data(), beta_w.data(), nullptr);
          over_rows(mw, row_blocks(mw, cw), [&](int64_t, int64_t r0, int64_t r1) {
            cols_affine_f<scalar_t>(xp + r0 * cw, yp + r0 * cw, r1 - r0, cw, h.hi, h.lo, h.a, h.b);
          });
        } else {
          over_rows(mw, row_blocks(mw, cw), [&](int64_t, int64_t r0, int64_t r1) {
            cols_affine<scalar_t>(xp + r0 * cw, yp + r0 * cw, r1 - r0, cw, 0, cw, mean_w.data(), scale_w.data(),
                                  beta_w.data());
          });
        }
      } else if constexpr (is_half<scalar_t>()) {
        HalfOperands h(c, mean, scale, beta, nullptr);
        if (n * c * s < kSerialBelow || serial_only()) {
          rows_affine_f<scalar_t>(xp, yp, c, s, 0, n * c, h.hi, h.lo, h.a, h.b);
        } else {
          at::parallel_for(0, n * c, std::max<int64_t>(1, 4096 / s), [&](int64_t r0, int64_t r1) {
            rows_affine_f<scalar_t>(xp, yp, c, s, r0, r1, h.hi, h.lo, h.a, h.b);
          });
        }
      } else if (s == 1) {
        over_rows(n, row_blocks(n, c), [&](int64_t, int64_t r0, int64_t r1) {
          cols_affine<scalar_t>(xp + r0 * c, yp + r0 * c, r1 - r0, c, 0, c, mean, scale, beta);
        });
      } else if (n * c * s < kSerialBelow || serial_only()) {
        rows_affine<scalar_t>(xp, yp, n, c, s, 0, n * c, mean, scale, beta);
      } else {
        int64_t grain = std::max<int64_t>(1, 4096 / s);
        at::parallel_for(0, n * c, grain, [&](int64_t r0, int64_t r1) {
          rows_affine<scalar_t>(xp, yp, n, c, s, r0, r1, mean, scale, beta);
        });
      }
    });
  }
  return py::cast(y);
}

// bnlab::check_batch_fast(ok, mean, var, count, limit, name) -> ok: the non-finite check of the
// compiled running update (bnlab.kernels._compiled_update) as a C++ op: ``ok`` passed through (a
// copy), or, for a bad batch, bnlab.kernels.ops' Python raise of NonFiniteBatchError naming the
// channels. Same contract as the Python op bnlab::check_batch, without its Python dispatch on every
// call (about 13 us warm, several times that inside a model).
Tensor check_batch_fast(const Tensor& ok, const Tensor& mean, const Tensor& var, c10::SymInt count, double limit,
                        c10::string_view name) {
  if (ok.item<bool>()) return ok.clone();
  const int64_t n = count.guard_int(__FILE__, __LINE__);
  py::gil_scoped_acquire gil;
  py::module_::import("bnlab.kernels.ops")
      .attr("raise_bad_batch_stats")(mean, var, n, limit, std::string(name.data(), name.size()));
  TORCH_CHECK(false, "bnlab: non-finite batch statistics in ", std::string(name.data(), name.size()));
}

}  // namespace bnlab

TORCH_LIBRARY_FRAGMENT(bnlab, m) {
  m.def("check_batch_fast(Tensor ok, Tensor mean, Tensor var, SymInt count, float limit, str name) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlab, CompositeExplicitAutograd, m) {
  m.impl("check_batch_fast", &bnlab::check_batch_fast);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pthread_atfork(nullptr, nullptr, [] { bnlab::g_forked.store(true); });
  m.doc() = "bnlab's small-call batch norm (see bnlab.kernels.fast)";
  m.def("train", &bnlab::train, "training batch norm of a contiguous (M, C) CPU tensor, or None", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("num_batches_tracked"), py::arg("momentum"), py::arg("eps"), py::arg("residual") = py::none(),
        py::arg("relu") = false);
  m.def("set_serial_below", [](int64_t n) { int64_t old = bnlab::kSerialBelow; bnlab::kSerialBelow = n; return old; },
        "set the size (elements) below which the loops run on the calling thread; returns the old one");
  m.def("parallel_width", &bnlab::parallel_width, "threads a parallel loop of the extension runs on");
  m.def("forked", [] { return bnlab::g_forked.load(); }, "True in a child forked from the process that loaded the extension");
  m.def("eval", &bnlab::eval, "eval batch norm of a contiguous CPU tensor without autograd, or None", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"), py::arg("eps"),
        py::arg("residual") = py::none(), py::arg("relu") = false);
}

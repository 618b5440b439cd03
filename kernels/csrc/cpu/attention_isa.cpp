// The elementwise half of causal attention on CPU: softmax of a block of scores, forward and backward.
// The GEMMs around it are BLAS calls in the binding (attention.cpp); these row passes run on a block that
// the GEMM has just written, while it is still in L1/L2. Compiled once per ISA like kernels_isa.cpp, into
// llamactl_cpu::<ISA>; fp32 and fp64 (fp64 for gradcheck).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention.h"
#include "isa_common.h"

namespace llamactl_cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
inline T lanes_max(const Vectorized<T>& v) {
  alignas(64) T t[Vectorized<T>::size()];
  v.store(t);
  T m = t[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i) m = (t[i] > m || std::isnan(t[i])) ? t[i] : m;
  return m;
}

// Row r of the block (query q0 + r) sees keys [0, q0 + r + 1): its first `seen` columns.
inline int64_t seen(int64_t q0, int64_t r, int64_t n) { return std::min(n, q0 + r + 1); }

template <typename T>
void softmax_fwd_t(T* s, int64_t m, int64_t n, int64_t q0, T scale, T* lse) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vs(scale);
  for (int64_t r = 0; r < m; ++r) {
    T* row = s + r * n;
    const int64_t c = seen(q0, r, n);
    V vm(-std::numeric_limits<T>::infinity());
    int64_t i = 0;
    for (; i + W <= c; i += W) vm = at::vec::maximum(vm, V::loadu(row + i));
    T mx = lanes_max(vm);
    for (int64_t j = i; j < c; ++j) mx = (row[j] > mx || std::isnan(row[j])) ? row[j] : mx;
    const V vmx(mx);
    V acc(T(0));
    for (i = 0; i + W <= c; i += W) {
      const V e = ((V::loadu(row + i) - vmx) * vs).exp();
      e.store(row + i);
      acc = acc + e;
    }
    T sum = hsum(acc);
    for (int64_t j = i; j < c; ++j) {
      row[j] = std::exp((row[j] - mx) * scale);
      sum += row[j];
    }
    const T inv = T(1) / sum;
    const V vinv(inv);
    for (i = 0; i + W <= c; i += W) (V::loadu(row + i) * vinv).store(row + i);
    for (int64_t j = i; j < c; ++j) row[j] *= inv;
    std::fill(row + c, row + n, T(0));  // masked keys: the P @ V GEMM adds nothing for them
    lse[r] = mx * scale + std::log(sum);
  }
}

template <typename T>
void softmax_bwd_t(T* s, T* dp, int64_t m, int64_t n, int64_t q0, T scale, const T* lse, const T* o, int64_t ldo,
                   const T* dout, int64_t lddo, int64_t D) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vs(scale);
  for (int64_t r = 0; r < m; ++r) {
    T* prow = s + r * n;
    T* drow = dp + r * n;
    const int64_t c = seen(q0, r, n);
    // delta = sum_j p_j dp_j = sum_d dout_d o_d (one dot of head_dim instead of one of n)
    const T* orow = o + r * ldo;
    const T* grow = dout + r * lddo;
    V dacc(T(0));
    int64_t d = 0;
    for (; d + W <= D; d += W) dacc = dacc + V::loadu(orow + d) * V::loadu(grow + d);
    T delta = hsum(dacc);
    for (; d < D; ++d) delta += orow[d] * grow[d];
    const V vl(lse[r]), vdelta(delta);
    int64_t i = 0;
    for (; i + W <= c; i += W) {
      const V p = (V::loadu(prow + i) * vs - vl).exp();
      p.store(prow + i);
      (p * (V::loadu(drow + i) - vdelta) * vs).store(drow + i);
    }
    for (; i < c; ++i) {
      const T p = std::exp(prow[i] * scale - lse[r]);
      prow[i] = p;
      drow[i] = p * (drow[i] - delta) * scale;
    }
    std::fill(prow + c, prow + n, T(0));
    std::fill(drow + c, drow + n, T(0));
  }
}

void softmax_fwd(int dt, void* s, int64_t m, int64_t n, int64_t q0, double scale, void* lse) {
  if (dt == kAttnF64) return softmax_fwd_t<double>((double*)s, m, n, q0, scale, (double*)lse);
  softmax_fwd_t<float>((float*)s, m, n, q0, float(scale), (float*)lse);
}

void softmax_bwd(int dt, void* s, void* dp, int64_t m, int64_t n, int64_t q0, double scale, const void* lse,
                 const void* o, int64_t ldo, const void* dout, int64_t lddo, int64_t D) {
  if (dt == kAttnF64)
    return softmax_bwd_t<double>((double*)s, (double*)dp, m, n, q0, scale, (const double*)lse, (const double*)o,
                                 ldo, (const double*)dout, lddo, D);
  softmax_bwd_t<float>((float*)s, (float*)dp, m, n, q0, float(scale), (const float*)lse, (const float*)o, ldo,
                       (const float*)dout, lddo, D);
}

constexpr AttentionTable kTable{&softmax_fwd, &softmax_bwd};

}  // namespace

const AttentionTable* attention_table() { return &kTable; }

}  // namespace CPU_CAPABILITY
}  // namespace llamactl_cpu
